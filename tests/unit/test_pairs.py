"""Pairs: exact k-NN against a brute-force reference, IVF, and the vectorised pair selection
against the per-pair dictionary rule it replaces."""

from collections.abc import Mapping

import numpy as np
import pytest
import torch

from labeling.pairs import nearest_neighbours, select_pairs

# ---------------------------------------------------------------------------- references


def brute_force_neighbours(x: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Float64 similarities of ``rows`` (default all) to every row, self excluded, ordered by
    (similarity desc, index asc)."""
    xn = (torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1, eps=1e-12)
          + 0.0).double()
    n = len(x)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    # one row at a time, products summed in one order: identical rows get identical similarities
    # (a matrix product may round them differently by where they sit)
    s = torch.stack([(xn[r] * xn).sum(1) for r in rows]).numpy() if n else np.zeros((0, 0))
    s[np.arange(len(rows)), rows] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n), s.shape), -s), axis=1)[:, :k]
    out = np.where(np.isfinite(np.take_along_axis(s, order, 1)), order, -1)
    return np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)


def reference_shared_class(query: Mapping[int, float], positive: Mapping[int, float],
                           min_area: float) -> tuple[int, float, float] | None:
    """The per-pair rule: the class above ``min_area`` in both images with the largest smaller
    area, ties -> smallest class id (what the pipeline used before the columnar version)."""
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


def reference_select_pairs(nn, image, cls, area, n, min_area=0.05):
    areas = [{} for _ in range(n)]
    for i, c, a in zip(image.tolist(), cls.tolist(), area.tolist(), strict=True):
        areas[i][c] = a
    rows = []
    for q, row in enumerate(nn):
        for rank, p in enumerate(row):
            hit = None if p < 0 else reference_shared_class(areas[q], areas[p], min_area)
            if hit is not None:
                rows.append((q, int(p), hit[0], hit[1], hit[2], rank))
    return rows


def as_rows(cols: dict) -> list[tuple]:
    names = ("query", "positive", "class_id", "query_area", "positive_area", "rank")
    return list(zip(*(cols[c].tolist() for c in names), strict=True))


# ---------------------------------------------------------------------------- nearest neighbours


def test_neighbours_exclude_self_and_follow_cosine():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    nn = nearest_neighbours(x, k=2)
    assert nn.shape == (5, 2) and nn.dtype == np.int64
    assert nn[0].tolist() == [1, 3]
    assert nn[2].tolist() == [3, 1]
    for i in range(5):
        assert i not in nn[i].tolist()


def test_neighbours_with_exact_duplicates_still_exclude_self():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    nn = nearest_neighbours(x, k=2)
    assert nn[:3].tolist() == [[1, 2], [0, 2], [0, 1]]  # equal similarity: lower index first


def test_neighbours_pad_when_too_few_images():
    assert nearest_neighbours(np.eye(2), k=5).tolist() == [[1, -1, -1, -1, -1],
                                                          [0, -1, -1, -1, -1]]
    assert nearest_neighbours(np.ones((1, 3)), k=2).tolist() == [[-1, -1]]
    for method in ("exact", "ivf"):
        assert nearest_neighbours(np.zeros((0, 3)), k=2, method=method).shape == (0, 2)


def _hard_features(n: int, dim: int, seed: int) -> np.ndarray:
    """Random rows with duplicate groups: pairs, a scaled copy, and one group larger than k."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[5] = x[3]
    x[50] = 2 * x[3]  # the same direction: identical once normalised
    x[60:71] = x[10]  # 12 identical rows, more than k + 1
    x[n - 1] = x[11]  # a copy in the last, partial block
    return x


@pytest.mark.parametrize("block", [5, 7, 16, 48, 64, 100, 4096])
def test_exact_search_equals_brute_force_for_every_block_size(block):
    x = _hard_features(333, 16, seed=0)  # 333 is a multiple of none of the blocks
    expected = brute_force_neighbours(x, 5)
    np.testing.assert_array_equal(nearest_neighbours(x, 5, block=block), expected)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7])
def test_exact_search_with_at_most_k_plus_one_images(n):
    x = np.random.default_rng(n).normal(size=(n, 8))
    for block in (1, 2, 4096):
        np.testing.assert_array_equal(nearest_neighbours(x, 5, block=block),
                                      brute_force_neighbours(x, 5))


