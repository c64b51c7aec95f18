"""Query/positive pairs: global-feature nearest neighbours filtered by a shared pseudo-class.

Pure functions on NumPy columns (no I/O, no Ray): ``nearest_neighbours`` finds the 5 most
cosine-similar other images of every image, ``select_pairs`` keeps the (query, neighbour) pairs
where one pseudo-class covers more than 5% of both images. Both are sized for ImageNet
(1.28M images): the exact search never holds an N x N matrix, and the selection works on the
class table in column form with sorts and searches instead of a Python loop per row.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from shared.devices import default_device

METHODS = ("exact", "ivf")
_GROUP = 32  # elements per group in the two-stage top-k (a power of two; see _block_topk)
_MARGIN = 3  # extra float32 candidates per row, for rounding near the k-th similarity


def nearest_neighbours(
    features: np.ndarray,
    k: int = 5,
    device: str | torch.device | None = None,
    block: int | None = None,
    method: str = "exact",
    nprobe: int = 32,
) -> np.ndarray:
    """Indices (N, k) int64 of the k most cosine-similar other rows of ``features`` (N, D).

    Self is excluded by index wherever it ranks (an exact duplicate may outrank it); with N <= k
    the missing neighbours are -1.

    ``method="exact"`` (default), in torch on ``device`` (CUDA when given or available, else the
    CPU): exact duplicate rows are merged first; blocked float32 matrix products, each block pair
    of X X^T computed once and merged into the running top-k of both its row blocks, screen
    k + 3 candidates per row; those are re-scored in float64 and the best k kept, equal
    similarities ranking the lower index first. A matrix product rounds the same dot product
    differently at different places in a block, hence the merging of duplicates and the
    re-scoring: the result is the same for every block size and run, unless more than 3 other
    rows lie within float32 rounding (~1e-7) of a row's k-th similarity. Memory is bounded by
    ``block`` (a block x block score matrix; default 4096 on the CPU, 16384 on CUDA), never
    N x N. Cost: N^2 D / 2 multiply-adds, about 70 CPU-seconds for 10^5 x 384 on one core
    (benchmarks/bench_pairs.py); one thread per process gives the most neighbours per
    CPU-second on a busy machine.

    ``method="ivf"``: approximate, faiss IndexIVFFlat (inner product, nlist about 4 sqrt(N),
    ``nprobe`` lists visited per query), on the CPU. Choose it only for N in the millions without
    a GPU: its cost grows as N^1.5 instead of N^2 (at 10^5 it already takes about half the CPU
    time of the exact search). Recall depends on how clustered the features are: recall@5 at
    10^5 images and nprobe 32 is 0.996-1.0 on well-separated synthetic clusters, 0.42 on barely
    separated ones and 0.16 on structureless noise (benchmarks/bench_pairs.py); measure it on a
    sample of the real features before relying on it. Ties are not ordered by index.
    """
    if method not in METHODS:
        raise ValueError(f"nearest_neighbours: method must be one of {METHODS}, got {method!r}")
    if k < 1:
        raise ValueError(f"nearest_neighbours: k must be >= 1, got {k}")
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"global features must be (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("global features contain NaN or infinite values")
    if len(x) == 0:
        return np.zeros((0, k), np.int64)
    if method == "ivf":
        return _ivf_neighbours(x, k, nprobe)
    dev = default_device(device)
    if block is None:
        block = 16384 if dev.type == "cuda" else 4096
    if block < 1:
        raise ValueError(f"nearest_neighbours: block must be >= 1, got {block}")
    xt = torch.as_tensor(x, dtype=torch.float32).to(dev)
    xt = F.normalize(xt, dim=1, eps=1e-12).add_(0.0)  # adding 0.0 turns -0.0 into 0.0 (dedup)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 would change which neighbours win
    try:
        uniq, inv, members = _dedup(xt, k + 1)
        cand = _block_search(uniq, k + _MARGIN, block)  # (U, k + margin) unique row indices
        return _rescore(uniq, inv, members, cand, k).cpu().numpy()
    finally:
        torch.set_float32_matmul_precision(precision)


def _dedup(x: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge identical rows: (unique rows (U, D), row -> unique (N,), first ``keep`` rows (U, keep)).

    Unique rows are ordered by their first row; members ascend and are padded with -1.
    """
    n = len(x)
    groups = _row_groups(x)  # (N,) ids, equal ids <=> identical rows
    if int(groups.max()) + 1 == n:  # no duplicates: every row is its own group
        rows = torch.arange(n, device=x.device)[:, None]  # (N, 1)
        return x, rows[:, 0], torch.cat([rows, rows.new_full((n, keep - 1), -1)], 1)
    first = torch.full((int(groups.max()) + 1,), n, device=x.device)
    first = first.scatter_reduce(0, groups, torch.arange(n, device=x.device), "amin")  # (G,)
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=x.device)
    inv = rank[groups]  # (N,) unique index, in order of first appearance
    count = torch.bincount(inv)
    rows = torch.argsort(inv, stable=True)  # rows grouped by unique, ascending within
    pos = torch.arange(n, device=x.device) - (torch.cumsum(count, 0) - count)[inv[rows]]
    sel = pos < keep
    members = torch.full((len(count), keep), -1, dtype=torch.long, device=x.device)
    members[inv[rows][sel], pos[sel]] = rows[sel]
    return x[first[order]], inv, members


