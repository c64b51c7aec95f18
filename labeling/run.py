"""Command line of the labeling service: ``python -m labeling.run --help``.

Locally it starts a Ray of its own; on a cluster, submit it as a Ray job:
``ray job submit -- python -m labeling.run --images s3://bucket/images --out s3://bucket/labels``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    images: Annotated[str | None, typer.Option(help="image folder URI; 'synthetic' = built-in scenes")] = None,
    out: Annotated[str | None, typer.Option(help="label set URI (local path or s3://...)")] = None,
    backbone: Annotated[str | None, typer.Option(help="encoder for pooling and pairs, e.g. vits14")] = None,
    weights: Annotated[str | None, typer.Option(help="'hub' or a weight file for the encoder")] = None,
    segmenter: Annotated[str | None, typer.Option(help="segmenter name (diffcut)")] = None,
    classes: Annotated[int | None, typer.Option(help="K, the number of pseudo-classes")] = None,
    shard_size: Annotated[int | None, typer.Option(help="images per shard")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per GPU batch")] = None,
    actors: Annotated[int | None, typer.Option(help="size of the GPU actor pool")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per actor (ignored without GPUs)")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="tiny random-init models (offline demo, tests)")] = False,
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS or a local Ray)")] = None,
    config: Annotated[str | None, typer.Option(help="YAML config file (see labeling/config.py)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. diffcut.tau=0.4")] = None,
    resume: Annotated[bool, typer.Option(help="skip finished shards of an existing run at --out")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Label an image collection: DiffCut segments, pseudo-classes, query/positive pairs."""
    from labeling.config import LabelConfig
    from labeling.pipeline import run_labeling
    from shared import storage
    from shared.config import deep_merge, load_config, parse_overrides

    flags = {"images": images, "out": out, "backbone": backbone, "weights": weights,
             "segmenter": segmenter, "classes": classes, "shard_size": shard_size,
             "batch_size": batch_size, "actors": actors, "gpus_per_actor": gpus_per_actor}
    flags = {k: v for k, v in flags.items() if v is not None}
    if tiny:
        flags["tiny"] = True
    # precedence: defaults <- YAML file <- --set overrides <- explicit flags
    cfg = load_config(LabelConfig, config, deep_merge(parse_overrides(set_ or []), flags))
    if not resume and storage.exists(cfg.out):
        storage.remove(cfg.out, recursive=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = run_labeling(cfg, address=address or os.environ.get("RAY_ADDRESS"), progress=not quiet)
    typer.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app()
