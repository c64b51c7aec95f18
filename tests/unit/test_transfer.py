"""Label transfer, patch values and metrics against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.transfer import (
    ConfusionAccumulator,
    DepthAccumulator,
    confusion_matrix,
    exact_topk,
    iou_per_class,
    label_transfer,
    miou,
    patch_histograms,
    patch_mean_depth,
    weighted_values,
)


def test_one_hot_features_return_the_true_labels():
    # bank: 3 copies of each of 4 one-hot feature directions, value = one-hot of its class
    labels = torch.tensor([0, 1, 2, 3] * 3)
    bank = F.one_hot(labels, 4).float()
    values = F.one_hot(labels, 4).float()
    query_labels = torch.tensor([3, 0, 2, 1, 1, 0])
    query = F.one_hot(query_labels, 4).float() * 2.5  # scale must not matter (cosine)
    pred = label_transfer(query, bank, values, k=3, temperature=0.07).argmax(dim=1)
    assert torch.equal(pred, query_labels)
    conf = confusion_matrix(pred, query_labels, 4)
    assert miou(conf) == 1.0


def test_k1_equals_hard_nearest_neighbour():
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(200, 16, generator=gen)
    values = torch.rand(200, 5, generator=gen)
    query = torch.randn(37, 16, generator=gen)
    cos = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
    nearest = cos.argmax(dim=1)
    out = label_transfer(query, bank, values, k=1, temperature=0.07)
    torch.testing.assert_close(out, values[nearest])


def test_soft_weights_match_a_hand_computed_softmax():
    # two bank patches at angle 0 and 90 degrees from the query: cos 1 and 0
    query = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    out = label_transfer(query, bank, values, k=2, temperature=0.5)
    w1 = math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0))
    torch.testing.assert_close(out, torch.tensor([[w1, 1 - w1]]))


def test_exact_topk_is_sorted_and_chunking_does_not_matter():
    gen = torch.Generator().manual_seed(1)
    bank, query = torch.randn(300, 8, generator=gen), torch.randn(50, 8, generator=gen)
    s1, i1 = exact_topk(query, bank, 7, query_chunk=4096)
    s2, i2 = exact_topk(query, bank, 7, query_chunk=3)
    assert torch.equal(i1, i2)
    assert (s1[:, :-1] >= s1[:, 1:]).all()
    # k larger than the bank: clipped to the bank size
    assert exact_topk(query, bank[:4], 30)[1].shape == (50, 4)


def test_label_transfer_rejects_mismatched_values():
    with pytest.raises(ValueError, match="bank_values"):
        label_transfer(torch.ones(2, 3), torch.ones(5, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="temperature"):
        weighted_values(torch.ones(1, 2), torch.ones(1, 2, 3), 0.0)


def test_miou_on_a_hand_made_confusion_matrix():
    # rows = truth, cols = prediction
    conf = torch.tensor([[5, 1, 0],
                         [2, 3, 0],
                         [0, 0, 0]])
    # class 0: TP 5, FP 2, FN 1 -> 5/8 ; class 1: TP 3, FP 1, FN 2 -> 3/6; class 2 absent -> NaN
    iou = iou_per_class(conf)
    assert iou[0].item() == pytest.approx(5 / 8)
    assert iou[1].item() == pytest.approx(0.5)
    assert math.isnan(iou[2].item())
    assert miou(conf) == pytest.approx((5 / 8 + 0.5) / 2)
    # a class predicted but never true counts with IoU 0
    conf2 = torch.tensor([[2, 1], [0, 0]])
    assert miou(conf2) == pytest.approx((2 / 3 + 0.0) / 2)


def test_confusion_matrix_skips_ignore_and_accumulates():
    target = torch.tensor([[0, 1, 255], [1, 1, 0]])
    pred = torch.tensor([[0, 0, 1], [1, 1, 1]])
    conf = confusion_matrix(pred, target, 2)
    assert conf.tolist() == [[1, 1], [1, 2]]
    acc = ConfusionAccumulator(2)
    acc.update(pred, target)
    acc.update(pred, target)
    assert acc.matrix.tolist() == [[2, 2], [2, 4]]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 2)


def test_patch_histograms_count_ignore_as_class_zero():
    labels = torch.tensor([[[1, 1, 2, 255],
                            [1, 255, 2, 2]]])  # two 2x2 patches
    hist = patch_histograms(labels, num_classes=3, patch_size=2)
    assert hist.shape == (1, 1, 2, 3)
    torch.testing.assert_close(hist[0, 0, 0], torch.tensor([0.25, 0.75, 0.0]))
    torch.testing.assert_close(hist[0, 0, 1], torch.tensor([0.25, 0.0, 0.75]))


def test_patch_mean_depth_uses_valid_pixels_only():
    depth = torch.tensor([[[1.0, 3.0, 0.0, 0.0],
                           [5.0, 0.0, 0.0, 0.0]]])
    valid = depth > 0
    mean, has = patch_mean_depth(depth, valid, 2)
    assert has.tolist() == [[[True, False]]]
    assert mean[0, 0, 0].item() == pytest.approx(3.0)


def test_depth_rmse_per_image_and_per_pixel():
    pred = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])
    target = torch.tensor([[[1.0, 4.0]], [[3.0, 0.0]]])
    valid = torch.tensor([[[True, True]], [[True, False]]])
    acc = DepthAccumulator()
    acc.update(pred, target, valid)
    # image 1: sqrt((0 + 4) / 2) = sqrt 2 ; image 2: sqrt(9 / 1) = 3
    assert acc.rmse() == pytest.approx((math.sqrt(2) + 3) / 2)
    assert acc.rmse_pixels() == pytest.approx(math.sqrt(13 / 3))