def test_exact_ties_between_distinct_rows_rank_lower_index_first():
    # 64 one-hot rows all have the same similarity to the all-ones row, across groups and blocks
    x = np.concatenate([np.eye(64), np.ones((1, 64)), np.eye(64)[::-1]]).astype(np.float32)
    nn = nearest_neighbours(x, 5, block=16)
    assert nn[64].tolist() == [0, 1, 2, 3, 4]
    # row 0 ties with its duplicate 128 (similarity 1) ahead of the all-ones row
    assert nn[0].tolist()[:2] == [128, 64]
    np.testing.assert_array_equal(nn, brute_force_neighbours(x, 5))


def test_exact_ties_across_many_groups_rank_lower_index_first():
    # 1024 distinct rows of +-1/4 (unit norm, exact) all have similarity 1/4 to e_0, so every
    # group maximum of row 0 ties and the whole line has to be ordered
    signs = (np.arange(1024)[:, None] >> np.arange(15)) & 1  # (1024, 15) distinct patterns
    rows = np.concatenate([np.ones((1024, 1)), 1 - 2 * signs], 1) / 4
    perm = np.random.default_rng(0).permutation(1024)
    x = np.concatenate([np.eye(1, 16), rows[perm]]).astype(np.float32)  # row 0 is e_0
    for block in (128, 1024):
        nn = nearest_neighbours(x, 5, block=block)
        assert nn[0].tolist() == [1, 2, 3, 4, 5]
        some = np.array([1, 2, 777, 1024])
        np.testing.assert_array_equal(nn[some], brute_force_neighbours(x, 5, rows=some))


def test_large_duplicate_groups_rank_lower_index_first():
    # at D = 384 the float32 products of identical rows round differently by position
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 384)).astype(np.float32)
    copies = np.sort(rng.choice(400, 40, replace=False))
    x[copies] = x[copies[0]]  # 40 identical rows spread over every block and position
    for block in (16, 96):
        nn = nearest_neighbours(x, 5, block=block)
        np.testing.assert_array_equal(nn, brute_force_neighbours(x, 5))
        assert nn[copies[-1]].tolist() == copies[:5].tolist()


def test_near_ties_below_float32_resolution_follow_the_float64_similarity():
    # q.a = 1 + 2^-50 > q.b = 1 exactly, but both round to 1.0 in float32
    q, b, a = [1.0, 2.0**-30], [1.0, 0.0], [1.0, 2.0**-20]
    x = np.array([q, b, a], np.float32)
    assert nearest_neighbours(x, 2).tolist() == [[2, 1], [0, 2], [0, 1]]
    # the float32 screen sees a tie and keeps b first: the margin keeps a as a candidate
    assert nearest_neighbours(x, 1).tolist() == [[2], [0], [0]]


def test_hash_collisions_fall_back_to_exact_row_comparison(monkeypatch):
    from labeling import pairs

    monkeypatch.setattr(pairs, "_row_hash", lambda x: torch.zeros(len(x), dtype=torch.long))
    x = _hard_features(120, 8, seed=4)
    np.testing.assert_array_equal(nearest_neighbours(x, 5, block=32), brute_force_neighbours(x, 5))


def test_exact_search_is_repeatable_and_larger_k_works():
    x = _hard_features(700, 32, seed=1)
    a = nearest_neighbours(x, 12, block=128)
    np.testing.assert_array_equal(a, nearest_neighbours(x, 12, block=128))
    np.testing.assert_array_equal(a, brute_force_neighbours(x, 12))


def test_search_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        nearest_neighbours(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbours(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="method"):
        nearest_neighbours(np.eye(3), method="hnsw")


def test_ivf_visiting_every_list_finds_the_exact_neighbours():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 32))
    x = (centres[rng.integers(0, 20, 2000)] + 0.5 * rng.normal(size=(2000, 32))).astype(np.float32)
    exact = brute_force_neighbours(x, 5)
    full = nearest_neighbours(x, 5, method="ivf", nprobe=10_000)  # exhaustive: all lists
    np.testing.assert_array_equal(np.sort(full, 1), np.sort(exact, 1))
    few = nearest_neighbours(x, 5, method="ivf", nprobe=2)
    assert (few != np.arange(2000)[:, None]).all()  # self never returned
    hits = (few[:, :, None] == exact[:, None, :]).any(1).mean()
    assert 0.5 < hits < 1.0  # approximate: most, not all, neighbours found


def test_ivf_pads_when_too_few_images():
    nn = nearest_neighbours(np.eye(3, 4), 5, method="ivf")
    assert nn[:, 2:].tolist() == [[-1] * 3] * 3
    assert [sorted(r) for r in nn[:, :2].tolist()] == [[1, 2], [0, 2], [0, 1]]  # ties unordered


