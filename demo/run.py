"""The DIP demo: label -> train -> evaluate on built-in synthetic scenes, then a report.

    python -m demo.run                      # tiny models, offline, a few minutes on a CPU
    python -m demo.run --models paper       # SSD-1B + DINOv2R from the hub, the paper's settings
    ray job submit --working-dir . -- python -m demo.run --out s3://bucket/demo

One initial encoder is post-trained three times, once per label source, and all four are
evaluated on the same benchmark:

    diffcut    pseudo-labels of the labeling service (DiffCut segments, K-means pseudo-classes)
    classical  the same service with the classical Felzenszwalb segmenter
    oracle     the scenes' ground truth imported as a label set (labeling.import): the upper
               bound of the post-training machinery

With tiny models the initial encoder is the shipped tiny base (demo/weights/, made by
``python -m demo.pretrain`` without labels), so that pseudo-classes over its features mean
something, as they do over a pretrained DINOv2R. A local Ray is started unless ``--address`` (or
RAY_ADDRESS) names a cluster. Everything is written under ``--out`` (a local path or
``s3://...``): the scenes, the label sets, the training runs, the evaluation, the resolved
configs, the figures, ``report.md`` and ``report.json``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import typer
from pydantic import Field, model_validator

from shared.config import Config

app = typer.Typer(add_completion=False, help=__doc__)

BEFORE, AFTER = "before", "after"
SOURCES = ("diffcut", "classical", "oracle")
Source = Literal["diffcut", "classical", "oracle"]
# The tiny base encoders shipped with the demo (python -m demo.pretrain), by backbone.
BASE_WEIGHTS = {"vits14": Path(__file__).parent / "weights" / "vits14-tiny-base.safetensors"}


class DemoConfig(Config):
    """What the demo runs; the stage configs are derived from it (see ``label_config`` etc.)."""

    models: Literal["tiny", "paper"] = "tiny"
    out: str = "runs/demo"
    address: str | None = None  # Ray cluster; default RAY_ADDRESS or a local Ray
    backbone: str = "vits14"
    base: Literal["pretrained", "random"] = Field(
        "pretrained", description="tiny: the shipped pretrained tiny base, or a random init")
    sources: list[Source] = Field(default_factory=lambda: list(SOURCES),
                                  description="label sources to post-train on")
    train_images: int | None = Field(None, ge=8, description="default: 256 tiny, 512 paper")
    val_images: int | None = Field(None, ge=2, description="default: 64")
    image_size: int | None = Field(None, ge=32, description="scene side; default 128 tiny, 448 paper")
    classes: int | None = Field(None, ge=2, description="K; default 12 tiny, 64 paper")
    steps: int | None = Field(None, ge=1, description="tiny: target optimizer steps (default 600)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DemoConfig:
        if not self.sources:
            raise ValueError("sources: name at least one of " + ", ".join(SOURCES))
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources: each source once, got {self.sources}")
        if self.models == "tiny" and self.base == "pretrained" and self.backbone not in BASE_WEIGHTS:
            raise ValueError(f"base: no tiny base is shipped for backbone {self.backbone!r} (only "
                             f"{', '.join(BASE_WEIGHTS)}); use base: random")
        return self

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
    """Where each piece of a demo run lives under ``out`` (per source: ``labels/<source>``,
    ``train/<source>``)."""
    return {"data": join(out, "scenes"), "labels": join(out, "labels"),
            "train": join(out, "train"), "eval": join(out, "eval"),
            "init": join(out, "encoders", "init.safetensors"),
            "configs": join(out, "configs"), "figures": join(out, "figures")}


def encoder_uri(out: str, source: str) -> str:
    """The encoder post-trained on ``source``'s labels."""
    return join(paths(out)["train"], source, "encoder.safetensors")


def initial_weights(demo: DemoConfig) -> str:
    """The weights every stage starts from: the saved initial encoder (tiny) or the hub's."""
    return paths(demo.out)["init"] if demo.models == "tiny" else "hub"


