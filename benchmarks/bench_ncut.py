"""Recursive normalized cut: straightforward reference vs. the batched solver, same inputs.

    python benchmarks/bench_ncut.py --batch 16 --device cpu --threads 1

Inputs are synthetic token maps shaped like DiffCut's (32 x 32 tokens x 1280 channels,
L2-normalised): a few spatially coherent objects sharing a common component, some made of two
parts, smooth low-frequency variation and token noise, which gives 8 to 20 segments per image at
tau = 0.5, alpha = 10. The reference runs one image and one region at a time (full eigh per node,
a Python loop over the 100 thresholds); ours runs `batched_recursive_ncut` on the whole batch.
Times are wall-clock and process CPU time (the better of --repeats runs each, interleaved), since
other jobs on a shared machine inflate wall-clock time.

Measured on a shared 2-core AMD EPYC (AVX-512), torch 2.14.1 with MKL, SciPy 1.17 with OpenBLAS,
the workspace kept across calls as the segmenter keeps it. One thread:
    python benchmarks/bench_ncut.py --batch 16 --threads 1 --repeats 3
    reference 13.5-15.5 s, batched 1.25-1.46 s (140-163 segments/s): 10.3x-11.6x over six runs,
    identical label maps 16/16 (204 segments). With --repeats 2: seeds 1-4 9.5x-11.2x, tau 0.4
    9.5x-10.3x, tau 0.6 10.3x-10.4x, C=256 with alpha 8 11.3x-12.6x (two sweeps); --torch-linalg
    (no SciPy; the path other devices take) 8.5x; --fresh-workspace 9.2x-10.4x; all identical.
    Both threads (no --threads): reference 10.3-10.7 s, batched 1.23-1.29 s: 8.3x-8.4x. The
    reference's large full eigh uses the second core inside LAPACK; the batched solver's many
    small LAPACK calls cannot (OpenBLAS at two threads makes it 2x slower), only its Gram
    products and torch's operations do.
Of the batched ~1.35 s: the affinity (F F^T by BLAS syrk, which the reference pays too) ~0.3,
the float32 Cholesky factorisations ~0.2, their solves ~0.16, the direct one-vector eigensolver on
small regions ~0.14, threshold scoring ~0.15 (half of it the one scatter over each A), the
float64 products M v ~0.11, gathering sub-affinities ~0.08, building M ~0.05; the rest is
Rayleigh-Ritz, QR and per-region bookkeeping.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from labeling.ncut import (
    NCutOptions,
    NCutWorkspace,
    batched_recursive_ncut,
    reference_recursive_ncut,
)


def synthetic_diffcut_features(
    batch: int, grid: int = 32, channels: int = 1280, seed: int = 0
) -> torch.Tensor:
    """(batch, grid*grid, channels) L2-normalised tokens with object, part and smooth structure."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, grid), torch.linspace(-1, 1, grid), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1)  # (N, 2)
    common = F.normalize(torch.randn(channels, generator=g), dim=0)
    out = []
    for _ in range(batch):
        k = int(torch.randint(4, 10, (1,), generator=g))
        seeds = torch.rand(k, 2, generator=g) * 2 - 1
        warp = torch.eye(2) + 0.4 * torch.randn(k, 2, 2, generator=g)
        dist = torch.stack([((pos - seeds[i]) @ warp[i]).norm(dim=-1) for i in range(k)], dim=-1)
        region = dist.argmin(dim=-1)  # (N,) object of each token: warped Voronoi cells
        cent = F.normalize(
            0.8 * common + F.normalize(torch.randn(k, channels, generator=g), dim=-1), dim=-1
        )
        normal = F.normalize(torch.randn(k, 2, generator=g), dim=-1)
        side = ((pos - seeds[region]) * normal[region]).sum(dim=-1) > 0  # two parts per object
        strength = 0.2 + 0.5 * torch.rand(k, generator=g)
        part_dir = F.normalize(torch.randn(k, channels, generator=g), dim=-1)
        feats = cent[region] + (strength[region] * side)[:, None] * part_dir[region]
        freq = torch.randn(6, 2, generator=g) * 2.5
        phase = torch.rand(6, generator=g) * 2 * math.pi
        waves = torch.cos(pos @ freq.T + phase)  # (N, 6) smooth spatial fields
        feats = feats + 0.35 * waves @ (torch.randn(6, channels, generator=g) / channels**0.5)
        feats = feats + 0.45 * torch.randn(grid * grid, channels, generator=g) / channels**0.5
        out.append(F.normalize(feats, dim=-1))
    return torch.stack(out)


