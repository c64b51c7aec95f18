"""The DIP demo: label -> train -> evaluate on built-in synthetic scenes, then a report.

    python -m demo.run                      # tiny random-init models, offline, a few minutes on a CPU
    python -m demo.run --models paper       # SSD-1B + DINOv2R from the hub, the paper's settings
    ray job submit --working-dir . -- python -m demo.run --out s3://bucket/demo

A local Ray is started unless ``--address`` (or RAY_ADDRESS) names a cluster. Everything is
written under ``--out`` (a local path or ``s3://...``): the scenes, the label set, the training
run, the evaluation, the resolved configs, the figures, ``report.md`` and ``report.json``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Annotated, Literal

import typer
from pydantic import Field

from shared.config import Config

app = typer.Typer(add_completion=False, help=__doc__)

BEFORE, AFTER = "before", "after"


class DemoConfig(Config):
    """What the demo runs; the stage configs are derived from it (see ``stage_configs``)."""

    models: Literal["tiny", "paper"] = "tiny"
    out: str = "runs/demo"
    address: str | None = None  # Ray cluster; default RAY_ADDRESS or a local Ray
    backbone: str = "vits14"
    train_images: int | None = Field(None, ge=8, description="default: 64 tiny, 512 paper")
    val_images: int | None = Field(None, ge=2, description="default: 16 tiny, 64 paper")
    image_size: int | None = Field(None, ge=32, description="scene side; default 128 tiny, 448 paper")
    classes: int | None = Field(None, ge=2, description="K; default 12 tiny, 64 paper")
    steps: int | None = Field(None, ge=1, description="tiny: target optimizer steps (default 300)")
    seed: int = 0

    def pick(self, field: str, tiny, paper):
        """The field's value, or the default of the chosen model size."""
        value = getattr(self, field)
        if value is not None:
            return value
        return tiny if self.models == "tiny" else paper


def join(*parts: str) -> str:
    from shared import storage

    return storage.join(*parts)


def paths(out: str) -> dict[str, str]:
    """Where each piece of a demo run lives under ``out``."""
    return {"data": join(out, "scenes"), "labels": join(out, "labels"),
            "train": join(out, "train"), "eval": join(out, "eval"),
            "init": join(out, "encoders", "init.safetensors"),
            "configs": join(out, "configs"), "figures": join(out, "figures")}


