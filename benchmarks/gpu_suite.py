"""Every GPU figure from one offline command: labeling, training, input and search, one table.

    timeout 540 python benchmarks/gpu_suite.py --out /tmp/gpu     # full size, one GPU, < 8 min
    python benchmarks/gpu_suite.py --smoke --out /tmp/gpu-smoke    # tiny sizes on a CPU, < 3 min

Nothing is downloaded: the SSD-1B UNet, the SDXL VAE and its schedule are built from the
diffusers configs in benchmarks/configs/, the DINOv2R encoders by timm with pretrained=False,
all with random weights (the same FLOPs and kernels as the trained models); the training label
set, the images and the memory bank are synthetic. Each part has a time budget, a hard limit
(a part past it fails alone) and the suite a total budget (parts beyond it are skipped). A part
that fails writes its error in its row and the next part runs. Out: ``gpu_suite.json`` (every
number, the environment, the sizes) and ``gpu_suite.md`` (the table) in the --out folder.
``--smoke`` runs the same parts, the same code paths (device synchronisation, dtype choices,
the faiss backend) at tiny sizes on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # the project and the other benchmark modules

import torch  # noqa: E402
from gpu_measure import peak_memory_gib, reset_peak_memory, sync  # noqa: E402
from gpu_report import environment, render_markdown  # noqa: E402

JSON_NAME, MARKDOWN_NAME = "gpu_suite.json", "gpu_suite.md"
NOTES = (
    "Weights are random (models built from benchmarks/configs/*.json and timm with "
    "pretrained=False): FLOPs and time per call equal the trained models'; segment counts, and "
    "with them the actor's cut and assignment times, do not.",
    "FLOPs are counted with torch's FlopCounterMode (attention included); 'of peak' divides the "
    "achieved TFLOP/s by the GPU's dense data-sheet peak in the precision the part computes in.",
)


@dataclass(frozen=True)
class Sizes:
    """Every size and budget of one suite run."""

    mode: str
    tiny: bool  # tiny variants of the timm encoders
    unet_config: str
    vae_config: str
    resolution: int  # DiffCut's square input
    label_batch: int  # images per DiffCut batch (the segmenter's batch_size)
    ncut_batch: int
    ncut_grid: int
    ncut_channels: int
    encoders: tuple[str, ...]
    encoder_batch: int
    feature_size: int  # the encoders' labeling input side
    actor_images: int  # images per segmented shard
    actor_image_scale: int  # the COCO-like image sizes divided by this
    actor_threads: int  # decode / PNG threads of the actor
    actor_encoder: str
    train_backbones: tuple[str, ...]
    train_images: int
    train_height: int
    train_width: int
    pairs_per_image: int
    resize: int
    crop: int
    head_dim: int
    train_batch: int  # effective batch: tasks per optimizer step
    micro_batch: int
    train_steps: int  # at least 4: the first and last intervals are not timed
    loader_workers: int
    bank_patches: int
    bank_dim: int
    bank_shard: int
    queries: int
    budget_s: float  # timed calls of a part go on until this much time is spent
    part_limit_s: float  # a part running longer fails
    total_s: float  # parts starting later than this are skipped
    scheduler_config: str = "sdxl_scheduler.json"


FULL = Sizes(
    mode="full", tiny=False, unet_config="ssd1b_unet.json", vae_config="sdxl_vae.json",
    resolution=1024, label_batch=8, ncut_batch=64, ncut_grid=32, ncut_channels=1280,
    encoders=("vits14", "vitb14", "vitl14"), encoder_batch=32, feature_size=448,
    actor_images=32, actor_image_scale=1, actor_threads=4, actor_encoder="vits14",
    train_backbones=("vits14", "vitb14"), train_images=512, train_height=256, train_width=320,
    pairs_per_image=3, resize=256, crop=224, head_dim=6144, train_batch=384, micro_batch=32,
    train_steps=6, loader_workers=4, bank_patches=10_240_000, bank_dim=384,
    bank_shard=1_048_576, queries=32_768, budget_s=10.0, part_limit_s=150.0, total_s=450.0)
SMOKE = Sizes(
    mode="smoke", tiny=True, unet_config="tiny_unet.json", vae_config="tiny_vae.json",
    resolution=256, label_batch=2, ncut_batch=4, ncut_grid=16, ncut_channels=64,
    encoders=FULL.encoders, encoder_batch=2, feature_size=112, actor_images=4,
    actor_image_scale=8, actor_threads=2, actor_encoder="vits14",
    train_backbones=FULL.train_backbones, train_images=16, train_height=64, train_width=80,
    pairs_per_image=3, resize=64, crop=56, head_dim=64, train_batch=8, micro_batch=8,
    train_steps=4, loader_workers=0, bank_patches=20_000, bank_dim=384, bank_shard=8192,
    queries=256, budget_s=0.2, part_limit_s=90.0, total_s=170.0)


@dataclass
class Part:
    name: str
    group: str  # parts of a group share the context's cache; it is emptied between groups
    what: str
    run: Callable[[Context], dict[str, Any]]


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    work: str
    budget: float
    cache: dict[str, Any] = field(default_factory=dict)


def parts(sizes: Sizes) -> list[Part]:
    """The suite's parts, in the order they run."""
    from gpu_parts import part_actor, part_encoder, part_ncut, part_unet, part_vae
    from gpu_parts_train import part_data_path, part_search, part_train

    s = sizes
    encoders = [Part(f"encoder_{name}", "labeling",
                     f"{name} dense + global features at {s.feature_size} px, fp32, batch "
                     f"{s.encoder_batch}", lambda ctx, name=name: part_encoder(ctx, name))
                for name in s.encoders]
    trains = [Part(f"train_{name}", "training",
                   f"DIP steps of {name}: {s.train_batch} tasks per step in micro-batches of "
                   f"{s.micro_batch}, packed input, bf16 on a GPU",
                   lambda ctx, name=name: part_train(ctx, name)) for name in s.train_backbones]
    bank = f"{s.bank_patches:,} x {s.bank_dim} bank"
    return [
        Part("ncut_batched", "labeling", f"batched recursive NCut, {s.ncut_batch} images of "
             f"{s.ncut_grid}x{s.ncut_grid} x {s.ncut_channels} tokens per call", part_ncut),
        Part("unet_to_hook", "labeling", f"UNet to the hooked layer, {s.resolution} px input, "
             f"batch {s.label_batch}", part_unet),
        Part("vae_fp32", "labeling", f"VAE encoder at {s.resolution} px, float32",
             lambda ctx: part_vae(ctx, torch.float32)),
        Part("vae_bf16", "labeling", f"VAE encoder at {s.resolution} px, bfloat16",
             lambda ctx: part_vae(ctx, torch.bfloat16)),
        *encoders,
        Part("segment_actor", "labeling", f"segment_shard of {s.actor_images} JPEG scenes: "
             f"decode, DiffCut, cut, assignment, {s.actor_encoder}, pooling, PNG, commit",
             part_actor),
        *trains,
        Part("data_path", "training", "packed input alone: loader workers + host-to-device "
             "moves, no model", part_data_path),
        Part("search_torch_fp32", "search", f"exact top-30, torch float32, {bank}",
             lambda ctx: part_search(ctx, "torch", "float32")),
        Part("search_auto", "search", f"exact top-30, the evaluation's default backend, {bank}",
             lambda ctx: part_search(ctx, "auto")),
        Part("search_faiss", "search", f"exact top-30, faiss flat (GPU index when faiss has "
             f"GPU support), {bank}", lambda ctx: part_search(ctx, "faiss")),
    ]


