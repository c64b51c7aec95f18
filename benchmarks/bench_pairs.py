"""Pairs stage at scale: global-feature k-NN (exact or IVF) and vectorised pair selection.

    python benchmarks/bench_pairs.py --images 100000 --threads 1
    python benchmarks/bench_pairs.py --images 100000 --method ivf --nprobe 32

Features are seeded synthetic CLS-like vectors: ``--clusters`` Gaussian centres (0: structureless
noise) plus per-image noise ``--spread`` times as large, L2-normalised by the search. Recall@k is measured against a float64
brute-force search of ``--queries`` sampled images (1.0 expected for the exact method). The class
table is synthetic too: ``--per-image`` classes out of ``--classes`` per image, drawn from a pool
shared by the images of one cluster so that neighbours share classes, with Dirichlet areas.
CPU time is the process's (``time.process_time``), so it counts every thread; peak RSS is the
process's maximum resident set so far (features included).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from labeling.pairs import METHODS, nearest_neighbours, select_pairs


def synthetic_features(n: int, dim: int, clusters: int, spread: float, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, cluster of each image (N,)): centres plus noise, seeded.

    ``spread`` is the noise's scale relative to the centres': the larger, the more the clusters
    overlap and the harder an approximate search.
    """
    rng = np.random.default_rng(seed)
    label = rng.integers(0, max(clusters, 1), n)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if clusters:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        x *= spread
        for a in range(0, n, 1 << 16):  # in place, so the peak RSS is the search's, not ours
            x[a : a + (1 << 16)] += centres[label[a : a + (1 << 16)]]
    return x, label


def synthetic_classes(label: np.ndarray, per_image: int, classes: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class table columns (image, class id, area) with ``per_image`` classes per image."""
    rng = np.random.default_rng(seed + 1)
    n = len(label)
    pools = rng.permuted(np.tile(np.arange(classes), (label.max() + 1, 1)), axis=1)
    pool = pools[label, : 2 * per_image]  # (N, 2c) the cluster's classes
    pick = np.argsort(rng.random((n, 2 * per_image)), axis=1)[:, :per_image]  # c of the 2c
    cls = np.take_along_axis(pool, pick, axis=1)  # (N, c) distinct classes
    area = rng.dirichlet(np.ones(per_image), n).astype(np.float32)  # (N, c) sums to 1
    image = np.repeat(np.arange(n), per_image)
    order = rng.permutation(len(image))  # the table may come in any order
    return image[order], cls.reshape(-1)[order], area.reshape(-1)[order]


def brute_force(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k (Q, k) of the sampled queries in float64, self excluded, ties -> lower index."""
    xt = torch.nn.functional.normalize(torch.as_tensor(x), dim=1, eps=1e-12) + 0.0
    xn = xt.numpy().astype(np.float64)
    out = []
    for a in range(0, len(queries), 256):
        q = queries[a : a + 256]
        s = xn[q] @ xn.T  # (q, N)
        s[np.arange(len(q)), q] = -np.inf
        part = np.argpartition(-s, k + 8, axis=1)[:, : k + 8]  # a margin for the tie order
        vals = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -vals), axis=1)[:, :k]
        out.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true neighbours present in the found lists (order ignored)."""
    hits = (found[:, :, None] == truth[:, None, :]).any(1).sum()
    return float(hits) / truth.size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed(fn, *args, **kwargs):
    """(result, wall s, CPU s) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--method", choices=METHODS, default="exact")
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--device", default=None)
    ap.add_argument("--clusters", type=int, default=1000, help="0: structureless Gaussian noise")
    ap.add_argument("--spread", type=float, default=0.8, help="noise scale relative to centres")
    ap.add_argument("--queries", type=int, default=1000, help="sampled queries for recall")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-image", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    rss_start = peak_rss_mb()  # the interpreter with torch loaded
    x, label = synthetic_features(args.images, args.dim, args.clusters, args.spread, args.seed)
    rss_start = max(rss_start, peak_rss_mb())
    nn, wall, cpu = timed(nearest_neighbours, x, args.k, device=args.device, block=args.block,
                          method=args.method, nprobe=args.nprobe)
    rss_search = peak_rss_mb()
    rng = np.random.default_rng(args.seed + 2)
    sample = np.sort(rng.choice(args.images, min(args.queries, args.images), replace=False))
    rec = recall(nn[sample], brute_force(x, sample, args.k))
    table = synthetic_classes(label, args.per_image, args.classes, args.seed)
    pairs, swall, scpu = timed(select_pairs, nn, *table)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"features {x.nbytes / 2**20:.0f} MiB, class table {len(table[0]):,} rows, "
          f"peak RSS before the search (features made) {rss_start:.0f} MiB")
    print("| method | N | D | k | wall s | CPU s | peak RSS MiB | recall@k | select wall s "
          "| select CPU s | pairs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    extra = f" nprobe {args.nprobe}" if args.method == "ivf" else ""
    extra += f", clusters {args.clusters} spread {args.spread}" if args.clusters else ", noise"
    print(f"| {args.method}{extra} | {args.images:,} | {args.dim} | {args.k} | {wall:.2f} | "
          f"{cpu:.2f} | {rss_search:.0f} | {rec:.4f} | {swall:.2f} | {scpu:.2f} | "
          f"{len(pairs['query']):,} |")


if __name__ == "__main__":
    main()