def canonical(labels: torch.Tensor) -> torch.Tensor:
    """Relabel segments by first appearance, so equal partitions give equal tensors."""
    _, first = torch.unique(labels, return_inverse=True)
    order = torch.full((int(first.max()) + 1,), labels.numel(), dtype=torch.long)
    order.scatter_reduce_(0, first, torch.arange(labels.numel()), reduce="amin")
    rank = torch.empty_like(order)
    rank[order.argsort()] = torch.arange(len(order))
    return rank[first]


def timed(fn, device: torch.device) -> tuple[object, float, float]:
    """Run fn -> (result, wall seconds, process CPU seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels", type=int, default=1280)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: leave the default)"
    )
    parser.add_argument(
        "--fresh-workspace",
        action="store_true",
        help="a new workspace for every call (default: one kept across calls, as the segmenter does)",
    )
    parser.add_argument(
        "--torch-linalg",
        action="store_true",
        help="batched solver with torch.linalg on the CPU too (as on other devices), not SciPy's LAPACK",
    )
    args = parser.parse_args()
    options = NCutOptions(cpu_linalg="torch" if args.torch_linalg else "scipy")
    if args.threads:  # torch's BLAS and SciPy's LAPACK (used by the batched solver on the CPU)
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    device = torch.device(args.device)
    feats = synthetic_diffcut_features(args.batch, args.grid, args.channels, args.seed).to(device)
    workspace = NCutWorkspace()  # the segmenter keeps one for all its batches

    def batched() -> torch.Tensor:
        kept = NCutWorkspace() if args.fresh_workspace else workspace
        return batched_recursive_ncut(feats, args.tau, args.alpha, workspace=kept, options=options)

    batched()  # warm-up: library initialisation, and the workspace of a batch stream
    reference_recursive_ncut(feats[0], args.tau, args.alpha, options=options)

    best = {"reference": (math.inf, math.inf), "batched": (math.inf, math.inf)}
    for _ in range(args.repeats):
        ours, wall, cpu = timed(batched, device)
        best["batched"] = (min(best["batched"][0], wall), min(best["batched"][1], cpu))
        ref, wall, cpu = timed(
            lambda: torch.stack(
                [reference_recursive_ncut(f, args.tau, args.alpha, options=options) for f in feats]
            ),
            device,
        )
        best["reference"] = (min(best["reference"][0], wall), min(best["reference"][1], cpu))

    ours, ref = ours.cpu(), ref.cpu()
    segments = int((ref.amax(dim=1) + 1).sum())
    identical = (ours == ref).all(dim=1).float().mean().item()
    same_partition = sum(
        bool((canonical(a) == canonical(b)).all()) for a, b in zip(ours, ref, strict=True)
    )
    print(
        f"B={args.batch} tokens={args.grid}x{args.grid} C={args.channels} device={device} "
        f"threads={torch.get_num_threads()} tau={args.tau} alpha={args.alpha} "
        f"linalg={'torch' if args.torch_linalg else 'scipy-lapack'} "
        f"workspace={'fresh' if args.fresh_workspace else 'kept'}"
    )
    print(f"segments per image: {(ref.amax(dim=1) + 1).tolist()}")
    print(f"{'method':<10} {'wall s':>8} {'cpu s':>8} {'seg/s (wall)':>13} {'seg/s (cpu)':>12}")
    for name, (wall, cpu) in best.items():
        print(f"{name:<10} {wall:8.2f} {cpu:8.2f} {segments / wall:13.1f} {segments / cpu:12.1f}")
    (rw, rc), (bw, bc) = best["reference"], best["batched"]
    print(f"speed-up: {rw / bw:.1f}x wall, {rc / bc:.1f}x cpu")
    print(
        f"identical label maps: {identical:.3f}; identical partitions: {same_partition / args.batch:.3f}"
    )


if __name__ == "__main__":
    main()
