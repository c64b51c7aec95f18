"""Command line of the label importer: ``python -m labeling.import --help``.

A label set from labels that already exist (see labeling/importing.py):

    python -m labeling.import --images coco/train2017 --maps dip_labels/ --pairs pairs.txt --out labels/coco
    python -m labeling.import --images scenes/images/train --masks scenes/masks/train --out labels/oracle
    python -m labeling.import --dataset synthetic --images scenes --split train --tiny --out labels/oracle
"""

from __future__ import annotations

import json
import logging
from typing import Annotated

import typer

from shared.cli import error_line

app = typer.Typer(add_completion=False, help=__doc__)
PROG = "labeling.import"


@app.command()
def main(
    images: Annotated[str | None, typer.Option(help="image folder URI (with --dataset: the dataset root)")] = None,
    maps: Annotated[str | None, typer.Option(help="folder of class maps <image id>.pt / .png")] = None,
    masks: Annotated[str | None, typer.Option(help="folder of ground-truth masks <image id>.png (oracle label set)")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset layout of evaluation/datasets, e.g. synthetic (oracle label set)")] = None,
    split: Annotated[str | None, typer.Option(help="split of --dataset: train or val")] = None,
    pairs: Annotated[str | None, typer.Option(help="pairs file, one 'query.jpg: positive.jpg' per line (default: computed with the encoder)")] = None,
    out: Annotated[str | None, typer.Option(help="label set URI (local path or s3://...)")] = None,
    classes: Annotated[int | None, typer.Option(help="K (default: the dataset's, else the largest class id + 1)")] = None,
    backbone: Annotated[str | None, typer.Option(help="encoder of the computed pairs, e.g. vits14")] = None,
    weights: Annotated[str | None, typer.Option(help="'hub' or a weight file for the encoder")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="tiny random-init encoder (offline demo, tests)")] = False,
    config: Annotated[str | None, typer.Option(help="YAML config file (see labeling/importing.py)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. map_view=train_crop")] = None,
    resume: Annotated[bool, typer.Option(help="skip finished shards of a label set at --out; --no-resume removes that label set first (only a label set is ever removed)")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """Import class maps or ground-truth masks as a label set that training reads."""
    from labeling.importing import ImportConfig, import_labels
    from labeling.run import classify
    from shared.config import deep_merge, load_config, parse_overrides

    flags = {"images": images, "maps": maps, "masks": masks, "dataset": dataset, "split": split,
             "pairs": pairs, "out": out, "classes": classes, "backbone": backbone,
             "weights": weights}
    flags = {k: v for k, v in flags.items() if v is not None}
    if tiny:
        flags["tiny"] = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        # precedence: defaults <- YAML file <- --set overrides <- explicit flags
        cfg = load_config(ImportConfig, config, deep_merge(parse_overrides(set_ or []), flags))
        summary = import_labels(cfg, progress=not quiet, resume=resume)
    except Exception as exc:
        code = classify(exc)
        if code is None:
            raise
        typer.echo(error_line(PROG, exc), err=True)
        raise typer.Exit(code) from None
    typer.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app()