def stage_configs(demo: DemoConfig, num_pairs: int | None = None):
    """(LabelConfig, TrainConfig | None, EvalConfig) of a demo; the training config needs the
    label set's pair count (the tiny schedule is sized from it), so it is None until then.

    tiny: every size is scaled down for a CPU (our choice) and the learning rate raised so that a
    few hundred steps move the weights. paper: SSD-1B + DINOv2R from the hub and every per-image
    setting at the paper's value; only the dataset-scale knobs (images, K, bank size) are the demo's.
    """
    from evaluation.config import EvalConfig
    from labeling.config import LabelConfig
    from training.config import TrainConfig

    p = paths(demo.out)
    tiny = demo.models == "tiny"
    n_train = demo.pick("train_images", 64, 512)
    common = dict(backbone=demo.backbone, tiny=tiny, weights=p["init"] if tiny else "hub")
    label = LabelConfig(
        images=join(p["data"], "images", "train"), ground_truth=join(p["data"], "masks", "train"),
        out=p["labels"], classes=demo.pick("classes", 12, 64), seed=demo.seed, **common,
        **(dict(feature_size=112, shard_size=32, batch_size=16, kmeans_niter=20,
                diffcut={"resolution": 256, "tau": 0.65, "seed": demo.seed}) if tiny else {}))
    size = 112 if tiny else None  # None: the backbone's evaluation size (504 at /14)
    patches = (size // 14) ** 2 if tiny else (504 // 14) ** 2
    evaluation = EvalConfig(
        backbones=[demo.backbone], weights=[p["init"] if tiny else "hub"], tiny=tiny,
        datasets=["synthetic"], data_roots={"synthetic": p["data"]}, input_size=size,
        out=p["eval"], seed=demo.seed, ray_address=demo.address,
        # every augmented patch of the memory images fits: no sampling at demo scale
        memory={"size": n_train * patches * 2, "workers": 2 if tiny else None,
                "images_per_shard": 16 if tiny else 64, "loader_threads": 2 if tiny else 4},
        lowshot={"fractions": ["1"], "seeds": [42]})
    if num_pairs is None:
        return label, None, evaluation
    if tiny:
        batch = 16
        per_epoch = max(1, num_pairs // batch)
        train = TrainConfig(
            labels=p["labels"], out=p["train"], head_dim=256, resize=128, crop=112,
            batch_size=batch, micro_batch_size=batch, base_lr=3e-3 * 256 / batch,
            epochs=max(1, math.ceil(demo.pick("steps", 300, 300) / per_epoch)),
            loader_workers=0, cache_prepared=True, checkpoint_every=10_000, seed=demo.seed,
            **common)
    else:
        train = TrainConfig(labels=p["labels"], out=p["train"], seed=demo.seed, **common)
    return label, train, evaluation


def ensure_ray(address: str | None):
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=False)
    return ray


def write_scenes(demo: DemoConfig) -> None:
    """The built-in synthetic scenes (train = unlabeled images to label, val = queries)."""
    from shared import storage
    from shared.synthetic import write_synthetic_dataset

    root = paths(demo.out)["data"]
    if storage.exists(join(root, "classes.json")):  # written last: the set is complete
        return
    side = demo.pick("image_size", 128, 448)
    write_synthetic_dataset(root, num_train=demo.pick("train_images", 64, 512),
                            num_val=demo.pick("val_images", 16, 64), size=(side, side),
                            seed=demo.seed)


def write_initial_encoder(demo: DemoConfig) -> None:
    """tiny: the random-init encoder every stage starts from, saved once so all of them (and the
    Ray workers) load the very same weights."""
    import torch

    from shared import storage
    from shared.backbones import load_backbone, save_backbone

    uri = paths(demo.out)["init"]
    if demo.models != "tiny" or storage.exists(uri):
        return
    torch.manual_seed(demo.seed)
    save_backbone(load_backbone(demo.backbone, None, tiny=True, device="cpu"), uri)


def run_demo(demo: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every stage of the demo; returns the report dict (also report.json)."""
    import torch

    p = paths(demo.out)
    timings: dict[str, float] = {}
    threads = torch.get_num_threads()
    if demo.models == "tiny":
        # tiny models run many small kernels: one thread avoids stalling on every kernel when
        # another process holds a core (Ray's CPU workers already run with one thread each)
        torch.set_num_threads(1)
    try:
        return _run_stages(demo, p, timings, log)
    finally:
        torch.set_num_threads(threads)


def _run_stages(demo: DemoConfig, p: dict[str, str], timings: dict[str, float],
                log: Callable[[str], None]) -> dict:
    from evaluation.benchmark import run_benchmark
    from labeling.pipeline import run_labeling
    from shared.config import save_config
    from shared.labelset import LabelSet
    from training.run import run_training

    from .report import write_report

    def timed(name: str, fn, *args, **kwargs):
        log(f"demo: {name} ...")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 2)
        log(f"demo: {name} done in {timings[name]:.1f}s")
        return result

    save_config(demo, join(p["configs"], "demo.yaml"))
    label_cfg, _, eval_cfg = stage_configs(demo)
    timed("scenes", write_scenes, demo)
    write_initial_encoder(demo)
    ensure_ray(demo.address)
    save_config(label_cfg, join(p["configs"], "labeling.yaml"))
    summary = timed("labeling", run_labeling, label_cfg, address=demo.address, progress=False)
    labels = LabelSet(p["labels"])
    _, train_cfg, _ = stage_configs(demo, labels.pairs().num_rows)
    save_config(train_cfg, join(p["configs"], "training.yaml"))
    trained = timed("training", run_training, train_cfg)
    encoder_uri = join(p["train"], "encoder.safetensors")
    eval_cfg = eval_cfg.model_copy(update={"weights": [eval_cfg.weights[0], encoder_uri]})
    save_config(eval_cfg, join(p["configs"], "evaluation.yaml"))
    timed("evaluation", run_benchmark, eval_cfg, log=lambda m: None)
    report = timed("report", write_report, demo, labels, summary, trained, eval_cfg, train_cfg,
                   timings)
    return report


@app.command()
def main(
    models: Annotated[str, typer.Option(help="tiny: random-init, offline; paper: SSD-1B + DINOv2R from the hub")] = "tiny",
    out: Annotated[str, typer.Option(help="output URI (local path or s3://...)")] = "runs/demo",
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS or a local Ray)")] = None,
    train_images: Annotated[int | None, typer.Option(help="scenes to label (default 64 tiny, 512 paper)")] = None,
    val_images: Annotated[int | None, typer.Option(help="query scenes (default 16 tiny, 64 paper)")] = None,
    image_size: Annotated[int | None, typer.Option(help="scene side in pixels")] = None,
    classes: Annotated[int | None, typer.Option(help="K, the number of pseudo-classes")] = None,
    steps: Annotated[int | None, typer.Option(help="tiny: optimizer steps (about)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the scenes, models and runs")] = 0,
) -> None:
    """Label, post-train and evaluate an encoder on synthetic scenes; print where the report is."""
    from pydantic import ValidationError

    try:
        demo = DemoConfig(models=models, out=out, address=address, train_images=train_images,
                          val_images=val_images, image_size=image_size, classes=classes,
                          steps=steps, seed=seed)
    except ValidationError as exc:
        typer.echo(f"demo.run: {exc}", err=True)
        raise typer.Exit(2) from None
    report = run_demo(demo, log=lambda m: typer.echo(m, err=True))
    miou = report["in_context_miou"]
    typer.echo(f"in-context mIoU before post-training: {100 * miou[BEFORE]:.2f}")
    typer.echo(f"in-context mIoU after post-training:  {100 * miou[AFTER]:.2f}")
    quality = report["pseudo_labels"].get("quality") or {}
    if quality:
        typer.echo(f"pseudo-label quality: hungarian mIoU {100 * quality['hungarian_miou']:.2f}, "
                   f"majority mIoU {100 * quality['majority_miou']:.2f}")
    typer.echo(f"report: {report['report_md']}")


if __name__ == "__main__":
    app()
