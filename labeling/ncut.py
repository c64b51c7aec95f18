"""Recursive normalized cut (Shi & Malik) on token features, as DiffCut uses it.

For one image with tokens F (N, C), L2-normalised:
    W = F F^T, min-max normalised over the whole matrix, then W ** alpha.
For a region (a set of tokens): A = W restricted to it, d = row sums of A, u = second-smallest
eigenvector of I - D^-1/2 A D^-1/2, y = D^-1/2 u, sign flipped so the largest |y| is positive;
100 thresholds linspace(0.99 min y, 0.99 max y); partition x = y > t; NCut(x) = cut/assoc(x) +
cut/assoc(not x); keep the best. If the best NCut < tau the region splits and both sides recurse
(positive side first), otherwise it is a leaf; a region of <= 1 token is a leaf. Segment ids are
the leaves numbered in depth-first order, positive side first.

This module is the one callers import: the public API, the batched recursion and the threshold
scoring. The rest lives by concern:
- `ncut_reference`: `reference_recursive_ncut`, the straightforward algorithm (one region at a
  time, full `eigh`, a Python loop over thresholds), and the rules both versions share;
- `ncut_affinity`: W;
- `ncut_solver`: the Fiedler vectors of many regions at once (block inverse iteration on
  M = L + 4 q q^T, factored in float32, with float64 Davidson corrections; leaves proven by a
  float64 Cholesky of M - tau I; a direct solver for small regions) and `NCutWorkspace`;
- `ncut_lapack`: the platform's kernels and `NCutOptions`, which choose them.
`batched_recursive_ncut` gives the reference's partitions faster:
- every pending region of every image is processed in one round, bucketed by size into
  zero-padded batches (padded rows are decoupled: zero affinity, Laplacian diagonal 3);
  children start the iterative solver from their parent's Ritz vectors;
- the 100 thresholds are scored at once: affinities summed per (row, threshold bin), then prefix
  sums over the bins give every cut with no cancellation, O(n^2) instead of O(100 n^2).
On the CPU, F F^T (BLAS syrk), Cholesky, its solves, the skinny products and the direct
eigensolver go through SciPy/NumPy's OpenBLAS by default (`NCutOptions(cpu_linalg="torch")`
takes torch.linalg instead); other devices use torch. The batch's Gram products run first, back
to back, on BLAS's own threads; the solver then holds that BLAS to one thread (its idle threads
would spin against torch's). On a GPU the host waits for the device once per batch of regions
and per solver step, never per region or image (region bookkeeping uses index tensors, the
leaves are numbered on the device). The large buffers live in an `NCutWorkspace`, which a caller
keeps across batches so that their memory is first-touched once. The sign rule and the
first-minimum rule make both versions choose alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from labeling.ncut_affinity import affinity_matrix, minmax_power, mirror_lower, unit_rows
from labeling.ncut_lapack import (
    DIRECT_MAX_SIZE,
    EIGH_MAX_SIZE,
    GRAM_BLOCK,
    Linalg,
    NCutOptions,
    ScipyLinalg,
    TorchLinalg,
)
from labeling.ncut_reference import (
    DEG_EPS,
    NUM_THRESHOLDS,
    SIGN_TIE_RTOL,
    THRESHOLD_SCALE,
    flip_sign,
    labels_from_leaves,
    reference_best_split,
    reference_recursive_ncut,
)
from labeling.ncut_solver import (
    BLOCK_SIZE,
    CORRECTED,
    DEFLATION_SHIFT,
    FACTOR_DTYPE,
    FIRST_STEPS,
    MIN_SHIFT_GAP,
    PAD_EIGENVALUE,
    REFACTOR_STEPS,
    WARM_STEPS,
    NCutWorkspace,
    fiedler_vectors,
    select_rows,
)

__all__ = [
    "BLOCK_SIZE", "CORRECTED", "DEFLATION_SHIFT", "DEG_EPS", "DIRECT_MAX_SIZE", "EIGH_MAX_SIZE",
    "FACTOR_DTYPE", "FIRST_STEPS", "GRAM_BLOCK", "MIN_SHIFT_GAP", "NUM_THRESHOLDS",
    "PAD_EIGENVALUE", "REFACTOR_STEPS", "ROW_BIN_MIN_SIZE", "SIGN_TIE_RTOL", "SIZE_STEP",
    "THRESHOLD_SCALE", "WARM_STEPS", "Linalg", "NCutOptions", "NCutWorkspace", "ScipyLinalg",
    "TorchLinalg", "affinity_matrix", "batched_recursive_ncut", "best_split", "fiedler_vectors",
    "flip_sign", "recursive_ncut", "reference_best_split", "reference_recursive_ncut",
    "thresholds",
]  # fmt: skip

ROW_BIN_MIN_SIZE = 256  # larger regions group the rows by bin before summing the cuts
SIZE_STEP = 64  # larger regions are zero-padded up to a multiple of this to share a batch


def recursive_ncut(
    features: Tensor, tau: float = 0.5, alpha: float = 10.0, options: NCutOptions | None = None
) -> Tensor:
    """Recursive NCut of one image's (N, C) tokens -> (N,) segment ids 0..S-1 (depth-first order)."""
    if features.ndim != 2:
        raise ValueError(
            f"recursive_ncut expects (N, C) features, got shape {tuple(features.shape)}"
        )
    return batched_recursive_ncut(features[None], tau=tau, alpha=alpha, options=options)[0]


