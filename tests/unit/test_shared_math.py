"""The equations training and evaluation share (shared/soft_transfer.py, shared/patch_labels.py,
shared/confusion.py): one implementation, checked through every public name that uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.search import transfer_from_shards
from evaluation.transfer import confusion_matrix, iou_per_class, label_transfer, patch_histograms
from labeling.quality import confusion, hungarian_miou
from shared.confusion import class_iou, pair_iou
from shared.patch_labels import patch_label_histograms, pixel_patch_index
from shared.soft_transfer import soft_transfer, transfer_weights
from training.incontext import patchify_labels, soft_nn_predict


def test_top_k_over_the_whole_bank_is_the_training_transfer():
    # the same Eq. 1-2 in both stages: evaluation's top-k over all Nb patches is training's
    # softmax over the whole support set
    gen = torch.Generator().manual_seed(0)
    bank, values = torch.randn(40, 8, generator=gen), torch.rand(40, 5, generator=gen)
    query = torch.randn(12, 8, generator=gen)
    # a warm softmax, so that every bank patch carries weight
    evaluation = label_transfer(query, bank, values, k=40, temperature=1.0)
    training = soft_nn_predict(query[None], bank[None], values[None], temperature=1.0)[0]
    torch.testing.assert_close(evaluation, training)
    # with k < Nb they differ: the top-k really restricts the support
    assert not torch.allclose(label_transfer(query, bank, values, k=39, temperature=1.0), training)


def test_transfer_weights_widen_low_precision_and_sum_to_one():
    sims = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float16)
    weights = transfer_weights(sims, 0.01)  # 1 / 0.01 = 100 is fine, exp(100) overflows fp16
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))
    out = soft_transfer(sims, torch.eye(3, dtype=torch.float16), 0.01)
    assert out.dtype == torch.float32 and out[0, 0] > 0.99
    with pytest.raises(ValueError, match="temperature"):
        transfer_weights(sims, 0.0)


def test_streamed_transfer_ignores_unfilled_slots():
    sims = torch.tensor([[0.9, float("-inf")]])
    idx = torch.tensor([[1, -1]])  # an approximate search could fill one slot only
    out = transfer_from_shards(sims, idx, [(0, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))], 2, 0.07)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0]]))


def test_the_ignore_rule_is_the_only_difference_between_the_stages_histograms():
    labels = torch.tensor([[[1, 1, 2, 255],
                            [1, 255, 2, 2]]])  # two 2x2 patches
    dropped = patch_label_histograms(labels, 3, 2, ignore_index=255)  # training's rule
    as_zero = patch_label_histograms(labels, 3, 2, ignore_index=255, ignore_as=0)  # evaluation's
    torch.testing.assert_close(dropped[0, 0], torch.tensor([[0.0, 0.75, 0.0], [0.0, 0.0, 0.75]]))
    torch.testing.assert_close(as_zero[0, 0], torch.tensor([[0.25, 0.75, 0.0], [0.25, 0.0, 0.75]]))
    assert torch.equal(patchify_labels(labels, 3, 2, ignore_index=255), dropped.flatten(1, 2))
    assert torch.equal(patch_histograms(labels, 3, 2), as_zero)
    with pytest.raises(ValueError, match="ignore_as 3"):
        patch_label_histograms(labels, 3, 2, ignore_index=255, ignore_as=3)


def test_pixel_patch_index_is_row_major():
    assert pixel_patch_index(2, 4, 2).tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="whole number"):
        pixel_patch_index(3, 4, 2)


def test_pseudo_label_confusion_is_the_evaluation_confusion():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (20, 30))
    truth[truth == 3] = 255
    pred = rng.integers(0, 7, (20, 30)).astype(np.uint16)  # 7 pseudo-classes, 3 true classes
    rect = confusion(truth, pred, 3, 7)
    assert rect.shape == (3, 7) and rect.sum() == (truth != 255).sum()
    wide = confusion_matrix(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(truth), 7)
    assert np.array_equal(wide.numpy()[:3], rect)  # the square form, rows of the true classes
    with pytest.raises(ValueError, match="predicted class outside"):
        confusion(truth, pred, 3, 5)


def test_class_iou_counts_unmatched_predictions_as_misses():
    conf = torch.tensor([[5, 1, 2],
                         [2, 3, 0]])  # last column: predicted as no true class
    iou = class_iou(conf)
    # class 0: TP 5, FP 2, FN 1 + 2 -> 5/10 ; class 1: TP 3, FP 1, FN 2 -> 3/6
    torch.testing.assert_close(iou, torch.tensor([0.5, 0.5], dtype=torch.float64))
    square = torch.tensor([[5, 1], [2, 3]])
    assert torch.equal(class_iou(square), iou_per_class(square))
    torch.testing.assert_close(pair_iou(square)[0, 1], torch.tensor(1 / 9, dtype=torch.float64))
    assert hungarian_miou(np.array([[0, 6], [5, 0]])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="P >= T"):
        class_iou(torch.ones(3, 2))