# ---------------------------------------------------------------------------- pair selection


def test_select_pairs_keeps_only_sharing_neighbours():
    nn = np.array([[1, 2], [0, 2], [0, -1]])
    # image 0: {7: 0.6, 1: 0.4}, image 1: {7: 0.2, 2: 0.8}, image 2: {3: 1.0}; rows shuffled
    image = np.array([1, 0, 2, 0, 1])
    cls = np.array([2, 1, 3, 7, 7])
    area = np.array([0.8, 0.4, 1.0, 0.6, 0.2], np.float32)
    cols = select_pairs(nn, image, cls, area)
    assert cols["query"].dtype == np.int64 and cols["class_id"].dtype == np.int32
    assert cols["query_area"].dtype == np.float32 and cols["rank"].dtype == np.int32
    got = as_rows(cols)
    assert got == [(0, 1, 7, pytest.approx(0.6), pytest.approx(0.2), 0),
                   (1, 0, 7, pytest.approx(0.2), pytest.approx(0.6), 0)]


def test_select_pairs_area_must_exceed_min_area_in_both():
    nn = np.array([[1], [0]])
    image, cls = np.array([0, 1, 0, 1]), np.array([1, 1, 2, 2])
    # class 1 covers exactly 0.05 of image 1: not more than 0.05, so no pair
    cols = select_pairs(nn, image[:2], cls[:2], np.array([0.5, 0.05]))
    assert len(cols["query"]) == 0
    assert len(select_pairs(nn, image[:2], cls[:2], np.array([0.5, 0.0501]))["query"]) == 2
    # a float32 area of 0.05 is 0.0500000007 > 0.05, as the float32 table column always was
    assert len(select_pairs(nn, image[:2], cls[:2], np.float32([0.5, 0.05]))["query"]) == 2
    # the class with the largest smaller area wins: class 2 (min 0.3) over class 1 (min 0.2)
    cols = select_pairs(nn, image, cls, np.array([0.2, 0.7, 0.6, 0.3]))
    assert cols["class_id"].tolist() == [2, 2]
    # equal smaller areas: the smallest class id
    cols = select_pairs(nn, image, cls, np.array([0.3, 0.9, 0.3, 0.5]))
    assert cols["class_id"].tolist() == [1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_pairs_matches_the_per_pair_rule(seed):
    rng = np.random.default_rng(seed)
    n, k = 400, 5
    nn = rng.integers(-1, n, (n, k))
    per = rng.integers(0, 8, n)  # classes per image, some images have none
    image = np.repeat(np.arange(n), per)
    cls = np.concatenate([rng.choice(30, c, replace=False) for c in per]) * 1000  # sparse ids
    # few distinct areas, so equal smaller areas and the 0.05 boundary occur often
    area = rng.choice(np.array([0.02, 0.05, 0.1, 0.25, 0.5], np.float32), len(image))
    order = rng.permutation(len(image))
    image, cls, area = image[order], cls[order], area[order]
    expected = reference_select_pairs(nn, image, cls, area, n)
    for chunk in (7, 1 << 18):
        got = as_rows(select_pairs(nn, image, cls, area, chunk=chunk))
        assert got == expected
    assert len(expected) > 200


def test_select_pairs_with_no_classes_or_no_neighbours():
    empty = select_pairs(np.full((3, 2), -1), np.array([0, 1]), np.array([4, 4]),
                         np.array([0.5, 0.5]))
    assert all(len(v) == 0 for v in empty.values()) and len(empty) == 6
    none = select_pairs(np.array([[1], [0]]), np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    assert len(none["query"]) == 0


def test_select_pairs_rejects_bad_tables():
    nn = np.array([[1], [0]])
    with pytest.raises(ValueError, match="image 0 class 3 twice"):
        select_pairs(nn, np.array([0, 0]), np.array([3, 3]), np.array([0.5, 0.4]))
    with pytest.raises(ValueError, match=r"class_image must be image indices in \[0, 2\)"):
        select_pairs(nn, np.array([0, 2]), np.array([3, 3]), np.array([0.5, 0.4]))
    with pytest.raises(ValueError, match="neighbours must be image indices"):
        select_pairs(np.array([[5], [0]]), np.array([0]), np.array([3]), np.array([0.5]))
    with pytest.raises(ValueError, match="one length"):
        select_pairs(nn, np.array([0, 1]), np.array([3]), np.array([0.5, 0.4]))
