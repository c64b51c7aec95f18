"""Pair selection on hand-made inputs: self excluded, cosine order, 5% area rule."""

import numpy as np

from labeling.pairs import nearest_neighbours, select_pairs, shared_class


def test_neighbours_exclude_self_and_follow_cosine():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    nn = nearest_neighbours(x, k=2)
    assert nn.shape == (5, 2)
    assert nn[0].tolist() == [1, 3]
    assert nn[2].tolist() == [3, 1]
    for i in range(5):
        assert i not in nn[i].tolist()


def test_neighbours_with_exact_duplicates_still_exclude_self():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    nn = nearest_neighbours(x, k=2)
    for i in range(3):
        assert i not in nn[i].tolist()
        assert set(nn[i].tolist()) == {0, 1, 2} - {i}


def test_neighbours_pad_when_too_few_images():
    nn = nearest_neighbours(np.eye(2), k=5)
    assert nn.tolist() == [[1, -1, -1, -1, -1], [0, -1, -1, -1, -1]]


def test_shared_class_needs_more_than_min_area_in_both():
    assert shared_class({1: 0.5, 2: 0.3}, {2: 0.051, 3: 0.9}) == (2, 0.3, 0.051)
    assert shared_class({1: 0.5}, {1: 0.05}) is None  # exactly 5% is not more than 5%
    assert shared_class({1: 0.5}, {2: 0.5}) is None
    # the class with the largest smaller area wins
    assert shared_class({1: 0.2, 2: 0.6}, {1: 0.7, 2: 0.3})[0] == 2


def test_select_pairs_keeps_only_sharing_neighbours():
    ids = ["a", "b", "c"]
    nn = np.array([[1, 2], [0, 2], [0, -1]])
    areas = [{7: 0.6, 1: 0.4}, {7: 0.2, 2: 0.8}, {3: 1.0}]
    rows = select_pairs(ids, nn, areas)
    assert rows == [("a", "b", 7, 0.6, 0.2, 0), ("b", "a", 7, 0.2, 0.6, 0)]
