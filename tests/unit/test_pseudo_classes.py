"""Pseudo-class math on hand-made inputs: coverage pooling, nearest centroid, majority vote."""

import numpy as np
import pytest
import torch

from labeling.pseudo_classes import (
    assign_nearest,
    class_areas,
    kmeans,
    kmeans_subset,
    majority_vote,
    pool_segment_features,
    pseudo_label_map,
    segment_coverage,
)


def test_coverage_is_area_fraction_per_patch():
    # 4x4 map on a 2x2 grid: each patch is 2x2 pixels
    seg = torch.tensor([[0, 0, 1, 1],
                        [0, 1, 1, 1],
                        [2, 2, 1, 1],
                        [2, 2, 1, 1]])
    cover = segment_coverage(seg, 3, (2, 2))
    assert cover.shape == (3, 2, 2)
    torch.testing.assert_close(cover[0], torch.tensor([[0.75, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(cover[1], torch.tensor([[0.25, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(cover[2], torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(cover.sum(0), torch.ones(2, 2))


def test_pooling_weights_patches_by_coverage():
    seg = torch.tensor([[0, 0, 1, 1],
                        [0, 1, 1, 1],
                        [2, 2, 1, 1],
                        [2, 2, 1, 1]])
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                          [[2.0, 2.0], [4.0, 0.0]]])  # (gh=2, gw=2, D=2)
    pooled, area = pool_segment_features(feats, seg, 3)
    torch.testing.assert_close(pooled[0], torch.tensor([1.0, 0.0]))
    # segment 1: 0.25*(1,0) + 1*(0,1) + 1*(4,0) over weight 2.25
    torch.testing.assert_close(pooled[1], torch.tensor([4.25, 1.0]) / 2.25)
    torch.testing.assert_close(pooled[2], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(area, torch.tensor([3, 9, 4]) / 16.0)


def test_assign_nearest_uses_euclidean_distance():
    cents = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = torch.tensor([[1.0, 1.0], [9.0, 2.0], [2.0, 7.0], [5.1, 0.0]])
    assert assign_nearest(feats, cents).tolist() == [0, 1, 2, 1]


def test_majority_vote_and_ties():
    seg = torch.tensor([[0, 0, 0, 1],
                        [0, 0, 1, 1]])
    pix = torch.tensor([[3, 3, 2, 1],
                        [3, 2, 0, 1]])
    # segment 0: classes 3,3,2,3,2 -> 3 ; segment 1: 1,0,1 -> 1
    assert majority_vote(seg, pix, 2, 4).tolist() == [3, 1]
    # tie -> smallest class id
    assert majority_vote(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[2, 1]]), 1, 4).tolist() == [1]


def test_pseudo_label_map_votes_within_segments():
    # a 2x2 patch grid over a 4x4 image; centroid 0 near (1,0), centroid 1 near (0,1)
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                          [[0.9, 0.1], [0.0, 1.0]]])
    cents = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # segment 0 covers the left half plus one pixel of the top-right patch
    seg = torch.tensor([[0, 0, 0, 1],
                        [0, 0, 1, 1],
                        [0, 0, 1, 1],
                        [0, 0, 1, 1]])
    labels = pseudo_label_map(feats, seg, cents)
    expected = torch.tensor([[0, 0, 0, 1],
                             [0, 0, 1, 1],
                             [0, 0, 1, 1],
                             [0, 0, 1, 1]])
    assert torch.equal(labels, expected)
    ids, areas = class_areas(labels)
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(areas, [9 / 16, 7 / 16])


def test_kmeans_recovers_separated_clusters_deterministically():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [20, 0], [0, 20]], dtype=np.float32)
    x = np.concatenate([c + rng.normal(size=(50, 2)) for c in centers]).astype(np.float32)
    a = kmeans(x, 3, seed=1, nredo=10)
    b = kmeans(x, 3, seed=1, nredo=10)
    np.testing.assert_array_equal(a, b)
    # every true center has a centroid within 1 unit
    d = np.linalg.norm(a[:, None] - centers[None], axis=2)
    assert (d.min(0) < 1.0).all()


def test_kmeans_refuses_more_centroids_than_points():
    with pytest.raises(ValueError, match="K=5"):
        kmeans(np.zeros((3, 2), np.float32), 5)


def test_kmeans_is_deterministic_for_a_seed_on_overlapping_data():
    # overlapping clusters: the result depends on the initialisation, so the seed must fix it
    x = np.random.default_rng(2).normal(size=(3000, 16)).astype(np.float32)
    a = kmeans(x, 20, seed=7, niter=10)
    np.testing.assert_array_equal(a, kmeans(x, 20, seed=7, niter=10))
    assert not np.array_equal(a, kmeans(x, 20, seed=8, niter=10))
    assert a.shape == (20, 16) and a.dtype == np.float32


def test_kmeans_subset_takes_all_images_up_to_the_limit():
    np.testing.assert_array_equal(kmeans_subset(5, 5, seed=0), np.arange(5))
    np.testing.assert_array_equal(kmeans_subset(3, 10, seed=0), np.arange(3))
    assert len(kmeans_subset(0, 10, seed=0)) == 0


def test_kmeans_subset_is_a_seeded_sorted_choice_without_replacement():
    a = kmeans_subset(1000, 100, seed=3)
    assert a.dtype == np.int64 and len(a) == 100
    assert (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 1000  # sorted, distinct
    np.testing.assert_array_equal(a, kmeans_subset(1000, 100, seed=3))
    assert not np.array_equal(a, kmeans_subset(1000, 100, seed=4))
    # the same images the driver picked from its sorted ids with this seed
    ids = np.array([f"img{i:04d}" for i in range(1000)])
    chosen = np.random.default_rng(3).choice(ids, 100, replace=False)
    np.testing.assert_array_equal(ids[a], np.sort(chosen))


def test_kmeans_subset_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_images >= 1"):
        kmeans_subset(10, 0, seed=0)
