"""Query/positive pairs: global-feature nearest neighbours filtered by a shared pseudo-class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def nearest_neighbours(features: np.ndarray, k: int = 5) -> np.ndarray:
    """Indices (N, k) of the k most cosine-similar other rows of ``features`` (N, D), self excluded.

    Exact search (faiss flat inner product on L2-normalised rows). With fewer than k + 1 rows the
    missing neighbours are -1.
    """
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"global features must be (N, D), got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, min(k + 1, n))  # (N, k+1) best first, usually self first
    out = np.full((n, k), -1, dtype=np.int64)
    for i in range(n):
        # drop self wherever it lands (exact duplicates may rank another copy first)
        others = found[i][(found[i] != i) & (found[i] >= 0)][:k]
        out[i, : len(others)] = others
    return out


def shared_class(
    query: Mapping[int, float], positive: Mapping[int, float], min_area: float = 0.05
) -> tuple[int, float, float] | None:
    """The pseudo-class covering more than ``min_area`` of both images (the largest such), or None.

    ``query`` and ``positive`` map class id -> area fraction of that image.
    """
    best = None
    for cls, qa in query.items():
        pa = positive.get(cls)
        if pa is None or qa <= min_area or pa <= min_area:
            continue
        if best is None or min(qa, pa) > min(best[1], best[2]) or (
            min(qa, pa) == min(best[1], best[2]) and cls < best[0]
        ):
            best = (int(cls), float(qa), float(pa))
    return best


def select_pairs(
    image_ids: Sequence[str],
    neighbours: np.ndarray,
    areas: Sequence[Mapping[int, float]],
    min_area: float = 0.05,
) -> list[tuple[str, str, int, float, float, int]]:
    """Keep (query, positive) pairs sharing a class above ``min_area`` in both images.

    Returns rows (query_id, positive_id, class_id, query_area, positive_area, rank) in query order
    then neighbour rank.
    """
    rows = []
    for qi, row in enumerate(neighbours):
        for rank, pi in enumerate(row):
            if pi < 0:
                continue
            hit = shared_class(areas[qi], areas[pi], min_area)
            if hit is not None:
                rows.append((image_ids[qi], image_ids[pi], hit[0], hit[1], hit[2], rank))
    return rows
