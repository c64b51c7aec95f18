"""Label transfer, patch values and metrics against hand-worked values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.transfer import (
    ConfusionAccumulator,
    DepthAccumulator,
    confusion_matrix,
    exact_topk,
    hungarian_mapping,
    iou_per_class,
    label_transfer,
    match_classes,
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


def test_hungarian_on_a_permuted_confusion_equals_identity_on_the_original():
    # diagonally dominant: identity is the best assignment of the unpermuted matrix
    conf = torch.tensor([[50, 3, 2, 0],
                         [4, 40, 1, 5],
                         [0, 6, 30, 2],
                         [1, 0, 3, 20]])
    perm = torch.tensor([2, 0, 3, 1])  # predicted class j is printed as class perm[j]
    permuted = torch.empty_like(conf)
    permuted[:, perm] = conf
    assert miou(permuted, "hungarian") == pytest.approx(miou(conf, "identity"))
    assert miou(conf, "hungarian") == pytest.approx(miou(conf, "identity"))
    assert miou(permuted, "identity") < 0.2 * miou(conf)
    assert torch.equal(hungarian_mapping(permuted)[perm], torch.arange(4))  # undoes perm
    assert torch.equal(match_classes(permuted, "hungarian"), conf)
    torch.testing.assert_close(iou_per_class(permuted, "hungarian"), iou_per_class(conf))


def test_hungarian_miou_on_a_hand_made_3x3():
    conf = torch.tensor([[1, 8, 1],   # true 0 mostly predicted as 1
                         [6, 1, 1],   # true 1 mostly predicted as 0
                         [0, 1, 5]])
    # matched: predicted 1 -> 0, 0 -> 1, 2 -> 2, i.e. columns (1, 0, 2):
    # [[8, 1, 1], [1, 6, 1], [1, 0, 5]]; rows 10, 8, 6; columns 10, 7, 7
    # IoU 8 / (10 + 10 - 8) = 2/3, 6 / (8 + 7 - 6) = 2/3, 5 / (6 + 7 - 5) = 5/8
    assert hungarian_mapping(conf).tolist() == [1, 0, 2]
    assert match_classes(conf, "hungarian").tolist() == [[8, 1, 1], [1, 6, 1], [1, 0, 5]]
    assert miou(conf, "hungarian") == pytest.approx((2 / 3 + 2 / 3 + 5 / 8) / 3)
    # identity: 1 / (10 + 7 - 1), 1 / (8 + 10 - 1), 5 / 8
    assert miou(conf, "identity") == pytest.approx((1 / 16 + 1 / 17 + 5 / 8) / 3)
    assert math.isnan(ConfusionAccumulator(3).miou("hungarian"))  # no pixels: no classes


def test_hungarian_maximises_the_summed_iou_not_the_pixel_count():
    conf = torch.tensor([[0, 2],
                         [6, 9]])
    # pixel counts favour identity (0 + 9 > 2 + 6); IoU favours the swap:
    # identity 0 + 9/17 = 0.53, swapped 2/11 + 6/15 = 0.58
    assert hungarian_mapping(conf).tolist() == [1, 0]
    assert miou(conf, "hungarian") == pytest.approx((2 / 11 + 6 / 15) / 2)
    assert miou(conf, "identity") == pytest.approx((0 + 9 / 17) / 2)


def test_hungarian_is_the_best_permutation():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        conf = torch.randint(0, 20, (4, 4), generator=gen)
        best = 0.0
        for perm in itertools.permutations(range(4)):
            permuted = torch.zeros_like(conf)
            permuted[:, list(perm)] = conf
            best = max(best, miou(permuted, "identity"))
        assert miou(conf, "hungarian") == pytest.approx(best)


def test_matching_is_checked():
    with pytest.raises(ValueError, match="unknown matching"):
        miou(torch.eye(2), "greedy")
    with pytest.raises(ValueError, match="square"):
        miou(torch.ones(2, 3), "hungarian")
