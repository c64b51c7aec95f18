"""Time the DIP training step, the step as first written ("old") against the lean one ("new").

Both steps: query + positive images through the partly frozen encoder and the head, soft-NN over
each task's (1 + distractors) x N support patches, the in-context loss, backward, AdamW step.
  old: each task gathers its (S*N, E) support keys and normalises them (8x the M support images),
       int64 labels with range checks that wait for the device, AdamW for-each, no TF32.
  new: ``training.model.task_loss`` (support normalised once, then indexed per task), labels
       narrowed on the host (uint8/int16), no device waits, fused AdamW and TF32 on CUDA.
"Encoder" is the same images through the same encoder alone (forward + backward, a plain loss);
the fraction of the step outside the encoder is 1 - encoder / step. Each variant runs in its
own process, so its peak memory (CUDA max_memory_allocated, or peak RSS on a CPU) is its own.
Random init, random data.

    python benchmarks/bench_train_step.py --backbone vits14 --tiny --batch 8
    python benchmarks/bench_train_step.py --backbone vits14 --batch 8            # real size
    python benchmarks/bench_train_step.py --backbone vits14 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

from shared.devices import default_device
from training.config import TrainConfig
from training.episodes import sample_support
from training.incontext import incontext_loss, patchify_labels, soft_nn_predict
from training.loop import make_optimizer
from training.model import build_model, fast_matmul, label_dtype, peak_memory_bytes, task_loss

VARIANTS = ("old", "new")


def old_task_loss(model, query_images, query_labels, support_images, support_labels,
                  support_index, num_classes, patch_size, temperature=0.07):
    """The step's loss as first written: support keys gathered per task, then normalised."""
    b, s = support_index.shape
    feats = model(torch.cat([query_images, support_images]))  # (B+M,N,E)
    query, support = feats[:b], feats[b:]  # (B,N,E), (M,N,E)
    values = patchify_labels(support_labels, num_classes, patch_size)  # (M,N,C)
    n = support.shape[1]
    keys = support[support_index].reshape(b, s * n, -1)  # (B,S,N,E) -> (B,S*N,E)
    vals = values[support_index].reshape(b, s * n, -1)  # (B,S,N,C) -> (B,S*N,C)
    pred = soft_nn_predict(query, keys, vals, temperature)  # normalises B*S*N keys
    return incontext_loss(pred, query_labels, patch_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Best wall time in ms of each ``fns[name]()``, the functions taking turns.

    Taking turns and keeping the best: on shared CPUs other processes only ever add time, and
    they add it to every variant alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: min(t) for name, t in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_steps(args, model, device: torch.device, variants=VARIANTS) -> dict:
    """The step of each variant (and "encoder") as a function of no arguments, on random data."""
    torch.manual_seed(1)
    p, b = model.patch_size, args.batch
    images = torch.rand(2 * b, 3, args.crop, args.crop, device=device)  # queries then positives
    labels = torch.randint(0, args.classes, (2 * b, args.crop, args.crop), device=device)
    small = labels.to(label_dtype(args.classes))
    support = sample_support(b, args.distractors, torch.Generator().manual_seed(0)).to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    cfg = TrainConfig()
    trainable = [q for q in model.parameters() if q.requires_grad]
    losses = {
        "old": lambda: old_task_loss(model, images[:b], labels[:b], images[b:], labels[b:],
                                     support, args.classes, p),
        "new": lambda: task_loss(model, images[:b], small[:b], images[b:], small[b:], support,
                                 args.classes, p, check_labels=False),
    }
    optimizers = {
        "old": lambda: torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.betas),
        "new": lambda: make_optimizer(model, cfg, 10)[0],
    }
    matmul = {"old": contextlib.nullcontext, "new": lambda: fast_matmul(device)}

    def step_of(variant: str):
        optimizer = optimizers[variant]()

        def step() -> None:
            with matmul[variant](), autocast:
                loss = losses[variant]()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def encoder_step() -> None:
        with autocast:
            dense = model.encoder.dense_features(images)  # (2B,h,w,D)
            loss = dense.float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return {**{v: step_of(v) for v in variants}, "encoder": encoder_step}


def build(args, device: torch.device):
    torch.manual_seed(0)
    return build_model(args.backbone, weights=None, tiny=args.tiny, head_dim=args.head_dim,
                       device=device).train()


def measure_memory(args, variant: str) -> dict:
    """Peak memory of one variant's step, in this process (run it in a fresh one)."""
    device = torch.device(args.device)
    model = build(args, device)
    step = make_steps(args, model, device, (variant,))[variant]
    baseline = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    for _ in range(2):  # the second step has the optimizer state of the first
        step()
    _sync(device)
    return {"peak": peak_memory_bytes(device), "baseline": baseline}


def _child(argv: list[str], variant: str) -> dict:
    """``measure_memory`` in a fresh process, so that peak RSS belongs to this variant alone."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--memory-of", variant]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="vits14")
    parser.add_argument("--tiny", action="store_true", help="tiny variant of the backbone")
    parser.add_argument("--batch", type=int, default=8, help="tasks (queries) per step")
    parser.add_argument("--distractors", type=int, default=7)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000, help="pseudo-classes (K)")
    parser.add_argument("--head-dim", type=int, default=6144)
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--memory-of", choices=VARIANTS, help="print one variant's peak (JSON)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args, args.memory_of)))
        return

    memory = {variant: _child(argv, variant) for variant in VARIANTS}
    device = torch.device(args.device)
    model = build(args, device)
    ms = best_times(make_steps(args, model, device), device, args.warmup, args.repeats)
    size = "tiny" if args.tiny else "full"
    kind = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    print(f"backbone={args.backbone} ({size}, D={model.encoder.embed_dim}, random init) "
          f"device={device} threads={torch.get_num_threads()} batch={args.batch} tasks x "
          f"(1+{args.distractors}) support, crop={args.crop}, K={args.classes}, "
          f"head_dim={args.head_dim}, trainable params={trainable / 1e6:.2f}M, "
          f"best of {args.repeats}")
    print(f"| step | ms/step | tasks/s | {kind} MiB | of which the step MiB | outside encoder |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        peak, base = memory[variant]["peak"], memory[variant]["baseline"]
        print(f"| {variant} | {ms[variant]:.1f} | {args.batch * 1000 / ms[variant]:.2f} | "
              f"{peak / 2**20:.0f} | {(peak - base) / 2**20:.0f} | "
              f"{1 - ms['encoder'] / ms[variant]:.0%} |")
    print(f"| encoder alone (forward + backward) | {ms['encoder']:.1f} | | | | |")
    print(f"speed-up new / old: {ms['old'] / ms['new']:.2f}x")


if __name__ == "__main__":
    main()
