"""Low-shot subsets: nested, deterministic, class-balanced, of the documented sizes."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.datasets.lowshot import (
    FRACTIONS,
    SEEDS,
    balanced_order,
    lowshot_subsets,
    parse_fraction,
    subset_size,
)


def _presence(n=1024, c=12, seed=0):
    rng = np.random.default_rng(seed)
    # class k appears in an image with probability 0.9 / (k + 1): class 11 is rare
    p = 0.9 / (np.arange(c) + 1)
    presence = rng.random((n, c)) < p
    presence[:, 0] = True  # a background class everywhere
    return presence


def test_sizes_follow_the_fractions():
    assert [subset_size(1024, f) for f in FRACTIONS] == [1024, 128, 16, 8]
    assert subset_size(100, "1/128") == 1  # never empty
    assert subset_size(10582, "1/128") == 82
    with pytest.raises(ValueError, match="fraction"):
        parse_fraction("3/2")


@pytest.mark.parametrize("seed", SEEDS)
def test_subsets_are_nested_and_deterministic(seed):
    presence = _presence()
    subsets = lowshot_subsets(presence, FRACTIONS, seed)
    again = lowshot_subsets(presence, FRACTIONS, seed)
    for f in FRACTIONS:
        assert np.array_equal(subsets[f], again[f])
        assert len(np.unique(subsets[f])) == len(subsets[f])
    chain = [set(subsets[f].tolist()) for f in FRACTIONS]
    for bigger, smaller in zip(chain, chain[1:], strict=False):
        assert smaller <= bigger
    assert chain[0] == set(range(len(presence)))


def test_different_seeds_give_different_subsets():
    presence = _presence()
    a = lowshot_subsets(presence, ["1/8"], 42)["1/8"]
    b = lowshot_subsets(presence, ["1/8"], 400)["1/8"]
    assert not np.array_equal(a, b)


def test_balanced_subsets_cover_rare_classes_better_than_random():
    presence = _presence()
    c = presence.shape[1]
    rng = np.random.default_rng(1)
    for seed in SEEDS:
        small = lowshot_subsets(presence, ["1/64"], seed)["1/64"]  # 16 images
        covered = presence[small].any(axis=0)
        assert covered.all(), f"seed {seed}: classes {np.flatnonzero(~covered)} missing"
    # a uniform random draw of 16 images misses some rare class most of the time
    misses = sum(not presence[rng.choice(1024, 16, replace=False)].any(axis=0).all()
                 for _ in range(50))
    assert misses > 10
    # the least-covered class in the first 2C images of the balanced order appears >= once
    order = balanced_order(presence, 42)
    counts = presence[order[: 2 * c]].sum(axis=0)
    assert counts.min() >= 1


def test_hand_example_order():
    # image 2 is the only one with class 1; class 0 is everywhere
    presence = np.array([[1, 0], [1, 0], [1, 1], [1, 0]], dtype=bool)
    order = balanced_order(presence, 0)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    # both classes start uncovered: whichever is drawn first, image 2 is among the first two
    assert 2 in order[:2].tolist()
    assert lowshot_subsets(presence, ["1/2"], 0)["1/2"].tolist().count(2) == 1