def batched_recursive_ncut(
    features: Tensor,
    tau: float = 0.5,
    alpha: float = 10.0,
    max_batch_elements: int = 1 << 25,
    workspace: NCutWorkspace | None = None,
    options: NCutOptions | None = None,
) -> Tensor:
    """Recursive NCut of (B, N, C) tokens, all pending regions of all images at once -> (B, N) ids.

    `workspace` keeps the large buffers between calls (pass the same one for every batch of a
    stream: the memory is then first touched once, not once per batch); a fresh one by default.
    `options` choose how it computes (the default: SciPy's kernels on the CPU), never the ids.
    """
    if features.ndim != 3:
        raise ValueError(
            f"batched_recursive_ncut expects (B, N, C) features, got shape {tuple(features.shape)}"
        )
    b, n, _ = features.shape
    workspace = NCutWorkspace() if workspace is None else workspace
    linalg = (NCutOptions() if options is None else options).linalg_for(features.device)
    w = workspace.get("affinities", (b, n, n), torch.float64, features.device)
    grams = None
    for i, f in enumerate(features):  # per image, as affinity_matrix: same bits in any batch
        unit = unit_rows(f)
        if grams is None:
            grams = workspace.get("grams", (b, n, n), unit.dtype, unit.device)
        linalg.lower_gram(unit, out=grams[i])  # back to back, with as many BLAS threads as it has
    with linalg.solver_threads():
        for i in range(b):
            minmax_power(mirror_lower(grams[i]), alpha, out=w[i])
        return _recursive_splits(w, tau, max_batch_elements, workspace, linalg).to(features.device)


