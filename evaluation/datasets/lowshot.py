"""Low-shot subsets of a training set: fractions 1, 1/8, 1/64, 1/128, nested and class-balanced.

One class-balanced ordering of all training images is drawn per seed; the subset of fraction f is
its first max(1, floor(N f)) images. So the subsets of one seed are nested (1/128 inside 1/64
inside 1/8 inside 1), and every prefix covers the classes as evenly as the images allow.

Balanced ordering (greedy): repeatedly take the class that the images chosen so far cover least
(ties broken at random), and append a random not-yet-chosen image containing it; a class with no
image left drops out; once every class is out, the rest follow in random order.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np

from .base import EvalDataset

FRACTIONS = ("1", "1/8", "1/64", "1/128")
SEEDS = (42, 400, 783, 1293, 4019)


def parse_fraction(text: str | float) -> Fraction:
    """"1/8" -> Fraction(1, 8); must lie in (0, 1]."""
    value = Fraction(str(text))
    if not 0 < value <= 1:
        raise ValueError(f"low-shot fraction must be in (0, 1], got {text!r}")
    return value


def subset_size(num_images: int, fraction: str | float) -> int:
    """max(1, floor(N * fraction)) images."""
    return max(1, int(num_images * parse_fraction(fraction)))


def balanced_order(presence: np.ndarray, seed: int) -> np.ndarray:
    """A class-balanced permutation of the N images of ``presence`` (N, C) bool (see module doc)."""
    presence = np.asarray(presence, dtype=bool)
    n, c = presence.shape
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(presence[:, k])) for k in range(c)]  # per class
    heads = np.zeros(c, dtype=np.int64)  # next untried position in each pool
    covered = np.zeros(c, dtype=np.int64)
    alive = np.array([len(p) > 0 for p in pools])
    taken = np.zeros(n, dtype=bool)
    order: list[int] = []
    tiebreak = rng.random(c)
    while alive.any():
        candidates = np.flatnonzero(alive)
        least = candidates[covered[candidates] == covered[candidates].min()]
        k = least[np.argmin(tiebreak[least])]
        tiebreak[k] = rng.random()  # the next tie among these classes is drawn afresh
        pool = pools[k]
        while heads[k] < len(pool) and taken[pool[heads[k]]]:
            heads[k] += 1
        if heads[k] == len(pool):
            alive[k] = False
            continue
        image = int(pool[heads[k]])
        taken[image] = True
        order.append(image)
        covered += presence[image]
    rest = np.flatnonzero(~taken)
    return np.concatenate([np.array(order, dtype=np.int64), rng.permutation(rest)])


def lowshot_subsets(
    presence: np.ndarray, fractions: Sequence[str] = FRACTIONS, seed: int = 42
) -> dict[str, np.ndarray]:
    """fraction -> sorted indices of its training images; nested, class-balanced, deterministic."""
    order = balanced_order(presence, seed)
    n = len(order)
    return {str(f): np.sort(order[: subset_size(n, f)]) for f in fractions}


def class_presence(dataset: EvalDataset, threads: int = 8) -> np.ndarray:
    """(N, C) bool: which classes appear in each image's target (ignore excluded).

    Depth datasets have no classes: every image counts as holding the one "class".
    """
    n, c = len(dataset), dataset.num_classes
    if dataset.task != "segmentation":
        return np.ones((n, 1), dtype=bool)

    def one(i: int) -> np.ndarray:
        target = dataset.load_target(i)
        present = np.zeros(c, dtype=bool)
        values = np.unique(target)
        present[values[values < c]] = True
        return present

    with ThreadPoolExecutor(max_workers=threads) as pool:
        rows = list(pool.map(one, range(n)))
    return np.stack(rows) if rows else np.zeros((0, c), dtype=bool)
