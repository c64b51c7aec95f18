"""Time one DIP training step against the same step of the backbone alone.

DIP step: query + positive images through the partly frozen encoder and the head, soft-NN over
each task's (1 + distractors) x N support patches, the in-context loss, backward.
Backbone step: the same images through the same encoder (same frozen blocks), a plain loss on the
dense features, backward: no head, no support attention. Random init, random data.

    python benchmarks/bench_train_step.py --backbone vits14 --tiny --batch 8
    python benchmarks/bench_train_step.py --backbone vits14 --batch 8            # real size
    python benchmarks/bench_train_step.py --backbone vits14 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from training.episodes import sample_support
from training.model import build_model, task_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="vits14")
    parser.add_argument("--tiny", action="store_true", help="tiny variant of the backbone")
    parser.add_argument("--batch", type=int, default=8, help="tasks (queries) per step")
    parser.add_argument("--distractors", type=int, default=7)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000, help="pseudo-classes (K)")
    parser.add_argument("--head-dim", type=int, default=6144)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.backbone, weights=None, tiny=args.tiny, head_dim=args.head_dim,
                        device=device).train()
    p = model.patch_size
    b = args.batch
    images = torch.rand(2 * b, 3, args.crop, args.crop, device=device)  # queries then positives
    labels = torch.randint(0, args.classes, (2 * b, args.crop, args.crop), device=device)
    support = sample_support(b, args.distractors, torch.Generator().manual_seed(0)).to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def dip_step() -> None:
        with autocast:
            loss = task_loss(model, images[:b], labels[:b], images[b:], labels[b:], support,
                             args.classes, p, temperature=0.07)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def backbone_step() -> None:
        with autocast:
            dense = model.encoder.dense_features(images)  # (2B,h,w,D)
            loss = dense.float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    dip_ms = time_step(dip_step, device, args.warmup, args.repeats)
    base_ms = time_step(backbone_step, device, args.warmup, args.repeats)
    size = "tiny" if args.tiny else "full"
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    print(f"backbone={args.backbone} ({size}, D={model.encoder.embed_dim}, random init) "
          f"device={device} threads={torch.get_num_threads()} batch={b} tasks x "
          f"(1+{args.distractors}) support, crop={args.crop}, K={args.classes}, "
          f"head_dim={args.head_dim}, trainable params={trainable / 1e6:.2f}M")
    print("| step | images/step | ms/step | images/s |")
    print("|---|---|---|---|")
    for name, ms in (("DIP (encoder + head + soft-NN + loss)", dip_ms),
                     ("backbone alone (forward + backward)", base_ms)):
        print(f"| {name} | {2 * b} | {ms:.1f} | {2 * b * 1000 / ms:.1f} |")
    print(f"ratio DIP / backbone: {dip_ms / base_ms:.2f}")


if __name__ == "__main__":
    main()