def _row_hash(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """A 64-bit hash (N,) of each row's bits; identical rows hash alike."""
    gen = torch.Generator().manual_seed(0)
    mult = torch.randint(1, 2**62, (x.shape[1],), generator=gen).to(x.device) | 1  # (D,) odd
    bits = x.view(torch.int32)
    # integer sums wrap and do not depend on the order of summation
    return torch.cat([(bits[a : a + chunk].long() * mult).sum(1) for a in range(0, len(x), chunk)])


def _row_groups(x: torch.Tensor) -> torch.Tensor:
    """Group id per row, equal exactly when the rows are bit-identical (hash, then checked)."""
    _, groups = torch.unique(_row_hash(x), return_inverse=True)  # (N,)
    first = torch.full((len(x),), len(x), device=x.device)
    first = first.scatter_reduce(0, groups, torch.arange(len(x), device=x.device), "amin")
    shared = torch.bincount(groups)[groups] > 1  # only rows sharing a hash need checking
    if not bool((x[shared] == x[first[groups[shared]]]).all()):
        _, groups = torch.unique(x, dim=0, return_inverse=True)  # a hash collision: exact path
    return groups


def _block_search(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Top-k (N, k) of L2-normalised rows x (N, D) over the upper block triangle of X X^T."""
    n = len(x)
    group = _group_size(block)
    padded = -(-n // group) * group
    best_v = x.new_full((n, k), -math.inf)  # (N, k) running top-k similarities
    best_i = torch.full((n, k), -1, dtype=torch.long, device=x.device)
    buf = x.new_empty(min(block, padded) ** 2)
    starts = range(0, n, block)
    for bi, r0 in enumerate(starts):
        r1 = min(r0 + block, n)
        for c0 in starts[bi:]:
            c1 = min(c0 + block, n)
            s = _scores(x, r0, r1, c0, c1, group, buf)  # (Rp, Cp)
            if c0 == r0:
                s.diagonal()[: r1 - r0].fill_(-math.inf)  # self, whatever its similarity
            v, i = _block_topk(s, k, group, dim=1)  # (Rp, <=k) best columns of each row
            _merge_into(best_v, best_i, r0, r1, v, i + c0, k)
            if c0 != r0:  # the transposed block: the same scores seen from the column images
                v, i = _block_topk(s, k, group, dim=0)  # (Cp, <=k)
                _merge_into(best_v, best_i, c0, c1, v, i + r0, k)
    best_i[torch.isinf(best_v)] = -1  # fewer than k other rows
    return best_i


def _rescore(uniq: torch.Tensor, inv: torch.Tensor, members: torch.Tensor, cand: torch.Tensor,
             k: int, chunk: int = 1024) -> torch.Tensor:
    """Best k other rows (N, k) of each row from its own and its candidates' duplicate groups.

    Similarities are recomputed in float64 (float32 products are exact there, so rounding is
    left at the 1e-16 level), then ordered by (similarity desc, row asc).
    """
    n = len(inv)
    out = []
    for a in range(0, n, chunk):
        u = inv[a : a + chunk]  # (B,)
        grp = torch.cat([u[:, None], cand[u]], 1)  # (B, 1 + k') own group first
        valid = grp >= 0
        grp = grp.clamp(min=0)
        own = uniq[u].double()[:, None, :]  # (B, 1, D)
        sim = torch.bmm(own, uniq[grp].double().transpose(1, 2))[:, 0]  # (B, 1 + k')
        sim = sim.masked_fill(~valid, -math.inf)
        mem = members[grp]  # (B, 1 + k', keep) rows of each group
        rows = torch.arange(a, a + len(u), device=u.device)[:, None, None]
        drop = (mem < 0) | (mem == rows) | ~valid[:, :, None]  # padding, self, no candidate
        sim = sim[:, :, None].expand(mem.shape).masked_fill(drop, -math.inf)
        v, i = _best(sim.flatten(1), mem.masked_fill(drop, -1).flatten(1), k)  # (B, k)
        out.append(i.masked_fill(torch.isinf(v), -1))
    res = torch.cat(out)
    return F.pad(res, (0, k - res.shape[1]), value=-1)


def _group_size(block: int) -> int:
    """The largest power of two <= _GROUP dividing ``block`` (1 for odd blocks)."""
    group = _GROUP
    while block % group:
        group //= 2
    return group


def _scores(x: torch.Tensor, r0: int, r1: int, c0: int, c1: int, group: int,
            buf: torch.Tensor) -> torch.Tensor:
    """Cosine scores of rows r0:r1 against rows c0:c1, padded to whole groups with -inf."""
    rp = -(-(r1 - r0) // group) * group
    cp = -(-(c1 - c0) // group) * group
    s = buf[: rp * cp].view(rp, cp)
    torch.mm(_padded(x, r0, rp), _padded(x, c0, cp).T, out=s)  # (Rp, D) x (D, Cp) -> (Rp, Cp)
    s[r1 - r0 :].fill_(-math.inf)
    s[:, c1 - c0 :].fill_(-math.inf)
    return s


def _padded(x: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Rows start:start+rows of x, with zero rows past the end (only the last block copies)."""
    part = x[start : start + rows]
    if len(part) == rows:
        return part
    return torch.cat([part, part.new_zeros(rows - len(part), x.shape[1])])


def _block_topk(s: torch.Tensor, k: int, group: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row (dim=1) or column (dim=0) of a score block, ties -> lower index.

    Two stages, so the whole block is read once with a cheap max: the maximum of every group of
    ``group`` consecutive entries, the top-k groups, then the top-k of their members. When the
    k-th and (k+1)-th group maxima differ, every top-k entry lies in the top-k groups; lines
    where they are equal (exact ties) are sorted in full instead.
    Returns (values, local indices), each (Q, min(k, L)), ordered by (value desc, index asc).
    """
    t = s if dim == 1 else s.T  # (Q, L): one line per row whose neighbours are sought
    q, length = t.shape
    if dim == 1:
        gmax = s.view(q, length // group, group).amax(2)  # (Q, L/g)
    else:
        gmax = s.view(length // group, group, q).amax(1).T.contiguous()  # (Q, L/g)
    kg = min(k + 1, gmax.shape[1])
    gtop, gidx = torch.topk(gmax, kg, dim=1)  # (Q, kg) best groups, largest first
    tie = torch.zeros(q, dtype=torch.bool, device=s.device)
    if kg > k:
        tie = (gtop[:, k - 1] == gtop[:, k]) & torch.isfinite(gtop[:, k - 1])
        gidx = gidx[:, :k]
    offs = torch.arange(group, device=s.device)
    members = (gidx.unsqueeze(2) * group + offs).flatten(1)  # (Q, M) local indices
    vals = t.gather(1, members)  # (Q, M)
    km = min(k + 1, vals.shape[1])
    top, at = torch.topk(vals, km, dim=1)  # (Q, km)
    mtie = torch.zeros_like(tie)
    if km > k:
        mtie = (top[:, k - 1] == top[:, k]) & torch.isfinite(top[:, k - 1])
    v, i = _best(top[:, :k], members.gather(1, at[:, :k]), k)
    if bool(mtie.any()):  # an exact tie across the k-th member: order all members
        rows = mtie.nonzero().squeeze(1)
        v[rows], i[rows] = _best(vals[rows], members[rows], k)
    if bool(tie.any()):  # an exact tie across the k-th group: order the whole line
        rows = tie.nonzero().squeeze(1)
        full = torch.arange(length, device=s.device).expand(len(rows), length)
        v[rows], i[rows] = _best(t[rows], full, k)
    return v, i


def _best(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row ordered by (value desc, index asc): (Q, M) -> (Q, min(k, M))."""
    order = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, order), idx.gather(1, order)


def _merge_into(best_v: torch.Tensor, best_i: torch.Tensor, r0: int, r1: int,
                v: torch.Tensor, i: torch.Tensor, k: int) -> None:
    """Merge candidates (>= r1 - r0 rows; padding rows ignored) into the running top-k of r0:r1."""
    n = r1 - r0
    mv, mi = _best(torch.cat([best_v[r0:r1], v[:n]], 1), torch.cat([best_i[r0:r1], i[:n]], 1), k)
    best_v[r0:r1], best_i[r0:r1] = mv, mi


def _ivf_neighbours(x: np.ndarray, k: int, nprobe: int) -> np.ndarray:
    """Approximate cosine k-NN with faiss IndexIVFFlat; self dropped wherever it lands."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n, dim = x.shape
    # faiss wants >= 39 training points per list; below ~24k images that caps nlist
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # nlist above already respects faiss's 39 per list
    index.train(x)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    _, found = index.search(x, min(k + 1, n))  # (N, k+1), -1 where a list ran short
    keep = (found != np.arange(n)[:, None]) & (found >= 0)
    # stable: kept entries move to the front in their rank order
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(np.where(keep, found, -1), order, axis=1)
    return np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1).astype(np.int64)


def select_pairs(
    neighbours: np.ndarray,
    class_image: np.ndarray,
    class_id: np.ndarray,
    class_area: np.ndarray,
    min_area: float = 0.05,
    chunk: int = 1 << 18,
) -> dict[str, np.ndarray]:
    """Keep (query, neighbour) pairs where one pseudo-class covers more than ``min_area`` of both.

    ``neighbours`` (N, k): image indices from ``nearest_neighbours`` (-1 skipped). The class table
    comes as columns, one row per (image, class present) in any order: ``class_image`` (M,) image
    index 0..N-1, ``class_id`` (M,), ``class_area`` (M,) fraction of that image. The chosen class
    maximises min(query area, positive area), ties -> smallest class id. Returns columns
    ``query``, ``positive`` (P,) int64, ``class_id``, ``rank`` (P,) int32, ``query_area``,
    ``positive_area`` (P,) float32, ordered by query then neighbour rank. ``chunk`` pairs are
    expanded at a time, which bounds the memory.
    """
    nn = _check_neighbours(neighbours)
    n, k = nn.shape
    img, cls, area = _check_classes(class_image, class_id, class_area, n)
    keep = area > min_area  # float64 compare: float32(0.05) > 0.05 holds, as in Python floats
    img, cls, area = img[keep], cls[keep], area[keep]
    classes, cls = np.unique(cls, return_inverse=True)  # dense ids keep image * C + class small
    key = img * max(len(classes), 1) + cls
    order = np.argsort(key, kind="stable")
    key, img, cls, area = key[order], img[order], cls[order], area[order]
    _check_unique(key, img, classes[cls])
    count = np.bincount(img, minlength=n)  # classes above min_area per image
    start = np.cumsum(count) - count  # first row of each image in the sorted table
    query = np.repeat(np.arange(n, dtype=np.int64), k)
    positive = nn.reshape(-1)
    rank = np.tile(np.arange(k, dtype=np.int32), n)
    live = positive >= 0
    live[live] = (count[query[live]] > 0) & (count[positive[live]] > 0)
    query, positive, rank = query[live], positive[live], rank[live]
    table = (key, cls, area, count, start, len(classes))
    picks = [_choose_class(query[a : a + chunk], positive[a : a + chunk], table, a)
             for a in range(0, len(query), chunk)]
    none = np.zeros(0, np.int64)
    qrow, prow, sel = (np.concatenate([p[j] for p in picks] or [none]) for j in range(3))
    return {
        "query": query[sel],
        "positive": positive[sel],
        "class_id": classes[cls[qrow]].astype(np.int32),
        "query_area": area[qrow].astype(np.float32),
        "positive_area": area[prow].astype(np.float32),
        "rank": rank[sel],
    }


def _choose_class(query: np.ndarray, positive: np.ndarray, table: tuple, offset: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (P,) whose images both have classes -> (query's row, positive's row, pair index).

    Only pairs that share a class come back; pair indices are shifted by ``offset``.
    """
    key, cls, area, count, start, num_classes = table
    m = count[query]  # (P,) candidate classes per pair: those of the query image
    pair = np.repeat(np.arange(len(query)), m)  # (E,) pair of each candidate
    first = np.cumsum(m) - m
    row = start[query][pair] + np.arange(len(pair)) - first[pair]  # (E,) query's class row
    found = _lookup(key, positive[pair] * num_classes + cls[row])  # (E,) positive's row or -1
    score = np.where(found >= 0, np.minimum(area[row], area[found]), -np.inf)  # (E,)
    top = np.maximum.reduceat(score, first)  # (P,) best min-area per pair; m > 0 for every pair
    # rows are in class order within a pair, so the first maximum is the smallest class id
    hit = np.flatnonzero((found >= 0) & (score == top[pair]))
    hit = hit[np.r_[True, pair[hit][1:] != pair[hit][:-1]]] if len(hit) else hit
    return row[hit], found[hit], pair[hit] + offset


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row of each key in ``sorted_keys``, or -1 where it is absent."""
    pos = np.searchsorted(sorted_keys, keys)
    pos = np.minimum(pos, len(sorted_keys) - 1)
    if len(sorted_keys) == 0:
        return np.full(len(keys), -1, np.int64)
    return np.where(sorted_keys[pos] == keys, pos, -1)


def _check_neighbours(neighbours: np.ndarray) -> np.ndarray:
    nn = np.asarray(neighbours)
    if nn.ndim != 2 or not np.issubdtype(nn.dtype, np.integer):
        raise ValueError(f"neighbours must be an (N, k) integer array, got {nn.dtype} {nn.shape}")
    if nn.size and (nn.min() < -1 or nn.max() >= len(nn)):
        raise ValueError(f"neighbours must be image indices in [-1, {len(nn)}), "
                         f"got values in [{nn.min()}, {nn.max()}]")
    return nn.astype(np.int64, copy=False)


def _check_classes(class_image, class_id, class_area, n: int):
    img = np.asarray(class_image)
    cls = np.asarray(class_id)
    area = np.asarray(class_area, dtype=np.float64)
    if not (img.ndim == cls.ndim == area.ndim == 1 and len(img) == len(cls) == len(area)):
        raise ValueError(f"class table columns must be 1-D of one length, got image {img.shape}, "
                         f"class_id {cls.shape}, area {area.shape}")
    if not (np.issubdtype(img.dtype, np.integer) and np.issubdtype(cls.dtype, np.integer)):
        raise ValueError(f"class_image and class_id must be integers, got {img.dtype}, {cls.dtype}")
    if len(img) and (img.min() < 0 or img.max() >= n):
        raise ValueError(f"class_image must be image indices in [0, {n}), "
                         f"got values in [{img.min()}, {img.max()}]")
    return img.astype(np.int64), cls.astype(np.int64), area


def _check_unique(sorted_keys: np.ndarray, img: np.ndarray, cls: np.ndarray) -> None:
    dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    if len(dup):
        raise ValueError(f"class table lists image {img[dup[0]]} class {cls[dup[0]]} twice; "
                         f"{len(dup)} duplicate (image, class) rows above min_area")
