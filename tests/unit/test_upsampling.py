"""How per-patch predictions reach pixels: classes by nearest neighbour at pixel centres (the
pseudo-label map), class scores bilinearly before the argmax (the in-context evaluation).
Hand-worked maps where the two rules, and the half-pixel shift of torch's legacy "nearest",
give different pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evaluation.transfer import upsample_scores
from labeling.pseudo_classes import pseudo_label_map

PATCH_CLASSES = torch.tensor([[0, 5, 2],
                              [4, 1, 3]])  # a 2 x 3 patch grid, one class per patch


def _label_map(height: int, width: int) -> torch.Tensor:
    """The pseudo-label map when every pixel is its own segment (the vote keeps its class)."""
    feats = F.one_hot(PATCH_CLASSES, 6).float()  # (2, 3, 6): patch (r, c) nearest centroid k
    segments = torch.arange(height * width).reshape(height, width)
    return pseudo_label_map(feats, segments, torch.eye(6))


def test_pixels_take_the_class_of_the_patch_their_centre_falls_in():
    # pixel i of H lies in patch floor((i + 1/2) g / H): rows of 5 -> 0 0 1 1 1 (legacy
    # nearest, floor(i g / H), gives 0 0 0 1 1); columns of 7 -> 0 0 1 1 1 2 2 (not 0 0 0 1 1 2 2)
    top, bottom = [0, 0, 5, 5, 5, 2, 2], [4, 4, 1, 1, 1, 3, 3]
    assert _label_map(5, 7).tolist() == [top, top, bottom, bottom, bottom]


def test_a_whole_multiple_repeats_each_patch_and_invents_no_class():
    labels = _label_map(4, 9)
    assert torch.equal(labels, PATCH_CLASSES.repeat_interleave(2, 0).repeat_interleave(3, 1))
    # bilinear blending of ids 0 and 5 would create the classes in between
    assert set(_label_map(11, 13).unique().tolist()) == set(PATCH_CLASSES.unique().tolist())


def test_evaluation_scores_are_upsampled_bilinearly_before_the_argmax():
    # two patches: a weak class 0 on the left, a sure class 1 on the right, upsampled to 1 x 8
    scores = torch.tensor([[[[0.55, 0.45], [0.0, 1.0]]]])  # (B=1, h=1, w=2, C=2)
    up = upsample_scores(scores, (1, 8))  # (1, 2, 1, 8)
    # half-pixel centres: pixel x samples the patches at s = (x + 1/2) / 4 - 1/2, clamped
    s = ((torch.arange(8) + 0.5) / 4 - 0.5).clamp(0, 1)
    expected = (1 - s)[:, None] * scores[0, 0, 0] + s[:, None] * scores[0, 0, 1]  # (8, 2)
    torch.testing.assert_close(up[0, :, 0].T, expected)
    # bilinear: class 1 wins from pixel 2 on; nearest would have kept class 0 up to pixel 3
    assert up.argmax(dim=1)[0, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