def _recursive_splits(
    w: Tensor, tau: float, max_batch_elements: int, workspace: NCutWorkspace, linalg: Linalg
) -> Tensor:
    """The rounds of `batched_recursive_ncut` on (B, N, N) affinities -> (B, N) ids.

    A region is (image, path, token ids, warm start: the parent's Ritz vectors on its tokens).
    """
    b, n, _ = w.shape
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(n, BLOCK_SIZE, generator=gen, dtype=w.dtype).to(w.device)  # fixed per token
    leaves: list[list] = [[] for _ in range(b)]
    pending = [(i, (), torch.arange(n, device=w.device), None) for i in range(b)]
    while pending:  # one round = every pending region of every image, bucketed by size
        buckets: dict[int, list] = {}
        for region in pending:
            if len(region[2]) <= 1:
                leaves[region[0]].append(region[1:3])
            else:
                buckets.setdefault(_bucket_size(len(region[2])), []).append(region)
        pending = []
        for size, regions in sorted(buckets.items()):
            chunk = max(1, max_batch_elements // (size * size))
            for lo in range(0, len(regions), chunk):
                group = regions[lo : lo + chunk]
                best, positive, block = _split_regions(w, group, start, tau, workspace, linalg)
                pending += _children(group, best < tau, positive, block, leaves)
    return torch.stack([labels_from_leaves(leaves[i], n) for i in range(b)])


def _bucket_size(n: int) -> int:
    """Padded size for a region of n tokens: the next multiple of SIZE_STEP."""
    return -(-n // SIZE_STEP) * SIZE_STEP


def _split_regions(
    w: Tensor, regions: list, start: Tensor, tau: float, workspace: NCutWorkspace, linalg: Linalg
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Best 2-way cut of each (image, path, token ids, warm start) region -> (best NCut, positive, block)."""
    iterative = max(len(reg[2]) for reg in regions) > linalg.direct_max_size
    a, valid, block = _gather_regions(w, regions, start if iterative else None, workspace)
    warm_all = all(reg[3] is not None for reg in regions)
    steps = WARM_STEPS if warm_all else FIRST_STEPS
    y, d, leaf, block = fiedler_vectors(
        a, valid, block, tau, steps, workspace=workspace, linalg=linalg
    )
    best = torch.full_like(y[:, 0], float("inf"))
    positive = torch.zeros_like(valid)
    todo = (~leaf).nonzero()[:, 0]
    if todo.numel():
        subset = (select_rows(x, todo) for x in (y, a, d, valid))
        best[todo], positive[todo] = best_split(*subset, workspace=workspace)
    return best, positive, block


def _gather_regions(
    w: Tensor, regions: list, start: Tensor | None, workspace: NCutWorkspace
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Zero-padded affinities, token masks and (with `start`) solver starts of the regions -> (A, valid, block).

    A is (R, n, n) with n the largest region; whole images at the first level are W itself (or
    its rows). The block (R, n, k) holds `start` on each region's tokens, the parent's Ritz
    vectors over all but the first, fixed, column when the region has them; None without `start`.
    """
    r, n, full = len(regions), max(len(reg[2]) for reg in regions), w.shape[-1]
    valid = torch.zeros(r, n, dtype=torch.bool, device=w.device)
    images = [reg[0] for reg in regions]
    if n == full and images == list(range(w.shape[0])):  # every whole image: the first level
        a = w
    elif n == full:
        a = w.index_select(0, torch.tensor(images, device=w.device))
    else:
        a = workspace.get("affinity", (r, n, n), w.dtype, w.device)
    block = None  # (R, n, k) starts of the iterative solver; the direct solver needs none
    if start is not None:
        block = torch.zeros(r, n, start.shape[1], dtype=w.dtype, device=w.device)
    for i, (img, _, idx, warm) in enumerate(regions):
        m = len(idx)
        valid[i, :m] = True
        if block is not None:
            block[i, :m] = start[idx]
            if warm is not None:  # the parent's Ritz vectors on these tokens, plus one fixed column
                block[i, :m, 1:] = warm
        if n != full:  # W[idx][:, idx]: whole rows first, then the columns straight into A
            rows = workspace.get("rows", (m, full), w.dtype, w.device)
            torch.index_select(w[img], 0, idx, out=rows)
            torch.gather(rows, 1, idx[None, :].expand(m, m), out=a[i, :m, :m])
            a[i, :m, m:] = 0.0
            a[i, m:] = 0.0
    return a, valid, block


def _children(
    group: list, split: Tensor, positive: Tensor, block: Tensor | None, leaves: list[list]
) -> list:
    """The two sides of each splitting region of `group`, as new regions; the others join `leaves`.

    One host wait for the whole group: which regions split and the size c of each positive
    side. A stable sort of the (R, n) tokens by side lists the positive side first, each side in
    token order (what a boolean mask selects), so the children's token ids and warm starts are
    gathered with index tensors and never visit the host.
    """
    sizes = torch.where(split, positive.sum(dim=1), -1).tolist()  # (R,), -1: a leaf
    order = None  # (R, n): positive side, negative side, then padding (positions >= m)
    if max(sizes) >= 0:
        order = torch.argsort((~positive).to(torch.uint8), dim=1, stable=True)
    children = []
    for i, ((img, path, idx, _), c) in enumerate(zip(group, sizes, strict=True)):
        if c < 0:
            leaves[img].append((path, idx))
            continue
        m = len(idx)
        warm = None if block is None else block[i, :m, 1:]
        for side, rows in ((0, order[i, :c]), (1, order[i, c:m])):
            children.append((img, (*path, side), idx[rows], None if warm is None else warm[rows]))
    return children


def thresholds(lo: Tensor, hi: Tensor, steps: int = NUM_THRESHOLDS) -> Tensor:
    """Rows of linspace(lo, hi, steps) for (R,) bounds -> (R, steps); exact at both ends."""
    step = ((hi - lo) / (steps - 1))[:, None]
    i = torch.arange(steps, device=lo.device, dtype=lo.dtype)[None, :]
    low_half = lo[:, None] + i * step
    high_half = hi[:, None] - (steps - 1 - i) * step
    return torch.where(i < steps // 2, low_half, high_half)


def best_split(
    y: Tensor, a: Tensor, d: Tensor, valid: Tensor, workspace: NCutWorkspace | None = None
) -> tuple[Tensor, Tensor]:
    """min over the 100 thresholds of cut/assoc(y>t) + cut/assoc(y<=t) -> (best NCut (R,), y > t* (R, n)).

    Token i lies above threshold j exactly when j < bin_i, bin_i = #{j : t_j < y_i} (0..100).
    The affinities are first summed per (row, column bin), one pass over A; prefix sums over the
    column bins then give each row's weight to {bin <= j}, and cut_j adds those of the rows in
    bins > j (`_cuts`). Every cut is a sum of non-negative terms (no cancellation; an empty bin
    adds exact zeros, so thresholds that cut the same sets get the same value), and the cost is
    O(n^2 + 100 n) instead of O(100 n^2).
    """
    steps = NUM_THRESHOLDS
    inf = torch.full_like(y[:, 0], float("inf"))
    lo = torch.where(valid, y, inf[:, None]).amin(dim=-1)
    hi = torch.where(valid, y, -inf[:, None]).amax(dim=-1)
    t = thresholds(THRESHOLD_SCALE * lo, THRESHOLD_SCALE * hi)  # (R, 100)
    # t is sorted (each half is monotone, and the halves meet in order even after rounding), so a
    # binary search counts #{j : t_j < y_i} exactly
    bins = torch.searchsorted(t, y.contiguous())  # (R, n) in 0..100
    bins = torch.where(valid, bins, steps + 1)  # padding: a bin of its own, never counted
    cut = _cuts(a, bins, NCutWorkspace() if workspace is None else workspace)  # (R, 100)
    r = y.shape[0]
    deg = a.new_zeros(r, steps + 2).scatter_add_(1, bins, d)[:, : steps + 1]  # (R, 101)
    count = bins.new_zeros(r, steps + 2).scatter_add_(1, bins, valid.to(bins.dtype))[:, : steps + 1]
    assoc_rest = deg.cumsum(dim=-1)[:, :steps]  # (R, 100): degree of {bin <= j}
    assoc = deg.flip(-1).cumsum(dim=-1).flip(-1)[:, 1:]  # degree of {bin > j}, no subtraction
    n_rest = count.cumsum(dim=-1)[:, :steps]
    n_above = valid.sum(dim=-1, keepdim=True) - n_rest  # token counts are exact
    ncut = cut / assoc + cut / assoc_rest
    usable = (n_above > 0) & (n_rest > 0) & ~ncut.isnan()
    ncut = torch.where(usable, ncut, inf[:, None])
    best_t = ncut.argmin(dim=-1, keepdim=True)  # first minimum, like the reference's strict "<"
    positive = (bins > best_t) & valid
    return ncut.gather(1, best_t)[:, 0], positive


def _cuts(a: Tensor, bins: Tensor, workspace: NCutWorkspace) -> Tensor:
    """cut_j = weight between {bin > j} and {bin <= j} for each of the 100 thresholds -> (R, 100).

    `bins` (R, n) holds each token's bin, 0..100, padding 101. Larger regions group the rows by
    bin too (suffix sums over 102 row bins instead of masked sums over n rows).
    """
    r, n = bins.shape
    steps = NUM_THRESHOLDS
    # weight from each row to each column bin: (R, n, n) -> (R, n, 102)
    by_bin = workspace.get("bins", (r, n, steps + 2), a.dtype, a.device).zero_()
    by_bin.scatter_add_(2, bins[:, None, :].expand(r, n, n), a)
    if n > ROW_BIN_MIN_SIZE:  # weight from each row bin to each column bin: (R, 102, 102)
        pairs = a.new_zeros(r, steps + 2, steps + 2)
        pairs.scatter_add_(1, bins[:, :, None].expand(r, n, steps + 2), by_bin)
        lower = pairs[:, :, :steps].cumsum(dim=2)  # (R, 102, 100): to column bins <= j
        from_above = lower.flip(1).cumsum(dim=1).flip(1)  # (R, 102, 100): from row bins >= b
        return from_above[:, 1 : steps + 1].diagonal(dim1=1, dim2=2)  # (R, 100): row bins > j
    lower = by_bin[..., :steps].cumsum_(dim=-1)  # (R, n, 100): weight to {k : bin_k <= j}
    above = bins[:, :, None] > torch.arange(steps, device=bins.device)  # (R, n, 100)
    return lower.mul_(above).sum(dim=1)  # (R, 100); padding rows (bin 101) carry no weight
