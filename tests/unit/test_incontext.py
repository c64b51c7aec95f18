"""Exact checks of the in-context objective against values worked out by hand or by torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.incontext import (
    incontext_loss,
    patchify_labels,
    soft_nn_predict,
    soft_nn_predict_indexed,
)


def test_patchify_hand_example():
    labels = torch.tensor(
        [
            [
                [0, 0, 1, 1],
                [0, 1, 1, 1],
                [2, 2, 255, 0],
                [2, 2, 0, 0],
            ]
        ]
    )
    out = patchify_labels(labels, num_classes=3, patch_size=2, ignore_index=255)
    expected = torch.tensor(
        [
            [
                [0.75, 0.25, 0.0],  # top-left: three 0s and one 1
                [0.0, 1.0, 0.0],  # top-right: all 1
                [0.0, 0.0, 1.0],  # bottom-left: all 2
                [0.75, 0.0, 0.0],  # bottom-right: the ignored pixel adds nothing
            ]
        ]
    )
    assert out.shape == (1, 4, 3)
    assert torch.equal(out, expected)


def test_patchify_row_major_order_and_batch():
    labels = torch.zeros(2, 2, 6, dtype=torch.long)
    labels[0, :, 4:] = 1  # third patch of the first image
    labels[1, :, :2] = 1  # first patch of the second image
    out = patchify_labels(labels, num_classes=2, patch_size=2)
    assert out.shape == (2, 3, 2)
    assert out[0, :, 1].tolist() == [0.0, 0.0, 1.0]
    assert out[1, :, 1].tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(out.sum(-1), torch.ones(2, 3))


def test_patchify_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        patchify_labels(torch.full((1, 2, 2), 3), num_classes=3, patch_size=2)
    with pytest.raises(ValueError, match="outside"):
        patchify_labels(torch.full((1, 2, 2), 255), num_classes=3, patch_size=2)
    with pytest.raises(ValueError, match="whole number"):
        patchify_labels(torch.zeros(1, 3, 4, dtype=torch.long), num_classes=3, patch_size=2)


def test_soft_nn_hand_example():
    query = torch.tensor([[[1.0, 0.0]]])
    keys = torch.tensor([[[3.0, 0.0], [0.0, 2.0]]])  # cosines 1 and 0 once normalised
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out = soft_nn_predict(query, keys, values, temperature=1.0)
    e = math.e
    assert torch.allclose(out, torch.tensor([[[e / (1 + e), 1 / (1 + e)]]]), atol=1e-6)
    out = soft_nn_predict(query, keys, values, temperature=0.5)
    e2 = math.e**2
    assert torch.allclose(out, torch.tensor([[[e2 / (1 + e2), 1 / (1 + e2)]]]), atol=1e-6)


def test_soft_nn_tends_to_hard_nearest_neighbour():
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(3, 10, 8, generator=gen, dtype=torch.float64)
    keys = torch.randn(3, 20, 8, generator=gen, dtype=torch.float64)
    values = torch.rand(3, 20, 5, generator=gen, dtype=torch.float64)
    cos = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).transpose(1, 2)
    top2 = cos.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4  # a unique nearest neighbour per query
    nearest = cos.argmax(-1)  # (B,Nq)
    hard = torch.stack([values[b, nearest[b]] for b in range(3)])
    soft = soft_nn_predict(query, keys, values, temperature=1e-6)
    assert torch.allclose(soft, hard, atol=1e-9)
    warm = soft_nn_predict(query, keys, values, temperature=1.0)
    assert not torch.allclose(warm, hard, atol=1e-2)


def test_soft_nn_invariant_to_permuting_the_support():
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(2, 6, 16, generator=gen)
    keys = torch.randn(2, 12, 16, generator=gen)
    values = torch.rand(2, 12, 4, generator=gen)
    perm = torch.randperm(12, generator=gen)
    base = soft_nn_predict(query, keys, values, temperature=0.07)
    permuted = soft_nn_predict(query, keys[:, perm], values[:, perm], temperature=0.07)
    assert torch.allclose(base, permuted, atol=1e-6)
    mismatched = soft_nn_predict(query, keys, values[:, perm], temperature=0.07)
    assert not torch.allclose(base, mismatched, atol=1e-3)


def _torch_released(pred, labels, patch, ignore_index=-100):
    b, nq, c = pred.shape
    h, w = labels.shape[1] // patch, labels.shape[2] // patch
    grid = pred.transpose(1, 2).reshape(b, c, h, w)
    up = F.interpolate(grid, size=labels.shape[1:], mode="nearest")
    return F.cross_entropy(up, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("patch", [2, 14])
def test_released_loss_equals_torch_cross_entropy_on_upsampled_prediction(patch):
    gen = torch.Generator().manual_seed(2)
    pred = torch.softmax(torch.randn(2, 6, 5, generator=gen), -1)  # a 2x3 patch grid
    labels = torch.randint(0, 5, (2, 2 * patch, 3 * patch), generator=gen)
    ours = incontext_loss(pred, labels, patch)
    assert torch.allclose(ours, _torch_released(pred, labels, patch), atol=1e-6)
    labels[0, :patch, :] = 255
    ours = incontext_loss(pred, labels, patch, ignore_index=255)
    assert torch.allclose(ours, _torch_released(pred, labels, patch, 255), atol=1e-6)


def test_losses_hand_example():
    pred = torch.tensor([[[0.75, 0.25]]])  # one 2x2 patch
    labels = torch.tensor([[[0, 0], [0, 1]]])
    released = (3 * math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5))) / 4
    nll = (3 * -math.log(0.75 + 1e-8) - math.log(0.25 + 1e-8)) / 4
    assert incontext_loss(pred, labels, 2).item() == pytest.approx(released, abs=1e-6)
    assert incontext_loss(pred, labels, 2, kind="nll").item() == pytest.approx(nll, abs=1e-6)
    ignored = torch.tensor([[[0, 255], [255, 1]]])
    assert incontext_loss(pred, ignored, 2, kind="nll", ignore_index=255).item() == pytest.approx(
        (-math.log(0.75 + 1e-8) - math.log(0.25 + 1e-8)) / 2, abs=1e-6
    )


def test_nll_loss_matches_explicit_pixel_loop():
    gen = torch.Generator().manual_seed(3)
    pred = torch.softmax(torch.randn(1, 4, 3, generator=gen), -1)  # a 2x2 patch grid
    labels = torch.randint(0, 3, (1, 6, 6), generator=gen)
    total = 0.0
    for i in range(6):
        for j in range(6):
            total += -math.log(pred[0, (i // 3) * 2 + j // 3, labels[0, i, j]].item() + 1e-8)
    assert incontext_loss(pred, labels, 3, kind="nll").item() == pytest.approx(total / 36, abs=1e-5)


def test_loss_rejects_bad_input():
    pred = torch.full((1, 4, 3), 1 / 3)
    with pytest.raises(ValueError, match="unknown loss kind"):
        incontext_loss(pred, torch.zeros(1, 4, 4, dtype=torch.long), 2, kind="mse")
    with pytest.raises(ValueError, match="patches"):
        incontext_loss(pred, torch.zeros(1, 6, 6, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="outside"):
        incontext_loss(pred, torch.full((1, 4, 4), 3), 2)


def _support_pool(seed: int = 4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(5, 6, 16, generator=gen, dtype=dtype)
    pool = torch.randn(7, 9, 16, generator=gen, dtype=dtype) * 3  # not unit length
    values = torch.rand(7, 9, 4, generator=gen, dtype=dtype)
    index = torch.randint(0, 7, (5, 3), generator=gen)  # repeats allowed
    return query, pool, values, index


def test_indexed_soft_nn_equals_soft_nn_over_the_gathered_support():
    query, pool, values, index = _support_pool(dtype=torch.float64)
    gathered = soft_nn_predict(query, pool[index].flatten(1, 2), values[index].flatten(1, 2), 0.07)
    indexed = soft_nn_predict_indexed(query, pool, values, index, 0.07)
    assert indexed.shape == (5, 6, 4)
    assert torch.allclose(indexed, gathered, atol=1e-12)
    shifted = soft_nn_predict_indexed(query, pool, values, (index + 1) % 7, 0.07)
    assert not torch.allclose(shifted, gathered, atol=1e-3)  # the index decides the support


def test_indexed_soft_nn_under_autocast_matches_the_gathered_form():
    query, pool, values, index = _support_pool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gathered = soft_nn_predict(query, pool[index].flatten(1, 2), values[index].flatten(1, 2),
                                   0.07)
        indexed = soft_nn_predict_indexed(query, pool, values, index, 0.07)
    # the keys are cast to bf16 before the gather instead of after: the same numbers
    assert indexed.dtype == gathered.dtype == torch.bfloat16
    assert torch.equal(indexed, gathered)


def test_indexed_soft_nn_rejects_bad_input():
    query, pool, values, index = _support_pool()
    with pytest.raises(ValueError, match="temperature"):
        soft_nn_predict_indexed(query, pool, values, index, 0.0)
    with pytest.raises(ValueError, match="disagree"):
        soft_nn_predict_indexed(query, pool, values[:, :5], index, 0.07)


def test_unchecked_label_paths_give_the_checked_results():
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 3, (2, 4, 6), generator=gen)
    labels[0, 0, 0] = 255
    small = labels.to(torch.uint8)
    hist = patchify_labels(labels, 3, 2, ignore_index=255)
    assert torch.equal(patchify_labels(small, 3, 2, ignore_index=255, check_values=False), hist)
    pred = torch.softmax(torch.randn(2, 6, 3, generator=gen), -1)
    loss = incontext_loss(pred, labels, 2, ignore_index=255)
    assert torch.equal(incontext_loss(pred, small, 2, ignore_index=255, check_values=False), loss)
    with pytest.raises(ValueError, match="outside"):
        patchify_labels(small, 3, 2)  # 255 is no class and no ignore index: still checked