class PartTimeout(Exception):
    """A part ran past its hard limit."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise PartTimeout in this (main) thread once ``seconds`` have passed; a call into C
    (one kernel, one LAPACK call) finishes before it is raised."""
    def expire(signum, frame):
        raise PartTimeout(f"ran past its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe(exc: BaseException) -> str:
    """One line: the exception, its message, and the line of code that raised it."""
    text = " ".join(str(exc).split()) or repr(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" [{Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""
    return f"{type(exc).__name__}: {text[:600]}{where}"


def release(ctx: Context) -> None:
    """Drop what the last group's parts shared, and give the device's memory back."""
    ctx.cache.clear()
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run_part(part: Part, ctx: Context, limit: float) -> dict[str, Any]:
    """One part's row: its numbers, or the error that stopped it."""
    row: dict[str, Any] = {"part": part.name, "what": part.what}
    reset_peak_memory(ctx.device)
    start = time.perf_counter()
    try:
        with deadline(limit):
            row.update(part.run(ctx))
            sync(ctx.device)
    except Exception as exc:  # the next part runs whatever this one did
        traceback.print_exc()
        row["error"] = describe(exc)
    row["seconds"] = time.perf_counter() - start
    if "memory_gib" not in row and "skipped" not in row:
        row["memory_gib"] = peak_memory_gib(ctx.device)
    return row


def run_suite(selected: list[Part], ctx: Context, log=print) -> list[dict[str, Any]]:
    """Every selected part in order, within the suite's total budget."""
    rows, start, group = [], time.perf_counter(), None
    for part in selected:
        if part.group != group:
            release(ctx)
            group = part.group
        left = ctx.sizes.total_s - (time.perf_counter() - start)
        if left < min(30.0, ctx.sizes.part_limit_s):
            rows.append({"part": part.name, "what": part.what, "skipped":
                         f"the suite's total budget of {ctx.sizes.total_s:.0f} s was spent",
                         "result": "skipped: total budget spent"})
            continue
        log(f"[gpu_suite] {part.name}: {part.what}", file=sys.stderr, flush=True)
        rows.append(run_part(part, ctx, min(ctx.sizes.part_limit_s, left)))
        row = rows[-1]
        log(f"[gpu_suite] {part.name}: {row.get('error') or row.get('result')} "
            f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
    release(ctx)
    return rows


def select(all_parts: list[Part], only: str | None) -> list[Part]:
    if not only:
        return all_parts
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {p.name for p in all_parts}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"gpu_suite.py: error: unknown part(s) {', '.join(unknown)} in --only; "
                         f"known: {', '.join(p.name for p in all_parts)}")
    return [p for p in all_parts if p.name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json and .md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on a CPU by default")
    parser.add_argument("--device", default=None,
                        help="default: cuda when present (cpu with --smoke)")
    parser.add_argument("--only", default=None, help="comma-separated part names")
    parser.add_argument("--workdir", default=None, help="synthetic data (default: a temp dir)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach for the hub
    sizes = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke
                                          else "cpu"))
    selected = select(parts(sizes), args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-", dir=args.workdir) as work:
        ctx = Context(device, sizes, work, sizes.budget_s)
        rows = run_suite(selected, ctx)
    report = {"suite": "dip-gpu-suite/1", "mode": sizes.mode,
              "command": " ".join(["python", "benchmarks/gpu_suite.py", *argv]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
              "total_s": time.time() - started, "environment": environment(device),
              "notes": list(NOTES), "sizes": dataclasses.asdict(sizes), "parts": rows}
    (out / JSON_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = render_markdown(report)
    (out / MARKDOWN_NAME).write_text(markdown)
    print(markdown)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
