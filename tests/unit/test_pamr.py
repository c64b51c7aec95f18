"""PAMR as DiffCut's released code runs it, against a direct loop written from its description."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter

from labeling.pamr import (
    DEFAULT_DILATIONS,
    DEFAULT_ITERATIONS,
    DEFAULT_SIZE,
    local_std,
    median3x3,
    nearest_resize,
    pamr,
    pamr_affinity,
    refine_labels,
    refine_scores,
)

# a hand-made 2-channel 5 x 6 image: a bright block in the top right, a ramp in channel 1
HAND_IMAGE = [
    [[0.1, 0.1, 0.2, 0.9, 0.9, 0.8],
     [0.1, 0.2, 0.1, 0.9, 1.0, 0.9],
     [0.2, 0.1, 0.1, 0.8, 0.9, 0.9],
     [0.1, 0.1, 0.2, 0.1, 0.2, 0.1],
     [0.0, 0.1, 0.1, 0.2, 0.1, 0.1]],
    [[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
     [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
     [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
     [0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
     [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]],
]  # fmt: skip
HAND_LABELS = [[0, 0, 0, 2, 2, 2],
               [0, 0, 2, 2, 2, 2],
               [0, 0, 0, 0, 2, 2],
               [0, 0, 0, 0, 0, 0],
               [0, 0, 0, 0, 0, 2]]  # fmt: skip


def _at(img, c, y, x):
    """img[c][y][x] with coordinates clamped to the image (edge pixels repeated)."""
    rows, cols = len(img[0]), len(img[0][0])
    return img[c][min(max(y, 0), rows - 1)][min(max(x, 0), cols - 1)]


def loop_affinity(img, dilations):
    """Per pixel: [(a_ij, (dy, dx)), ...] over the 8 neighbours at each dilation, pure Python."""
    channels, rows, cols = len(img), len(img[0]), len(img[0][0])
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    out = {}
    for y in range(rows):
        for x in range(cols):
            sigma = [statistics.stdev([_at(img, c, y + dy * d, x + dx * d)  # unbiased, n - 1
                                       for d in dilations for dy, dx in offsets])
                     for c in range(channels)]  # fmt: skip
            logits, where = [], []
            for d in dilations:
                for dy, dx in offsets:
                    if (dy, dx) == (0, 0):
                        continue
                    k = -sum(abs(img[c][y][x] - _at(img, c, y + dy * d, x + dx * d))
                             / (1e-8 + 0.1 * sigma[c]) for c in range(channels)) / channels
                    logits.append(k)
                    where.append((dy * d, dx * d))
            top = max(logits)
            weights = [math.exp(k - top) for k in logits]
            out[y, x] = [(w / sum(weights), off) for w, off in zip(weights, where, strict=True)]
    return out


def loop_pamr(img, masks, iterations, dilations):
    """m_i <- sum_j a_ij m_j, `iterations` times, pure Python lists."""
    aff = loop_affinity(img, dilations)
    rows, cols = len(img[0]), len(img[0][0])
    for _ in range(iterations):
        masks = [[[sum(a * _at(masks, k, y + dy, x + dx) for a, (dy, dx) in aff[y, x])
                   for x in range(cols)] for y in range(rows)] for k in range(len(masks))]
    return masks


def onehot_lists(labels, k):
    return [[[1.0 if v == i else 0.0 for v in row] for row in labels] for i in range(k)]


def test_the_defaults_are_the_released_ones():
    assert DEFAULT_DILATIONS == (1, 2, 4, 8) and DEFAULT_ITERATIONS == 10 and DEFAULT_SIZE == 128


@pytest.mark.parametrize("dilations", [(1,), (1, 2), (1, 2, 4, 8)])
def test_pamr_equals_the_direct_loop_on_a_hand_made_image(dilations):
    masks = onehot_lists(HAND_LABELS, 3)
    expected = torch.tensor(loop_pamr(HAND_IMAGE, masks, 3, dilations), dtype=torch.float64)
    ours = pamr(torch.tensor(HAND_IMAGE, dtype=torch.float64),
                torch.tensor(masks, dtype=torch.float64), 3, dilations)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12)


def test_affinity_equals_the_direct_loop_neighbour_by_neighbour():
    aff = pamr_affinity(torch.tensor(HAND_IMAGE, dtype=torch.float64), (1, 2))  # (16, 5, 6)
    expected = loop_affinity(HAND_IMAGE, (1, 2))
    for (y, x), pairs in expected.items():
        assert torch.allclose(aff[:, y, x], torch.tensor([a for a, _ in pairs], dtype=torch.float64),
                              rtol=0, atol=1e-12)


def test_local_std_is_unbiased_with_the_centre_once_per_dilation():
    img = torch.tensor(HAND_IMAGE, dtype=torch.float64)
    y, x = 1, 4  # the top border clamps the row above at dilation 2
    values = [_at(HAND_IMAGE, 0, y + dy * d, x + dx * d)
              for d in (1, 2) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # 18 values, centre twice
    assert len(values) == 18 and values.count(HAND_IMAGE[0][y][x]) >= 2
    assert local_std(img, (1, 2))[0, y, x].item() == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert local_std(img, (1, 2))[0, y, x].item() != pytest.approx(statistics.pstdev(values))


def test_a_flat_image_propagates_uniformly_and_one_mask_stays_constant():
    flat = torch.full((3, 10, 10), 0.3)
    assert torch.allclose(pamr_affinity(flat, (1, 2)), torch.full((16, 10, 10), 1 / 16))
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pamr(img, torch.ones(1, 16, 16), 3), torch.ones(1, 16, 16), atol=1e-6)


def test_pamr_moves_a_misplaced_boundary_to_the_image_edge():
    img = torch.zeros(3, 32, 32)
    img[:, :, 16:] = 1.0
    img += 0.02 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    wrong = torch.zeros(32, 32, dtype=torch.long)
    wrong[:, 19:] = 1  # boundary 3 px right of the edge
    refined = refine_labels(img, wrong, 2)
    truth = torch.zeros(32, 32, dtype=torch.long)
    truth[:, 16:] = 1
    assert torch.equal(refined, truth)
    soft = pamr(img, F.one_hot(wrong, 2).permute(2, 0, 1).float())
    assert torch.allclose(soft.sum(dim=0), torch.ones(32, 32), atol=1e-5)  # mass is kept


def test_sizes_must_agree():
    with pytest.raises(ValueError, match="differ in size"):
        pamr(torch.zeros(3, 8, 8), torch.zeros(2, 8, 9))


@pytest.mark.parametrize("shape", [(7, 9), (1, 5), (12, 12)])
def test_median_equals_scipy_median_filter_as_the_release_calls_it(shape):
    labels = torch.randint(0, 6, shape, generator=torch.Generator().manual_seed(sum(shape)))
    # the released call: a (1, H, W) float map, size 3 on every axis, scipy's default border
    expected = median_filter(labels[None].numpy().astype(np.float64), 3).astype(int)[0]
    assert np.array_equal(median3x3(labels).numpy(), expected)


def test_refine_labels_is_pamr_then_argmax_then_median_on_present_labels_only():
    # ids 0 and 2 only: the release one-hots the labels present (torch.unique), we one-hot all K
    img = torch.tensor(HAND_IMAGE, dtype=torch.float64)
    labels = torch.tensor(HAND_LABELS)
    present = labels.unique()
    masks = torch.stack([(labels == p).double() for p in present])
    argmax = torch.tensor(loop_pamr(HAND_IMAGE, masks.tolist(), 10, DEFAULT_DILATIONS)).argmax(0)
    expected = present[median_filter(argmax[None].numpy(), 3)[0]]
    ours = refine_labels(img, labels, 3)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, torch.tensor(loop_pamr(HAND_IMAGE, onehot_lists(HAND_LABELS, 3),
                                                        10, DEFAULT_DILATIONS)).argmax(0))


def test_refine_scores_works_at_the_given_size_on_the_resized_image():
    gen = torch.Generator().manual_seed(1)
    image, scores = torch.rand(3, 96, 96, generator=gen), torch.randn(4, 6, 6, generator=gen)
    out = refine_scores(image, scores, size=24, iterations=2, antialias=False)
    small = F.interpolate(image[None], size=(24, 24), mode="bilinear", antialias=False)[0]
    labels = F.interpolate(scores[None], size=(24, 24), mode="bilinear")[0].argmax(0)
    assert out.shape == (24, 24) and torch.equal(out, refine_labels(small, labels, 4, 2))
    assert not torch.equal(refine_scores(image, scores, 24, 2, antialias=True), out)


def test_refine_scores_never_waits_for_the_device():
    # the meta device has shapes but no values: any read of one (a host wait on a GPU) raises
    image, scores = torch.empty(3, 64, 64, device="meta"), torch.empty(5, 8, 8, device="meta")
    out = refine_scores(image, scores, size=32)
    assert out.shape == (32, 32) and out.dtype == torch.long and out.device.type == "meta"


def test_nearest_resize_takes_the_pixel_under_each_centre():
    labels = torch.tensor([[0, 1], [2, 3]])
    assert nearest_resize(labels, (4, 3)).tolist() == [[0, 1, 1], [0, 1, 1], [2, 3, 3], [2, 3, 3]]
    big = torch.arange(36).reshape(6, 6)
    assert nearest_resize(big, (3, 2)).tolist() == [[7, 10], [19, 22], [31, 34]]  # rows 1, 3, 5
    assert torch.equal(nearest_resize(big, (6, 6)), big)


@pytest.mark.gpu
def test_the_refinement_on_a_gpu_equals_the_cpu():
    gen = torch.Generator().manual_seed(3)
    image, scores = torch.rand(3, 256, 256, generator=gen), torch.randn(6, 8, 8, generator=gen)
    cpu = refine_scores(image, scores, antialias=False)
    gpu = refine_scores(image.cuda(), scores.cuda(), antialias=False)
    assert gpu.is_cuda and (gpu.cpu() == cpu).float().mean() > 0.999  # float sums differ in bits
    labels = torch.randint(0, 6, (40, 50), generator=gen)
    assert torch.equal(median3x3(labels.cuda()).cpu(), median3x3(labels))
