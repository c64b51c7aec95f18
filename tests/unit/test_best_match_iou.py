"""Best-match IoU of segment maps against ground truth, on hand-made maps."""

import numpy as np
import pytest

from labeling.quality import best_match_ious


def test_the_truth_under_other_ids_scores_one_per_region():
    truth = np.array([[0, 0, 3], [1, 1, 3]])
    segments = np.array([[7, 7, 0], [2, 2, 0]])
    assert best_match_ious(truth, segments).tolist() == [1.0, 1.0, 1.0]  # classes 0, 1, 3


def test_each_region_takes_its_best_segment():
    truth = np.array([0, 0, 0, 0, 1, 1])
    segments = np.array([0, 0, 0, 1, 1, 1])
    # region 0 (4 px): segment 0 (3 px) inside it, union 4 -> 3/4;
    # region 1 (2 px): segment 1 (3 px) covers it, union 3 -> 2/3
    assert best_match_ious(truth, segments) == pytest.approx([0.75, 2 / 3])


def test_one_segment_scores_each_region_its_area_fraction():
    truth = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    assert best_match_ious(truth, np.zeros(10, int)) == pytest.approx([0.3, 0.2, 0.5])


def test_ignored_pixels_count_in_neither_region_nor_segment():
    truth = np.array([0, 0, 255, 1])
    segments = np.array([0, 0, 0, 1])  # segment 0 reaches into the ignored pixel
    assert best_match_ious(truth, segments).tolist() == [1.0, 1.0]


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="segment map is"):
        best_match_ious(np.zeros((2, 3), int), np.zeros((3, 2), int))
