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

from shared.cli import error_line, user_errors

app = typer.Typer(add_completion=False, help=__doc__)
PROG = "labeling.run"


def root_cause(exc: BaseException) -> BaseException:
    """The exception raised in a worker, unwrapped from Ray's task and dataset errors."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(cause, BaseException):
            exc = cause
        elif type(exc).__module__.startswith("ray.") and exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc


def classify(exc: BaseException) -> int | None:
    """Exit code of a failure worth one line: 2 for bad input, 1 for a failed environment
    (storage, credentials, a lost lease); None for anything else (a bug: keep the traceback)."""
    from labeling.stages import ShardEnvironmentError
    from shared import storage
    from shared.lease import LeaseError

    if isinstance(exc, (LeaseError, ShardEnvironmentError)) or (
            isinstance(exc, storage.StorageError) and storage.is_environment_error(exc)):
        return 1
    if isinstance(exc, user_errors()):
        return 2  # a storage "not found" included: a missing input is the user's
    return 1 if isinstance(exc, storage.StorageError) else None


@app.command()
def main(
    images: Annotated[str | None, typer.Option(help="image folder URI; 'synthetic' = built-in scenes")] = None,
    out: Annotated[str | None, typer.Option(help="label set URI (local path or s3://...)")] = None,
    backbone: Annotated[str | None, typer.Option(help="encoder for pooling and pairs, e.g. vits14 (default: the one the --weights file records, else vits14)")] = None,
    weights: Annotated[str | None, typer.Option(help="'hub' or a weight file for the encoder")] = None,
    segmenter: Annotated[str | None, typer.Option(help="segmenter: diffcut (default) or felzenszwalb (a CPU baseline), or package.module:factory for your own")] = None,
    classes: Annotated[int | None, typer.Option(help="K, the number of pseudo-classes")] = None,
    shard_size: Annotated[int | None, typer.Option(help="images per shard")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per GPU batch")] = None,
    actors: Annotated[int | None, typer.Option(help="fixed size of the actor pool (default: a pool from 1 up to the cluster's GPUs)")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per actor (ignored without GPUs)")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="tiny random-init models (offline demo, tests)")] = False,
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS or a local Ray)")] = None,
    config: Annotated[str | None, typer.Option(help="YAML config file (see labeling/config.py)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. diffcut.tau=0.4")] = None,
    resume: Annotated[bool, typer.Option(help="skip finished work of a label set at --out; --no-resume removes that label set first (only a label set is ever removed)")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Label an image collection: DiffCut segments, pseudo-classes, query/positive pairs."""
    from labeling.config import LabelConfig
    from labeling.pipeline import run_labeling
    from shared.backbones import backbone_override
    from shared.config import deep_merge, load_config, parse_overrides

    flags = {"images": images, "out": out, "backbone": backbone, "weights": weights,
             "segmenter": segmenter, "classes": classes, "shard_size": shard_size,
             "batch_size": batch_size, "actors": actors, "gpus_per_actor": gpus_per_actor}
    flags = {k: v for k, v in flags.items() if v is not None}
    if tiny:
        flags["tiny"] = True
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        # precedence: defaults <- YAML file <- --set overrides <- explicit flags
        merged = deep_merge(parse_overrides(set_ or []), flags)
        cfg = load_config(LabelConfig, config, merged)
        if inferred := backbone_override(cfg):  # no backbone given: the weight file's own
            cfg = load_config(LabelConfig, config, deep_merge(merged, inferred))
        summary = run_labeling(cfg, address=address or os.environ.get("RAY_ADDRESS"),
                               progress=not quiet, resume=resume)
    except Exception as exc:
        cause = root_cause(exc)
        code = classify(cause)
        if code is None:
            raise
        typer.echo(error_line(PROG, cause), err=True)
        raise typer.Exit(code) from None
    finally:
        _stop_ray()
    typer.echo(json.dumps(summary, indent=2))


def _stop_ray() -> None:
    """Shut Ray down so that no executor thread keeps a failed process alive."""
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    app()
