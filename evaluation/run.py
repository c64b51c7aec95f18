"""Command line for the in-context retrieval benchmark: ``python -m evaluation.run --help``.

    python -m evaluation.run --backbone vits14 --weights hub --dataset voc --data-root s3://data/VOC2012
    python -m evaluation.run --backbone vits14 --weights hub --weights runs/dip/encoder.safetensors \\
        --dataset all --set data_roots.voc=... --set data_roots.ade20k=... --address auto
    python -m evaluation.run --tiny --dataset synthetic --data-root /tmp/scenes --set memory.size=4096
    python -m evaluation.run --set protocol=hummingbird --dataset voc --data-root s3://data/VOC2012
    python -m evaluation.run --dataset voc --data-root s3://data/VOC2012 --set linear.enabled=true

Configuration: defaults (the paper's settings) <- --config YAML <- the flags <- --set key=value.
``protocol`` (dip, the default, or hummingbird) fills the settings of a published evaluation
that none of these sets explicitly: ``--set protocol=hummingbird``. ``--set linear.enabled=true``
adds the linear-probe baseline on each segmentation dataset (``linear.epochs``, ``linear.lr``,
...), as rows of method ``linear`` in the same results.json / results.md.
"""

from __future__ import annotations

from typing import Annotated

import typer

from shared.cli import error_line, user_errors
from shared.config import ConfigError, deep_merge, load_config, parse_overrides

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=False)
PROG = "evaluation.run"


def flags_to_overrides(backbone, weights, dataset, data_root, out, tiny, address) -> dict:
    """The command-line flags as a config override dict (unset flags are left out)."""
    over: dict = {}
    if backbone:
        over["backbones"] = list(backbone)
    if weights:
        over["weights"] = list(weights)
    if dataset:
        over["datasets"] = list(dataset)
    if data_root:
        if not dataset or len(dataset) != 1 or dataset[0] == "all":
            raise ConfigError("--data-root goes with exactly one --dataset; for several, use "
                              "--set data_roots.<name>=<URI>")
        over["data_roots"] = {dataset[0]: data_root}
    if out:
        over["out"] = out
    if tiny:
        over["tiny"] = True
    if address:
        over["ray_address"] = address
    return over


@app.command()
def main(
    backbone: Annotated[list[str] | None, typer.Option(help="registered backbone (repeatable; default: the ones the --weights files record, else vits14)")] = None,
    weights: Annotated[list[str] | None, typer.Option(
        help="'hub', 'random', or an exported encoder file (repeatable)")] = None,
    dataset: Annotated[list[str] | None, typer.Option(
        help="voc, ade20k, pcontext, cityscapes, acdc, cocostuff, nyu, synthetic, or all")] = None,
    data_root: Annotated[str | None, typer.Option(help="root URI of the one --dataset")] = None,
    out: Annotated[str | None, typer.Option(help="output URI (results, banks, config)")] = None,
    tiny: Annotated[bool, typer.Option(help="tiny random-init variants (tests, demos)")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: local)")] = None,
    config: Annotated[str | None, typer.Option(help="YAML config file (any URI)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override key=value")] = None,
) -> None:
    """Evaluate encoders with the in-context (nearest-neighbour retrieval) benchmark; with
    --set linear.enabled=true, with the linear-probe baseline too."""
    from evaluation.benchmark import run_benchmark
    from evaluation.config import EvalConfig
    from evaluation.protocols import describe, resolved_settings
    from evaluation.report import markdown_table
    from shared.backbones import backbone_override

    try:
        overrides = deep_merge(
            flags_to_overrides(backbone, weights, dataset, data_root, out, tiny, address),
            parse_overrides(set_ or []))
        cfg = load_config(EvalConfig, config, overrides)
        if inferred := backbone_override(cfg, "backbones"):  # none given: the files' own
            cfg = load_config(EvalConfig, config, deep_merge(overrides, inferred))
        rows = run_benchmark(cfg, log=lambda msg: typer.echo(msg, err=True))
    except user_errors() as exc:  # bad input: say what, no traceback
        typer.echo(error_line(PROG, exc), err=True)
        raise typer.Exit(code=2) from None
    typer.echo(describe(resolved_settings(cfg)) + "\n")
    typer.echo(markdown_table(rows))


if __name__ == "__main__":
    app()
