"""Command line of DIP post-training: in this process by default, on Ray Train with --workers/--address.

    python -m training.run --backbone vits14 --labels s3://bucket/labelsets/coco --out s3://bucket/runs/dip-s
"""

from __future__ import annotations

import os
from typing import Any

import typer

from shared.cli import error_line, user_errors
from training.config import TrainConfig

app = typer.Typer(add_completion=False, help="DIP post-training of an encoder on a label set.")
PROG = "training.run"


def resolve_config(
    config: str | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults <- YAML file <- --set overrides <- explicit command-line flags.

    A backbone none of these sets comes from the weight file's metadata when it records one.
    """
    from shared.backbones import backbone_override
    from shared.config import deep_merge, load_config, parse_overrides

    merged = deep_merge(parse_overrides(overrides or []), {k: v for k, v in (flags or {}).items()
                                                           if v is not None})
    cfg = load_config(TrainConfig, config, merged)
    inferred = backbone_override(cfg)
    return load_config(TrainConfig, config, deep_merge(merged, inferred)) if inferred else cfg


def local_device(use_gpu: bool):
    """CUDA when present (or asked for), CPU otherwise; asking for a missing GPU is an error."""
    from shared.devices import default_device

    device = default_device()
    if use_gpu and device.type != "cuda":
        from shared.config import ConfigError

        raise ConfigError("--use-gpu was given but torch sees no CUDA device")
    return device


def train_in_process(cfg: TrainConfig):
    """One process, one device."""
    from training.loop import Runtime, train

    return train(cfg, Runtime(device=local_device(cfg.use_gpu)))


def _worker_loop(config: dict) -> None:
    """Body of each Ray Train worker: torch.distributed is already initialised by TorchTrainer."""
    import ray.train
    import ray.train.torch

    from training.loop import Runtime, train

    cfg = TrainConfig.model_validate(config["config"])
    ctx = ray.train.get_context()
    rt = Runtime(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        report=lambda metrics: ray.train.report(metrics),
    )
    train(cfg, rt)


def ray_storage(out: str):
    """(storage_path, storage_filesystem) for Ray's own run records, under ``out``/ray."""
    import pyarrow.fs
    from fsspec.implementations.local import LocalFileSystem

    from shared import storage

    fs, path = storage.url_to_fs(storage.join(out, "ray"))
    if isinstance(fs, LocalFileSystem):
        return os.path.abspath(path), None
    # through fsspec, so Ray sees the same endpoint and credentials as the rest of the project
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def train_on_ray(cfg: TrainConfig):
    """Data-parallel training on Ray Train (DDP; gloo on CPU, nccl on GPU), restarted on failure."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from shared.ray_init import ensure_ray
    from training.loop import Runtime, prepare, resume_point, training_input

    workers = max(cfg.workers, 1)
    data, _ = prepare(cfg, Runtime(world_size=workers))  # bad input fails here, before any worker
    resume_point(cfg.out)  # so does a run none of whose checkpoints load
    if cfg.packed_ray:  # the packed input is built by Ray tasks
        ensure_ray(cfg.address, log_to_driver=True)
    training_input(cfg, data, Runtime(world_size=workers))  # the driver builds a missing pack
    ensure_ray(cfg.address, log_to_driver=True)  # the workers' output reaches this console
    storage_path, filesystem = ray_storage(cfg.out)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json")},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(
            name="train",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    return trainer.fit()


def run_training(cfg: TrainConfig):
    """In this process unless Ray workers or a Ray address are configured."""
    if cfg.workers > 0 or cfg.address:
        return train_on_ray(cfg)
    return train_in_process(cfg)


@app.command()
def main(
    backbone: str = typer.Option(None, help="backbone registry name, e.g. vits14, dinov3_vits16 (default: the one the --weights file records, else vits14)"),
    labels: str = typer.Option(None, help="label set URI (local path or s3://...)"),
    out: str = typer.Option(None, help="output URI for checkpoints, metrics and the encoder"),
    config: str = typer.Option(None, "--config", help="YAML file of TrainConfig overrides"),
    overrides: list[str] = typer.Option(None, "--set", help="key=value override (repeatable)"),
    weights: str = typer.Option(None, help='"hub" (default) or a local weight file'),
    tiny: bool = typer.Option(None, "--tiny/--no-tiny", help="tiny random-init backbone (smoke runs)"),
    workers: int = typer.Option(None, help="Ray Train workers (0: train in this process)"),
    address: str = typer.Option(None, help="Ray cluster address (implies Ray Train)"),
    use_gpu: bool = typer.Option(None, "--use-gpu/--no-gpu", help="one GPU per Ray worker"),
) -> None:
    """Post-train an encoder with DIP on a label set; writes the encoder to OUT/encoder.safetensors."""
    flags = {"backbone": backbone, "labels": labels, "out": out, "weights": weights, "tiny": tiny,
             "workers": workers, "address": address, "use_gpu": use_gpu}
    try:
        result = run_training(resolve_config(config, overrides, flags))
    except user_errors() as exc:  # bad input: say what, no traceback
        typer.echo(error_line(PROG, exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"done: {result}")


if __name__ == "__main__":
    app()