def label_config(demo: DemoConfig, source: str):
    """The LabelConfig (diffcut, classical) or ImportConfig (oracle) of one label source.

    tiny: every size is scaled down for a CPU (our choice). paper: SSD-1B + DINOv2R from the hub
    and every per-image setting at the paper's value; only the dataset-scale knobs (images, K)
    are the demo's.
    """
    from labeling.config import LabelConfig
    from labeling.importing import ImportConfig

    p = paths(demo.out)
    tiny = demo.models == "tiny"
    common = dict(backbone=demo.backbone, tiny=tiny, weights=initial_weights(demo),
                  out=join(p["labels"], source), seed=demo.seed,
                  images=join(p["data"], "images", "train"),
                  **(dict(feature_size=112, shard_size=64, batch_size=16) if tiny else {}))
    if source == "oracle":
        return ImportConfig(masks=join(p["data"], "masks", "train"), **common)
    return LabelConfig(
        ground_truth=join(p["data"], "masks", "train"), classes=demo.pick("classes", 12, 64),
        segmenter="felzenszwalb" if source == "classical" else "diffcut", **common,
        **(dict(kmeans_niter=20, diffcut={"resolution": 256, "tau": 0.65, "seed": demo.seed})
           if tiny else {}))


def train_config(demo: DemoConfig, source: str, num_pairs: int):
    """The TrainConfig of post-training on ``source``'s label set of ``num_pairs`` pairs.

    tiny: batch 16, lr raised so that a few hundred steps move the weights, and every block of the
    4-block tiny encoder trainable (the paper's last 3 of 12 keep most of a DINOv2R frozen; with 3
    of 4 the oracle gain measured 3.8 points against 5.2 with all 4). paper: the paper's settings.
    """
    from shared.backbones import TINY_ARGS
    from training.config import TrainConfig

    p = paths(demo.out)
    common = dict(labels=join(p["labels"], source), out=join(p["train"], source),
                  backbone=demo.backbone, weights=initial_weights(demo), seed=demo.seed)
    if demo.models != "tiny":
        return TrainConfig(**common)
    batch = 16
    per_epoch = max(1, num_pairs // batch)
    return TrainConfig(
        tiny=True, head_dim=256, resize=128, crop=112, batch_size=batch, micro_batch_size=batch,
        base_lr=1e-2 * 256 / batch, trainable_blocks=TINY_ARGS["depth"],
        epochs=max(1, math.ceil(demo.pick("steps", 600, 600) / per_epoch)),
        loader_workers=0, cache_prepared=True, checkpoint_every=10_000, **common)


def eval_config(demo: DemoConfig, weights: list[str]):
    """The EvalConfig scoring ``weights`` (the initial encoder first) on the validation scenes."""
    from evaluation.config import EvalConfig

    p = paths(demo.out)
    tiny = demo.models == "tiny"
    size = 112 if tiny else None  # None: the backbone's evaluation size (504 at /14)
    patches = (size // 14) ** 2 if tiny else (504 // 14) ** 2
    n_train = demo.pick("train_images", 256, 512)
    return EvalConfig(
        backbones=[demo.backbone] * len(weights), weights=weights, tiny=tiny,
        datasets=["synthetic"], data_roots={"synthetic": p["data"]}, input_size=size,
        out=p["eval"], seed=demo.seed, ray_address=demo.address,
        # every augmented patch of the memory images fits: no sampling at demo scale
        memory={"size": n_train * patches * 2, "workers": 2 if tiny else None,
                "images_per_shard": 32 if tiny else 64, "loader_threads": 2 if tiny else 4},
        lowshot={"fractions": ["1"], "seeds": [42]})


def ensure_ray(address: str | None):
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray sized to this machine."""
    from shared.ray_init import ensure_ray as connect

    return connect(address, num_cpus=max(2, os.cpu_count() or 2))


def write_scenes(demo: DemoConfig) -> None:
    """The built-in synthetic scenes (train = unlabeled images to label, val = queries)."""
    from shared import storage
    from shared.synthetic import write_synthetic_dataset

    root = paths(demo.out)["data"]
    if storage.exists(join(root, "classes.json")):  # written last: the set is complete
        return
    side = demo.pick("image_size", 128, 448)
    write_synthetic_dataset(root, num_train=demo.pick("train_images", 256, 512),
                            num_val=demo.pick("val_images", 64, 64), size=(side, side),
                            seed=demo.seed)


def write_initial_encoder(demo: DemoConfig) -> None:
    """tiny: the encoder every stage starts from (the shipped base, or a seeded random init),
    saved once under ``out`` so that all of them (and the Ray workers) load the very same weights."""
    import torch

    from shared import storage
    from shared.backbones import load_backbone, save_backbone

    uri = paths(demo.out)["init"]
    if demo.models != "tiny" or storage.exists(uri):
        return
    base = str(BASE_WEIGHTS[demo.backbone]) if demo.base == "pretrained" else None
    torch.manual_seed(demo.seed)
    save_backbone(load_backbone(demo.backbone, base, tiny=True, device="cpu"), uri)


def run_demo(demo: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every stage of the demo; returns the report dict (also report.json)."""
    import torch

    threads = torch.get_num_threads()
    if demo.models == "tiny":
        # tiny models run many small kernels: one thread avoids stalling on every kernel when
        # another process holds a core (Ray's CPU workers already run with one thread each)
        torch.set_num_threads(1)
    try:
        return _run_stages(demo, log)
    finally:
        torch.set_num_threads(threads)


def _label(demo: DemoConfig, source: str) -> dict:
    from labeling.importing import import_labels
    from labeling.pipeline import run_labeling

    cfg = label_config(demo, source)
    if source == "oracle":
        return import_labels(cfg)
    return run_labeling(cfg, address=demo.address, progress=False)


def _run_stages(demo: DemoConfig, log: Callable[[str], None]) -> dict:
    from evaluation.benchmark import run_benchmark
    from shared.config import save_config
    from shared.labelset import LabelSet
    from training.run import run_training

    from .report import write_report

    p = paths(demo.out)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        log(f"demo: {name} ...")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 2)
        log(f"demo: {name} done in {timings[name]:.1f}s")
        return result

    save_config(demo, join(p["configs"], "demo.yaml"))
    timed("scenes", write_scenes, demo)
    write_initial_encoder(demo)
    ensure_ray(demo.address)
    summaries, trained = {}, {}
    for source in demo.sources:
        save_config(label_config(demo, source), join(p["configs"], f"labeling-{source}.yaml"))
        summaries[source] = timed(f"labeling ({source})", _label, demo, source)
    for source in demo.sources:
        cfg = train_config(demo, source, LabelSet(join(p["labels"], source)).pairs().num_rows)
        save_config(cfg, join(p["configs"], f"training-{source}.yaml"))
        trained[source] = timed(f"training ({source})", run_training, cfg)
    weights = [initial_weights(demo)] + [encoder_uri(demo.out, s) for s in demo.sources]
    eval_cfg = eval_config(demo, weights)
    save_config(eval_cfg, join(p["configs"], "evaluation.yaml"))
    timed("evaluation", run_benchmark, eval_cfg, log=lambda m: None)
    return timed("report", write_report, demo, summaries, trained, eval_cfg, timings)


@app.command()
def main(
    models: Annotated[str, typer.Option(help="tiny: tiny models, offline; paper: SSD-1B + DINOv2R from the hub")] = "tiny",
    out: Annotated[str, typer.Option(help="output URI (local path or s3://...)")] = "runs/demo",
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS or a local Ray)")] = None,
    base: Annotated[str, typer.Option(help="tiny: pretrained (the shipped tiny base) or random")] = "pretrained",
    sources: Annotated[str, typer.Option(help="label sources, comma-separated")] = ",".join(SOURCES),
    train_images: Annotated[int | None, typer.Option(help="scenes to label (default 256 tiny, 512 paper)")] = None,
    val_images: Annotated[int | None, typer.Option(help="query scenes (default 64)")] = None,
    image_size: Annotated[int | None, typer.Option(help="scene side in pixels")] = None,
    classes: Annotated[int | None, typer.Option(help="K, the number of pseudo-classes")] = None,
    steps: Annotated[int | None, typer.Option(help="tiny: optimizer steps per training (about)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the scenes, models and runs")] = 0,
) -> None:
    """Label, post-train and evaluate an encoder on synthetic scenes; print where the report is."""
    from pydantic import ValidationError

    try:
        demo = DemoConfig(models=models, out=out, address=address, base=base,
                          sources=[s.strip() for s in sources.split(",") if s.strip()],
                          train_images=train_images, val_images=val_images,
                          image_size=image_size, classes=classes, steps=steps, seed=seed)
    except ValidationError as exc:
        typer.echo(f"demo.run: {exc}", err=True)
        raise typer.Exit(2) from None
    report = run_demo(demo, log=lambda m: typer.echo(m, err=True))
    typer.echo("in-context mIoU (%) of the same initial encoder, before and after post-training:")
    for source, row in report["post_training"].items():
        typer.echo(f"  {source:<10} before {_pct(row[BEFORE])}  after {_pct(row[AFTER])}  "
                   f"gain {_pct(row['gain'])}")
    typer.echo(f"report: {report['report_md']}")


def _pct(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:6.2f}"


if __name__ == "__main__":
    app()
