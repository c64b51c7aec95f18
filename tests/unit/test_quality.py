"""Pseudo-label quality: Hungarian and majority matching on hand-made label maps."""

import numpy as np
import pytest

from labeling.quality import confusion, hungarian_miou, majority_miou


def test_relabelled_truth_scores_one():
    truth = np.array([[0, 0, 1], [2, 2, 1]])
    pred = np.array([[5, 5, 3], [0, 0, 3]])  # a permutation of the ids
    conf = confusion(truth, pred, 3, 6)
    assert hungarian_miou(conf) == pytest.approx(1.0)
    assert majority_miou(conf) == pytest.approx(1.0)


def test_split_class_hungarian_vs_majority():
    # true class 0 split into pseudo-classes 0 and 1; true class 1 is pseudo-class 2
    truth = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 2, 2])
    conf = confusion(truth, pred, 2, 3)
    # hungarian: 0->0, 2->1, pseudo 1 unmatched -> IoU0 = 3/4, IoU1 = 1
    assert hungarian_miou(conf) == pytest.approx((0.75 + 1.0) / 2)
    # majority: both 0 and 1 -> 0
    assert majority_miou(conf) == pytest.approx(1.0)


def test_ignore_pixels_do_not_count():
    truth = np.array([0, 255, 1])
    pred = np.array([0, 1, 1])
    conf = confusion(truth, pred, 2, 2)
    assert conf.sum() == 2
    assert hungarian_miou(conf) == pytest.approx(1.0)
