"""DiffCut stage by stage (VAE, UNet up to the hook, NCut, full-resolution assignment), and the
agreement of bfloat16-VAE segments with float32-VAE segments.

    python benchmarks/bench_diffcut.py --tiny --resolution 256 --images 8          # CPU smoke run
    python benchmarks/bench_diffcut.py --source segmind/SSD-1B --device cuda --images 64 --batch 16

Images are the procedural scenes of shared.synthetic (their own size, resized to the model's
square input). Agreement: the fraction of images whose token partitions are identical up to
relabelling, and the mean Rand index of the full-resolution maps (on a pixel subsample).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from labeling.ncut import batched_recursive_ncut
from labeling.segmenter import DiffCutSegmenter
from shared.devices import default_device
from shared.synthetic import make_scene


def rand_index(a: np.ndarray, b: np.ndarray, samples: int = 20000, seed: int = 0) -> float:
    """Fraction of random pixel pairs on which two label maps agree (same/different segment)."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, a.size, (2, samples))
    a, b = a.ravel(), b.ravel()
    return float(np.mean((a[i] == a[j]) == (b[i] == b[j])))


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if two label vectors group the tokens identically."""
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == len(torch.unique(a)) == len(torch.unique(b))


class Clock:
    """Accumulated wall time per stage, synchronising CUDA around each measurement."""

    def __init__(self, device: torch.device):
        self.device, self.total = device, {}

    def __call__(self, name, fn, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - start
        return out


def run(segmenter: DiffCutSegmenter, images: list[np.ndarray], batch: int, clock: Clock):
    """Token labels and full-resolution maps of all images, timing each stage."""
    ex = segmenter.extractor
    size = (ex.resolution, ex.resolution)
    labels, maps = [], []
    for lo in range(0, len(images), batch):
        chunk = images[lo : lo + batch]
        tensors = [torch.from_numpy(im).permute(2, 0, 1).float().div(255.0) for im in chunk]

        def prepare(ts=tensors):
            return torch.stack(
                [F.interpolate(t[None], size=size, mode="bilinear", antialias=True)[0] for t in ts]
            )

        x = clock("resize", prepare)
        z0 = clock("vae", ex.encode, x)
        noise = ex.noise.to(z0.device).expand_as(z0)
        zt = ex.alpha_bar**0.5 * z0 + (1 - ex.alpha_bar) ** 0.5 * noise
        tokens = clock("unet", lambda z=zt: F.normalize(ex.hooked_tokens(z).float(), dim=-1))
        lab = clock("ncut", batched_recursive_ncut, tokens, segmenter.tau, segmenter.alpha)
        for im, f, ll in zip(chunk, tokens, lab, strict=True):
            img, count = torch.from_numpy(im).to(ex.device), int(ll.max()) + 1
            maps.append(clock("assign", lambda i=img, f=f, ll=ll, c=count:
                              segmenter._full_resolution(i, f, ll, c).cpu().numpy()))
        labels.extend(lab.cpu())
    return labels, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="segmind/SSD-1B")
    parser.add_argument("--tiny", action="store_true", help="random-init tiny SDXL-style models")
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=480, help="side of the synthetic scenes")
    parser.add_argument(
        "--no-bf16", action="store_true", help="skip the bfloat16-VAE agreement run"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    images = [make_scene(seed, (args.size, args.size * 4 // 3))[0] for seed in range(args.images)]
    seg = DiffCutSegmenter(
        config={"model": args.source, "resolution": args.resolution}, tiny=args.tiny, device=device
    )
    run(seg, images[:1], 1, Clock(device))  # warm-up
    clock = Clock(device)
    labels, maps = run(seg, images, args.batch, clock)
    total = sum(clock.total.values())
    print(f"{args.images} images, batch {args.batch}, {args.resolution}px, device {device}, source "
          f"{seg.source}, UNet {seg.extractor.unet_dtype}, VAE {seg.extractor.vae_dtype}")  # fmt: skip
    print(f"{'stage':<8} {'s':>8} {'ms/image':>10} {'share':>7}")
    for name, sec in clock.total.items():
        print(f"{name:<8} {sec:8.2f} {1000 * sec / args.images:10.1f} {sec / total:7.1%}")
    print(
        f"{'total':<8} {total:8.2f} {1000 * total / args.images:10.1f}   ({args.images / total:.2f} images/s)"
    )
    print(f"segments per image: mean {np.mean([int(m.max()) + 1 for m in maps]):.1f}")
    if args.no_bf16:
        return
    ex = seg.extractor
    ex.vae, ex.vae_dtype = ex.vae.to(torch.bfloat16), torch.bfloat16
    labels_bf16, maps_bf16 = run(seg, images, args.batch, Clock(device))
    same = np.mean([same_partition(a, b) for a, b in zip(labels, labels_bf16, strict=True)])
    rand = np.mean([rand_index(a, b) for a, b in zip(maps, maps_bf16, strict=True)])
    print(
        f"bf16 VAE vs fp32 VAE: identical token partitions {same:.3f}, mean Rand index {rand:.4f}"
    )


if __name__ == "__main__":
    main()
