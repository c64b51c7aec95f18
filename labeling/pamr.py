"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth 2020), as DiffCut's released code runs it.

Masks are refined by repeated label propagation between neighbouring pixels, weighted by image
affinities. For pixel i, its neighbours j are the 8 pixels around it at each dilation d (1, 2, 4, 8),
32 in all; borders replicate the edge pixels:
    sigma_i,c = unbiased std of channel c over the 3 x 3 windows of i at every dilation
                (9 values per dilation, i itself among them once per dilation: 36 values)
    k(i, j)   = -mean_c |I_i,c - I_j,c| / (1e-8 + 0.1 sigma_i,c)
    a(i, j)   = softmax_j k(i, j)                   (over the 32 neighbours, i itself excluded)
    m_i      <- sum_j a(i, j) m_j                   (10 times)
`refine_labels` is the whole refinement of a label map: one-hot masks -> PAMR -> argmax -> a 3 x 3
median filter of the label ids (borders reflected), in the order of DiffCut's evaluation;
`refine_scores` runs it at 128 x 128 on DiffCut's concept scores, as that evaluation does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from labeling.concepts import argmax_first_dim, upsample

DEFAULT_DILATIONS = (1, 2, 4, 8)
DEFAULT_ITERATIONS = 10
DEFAULT_SIZE = 128  # DiffCut's evaluation refines (and scores) its masks at 128 x 128
STD_SCALE = 0.1  # the affinity divides by 0.1 x the local std: a sharper softmax than 1 x std
_DIRECTIONS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
_WINDOW = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # the 3 x 3 window, centre included


def _shifted(x: Tensor, offsets: list[tuple[int, int]], dilations: tuple[int, ...]):
    """Yield (C, H, W) views of x with pixel (y, x) taken from (y + dy d, x + dx d), edges replicated.

    Dilations outermost, offsets innermost: the order of the released shift kernels. One padded
    copy serves every shift (replicating the edge max(d) pixels out or d pixels out is the same).
    """
    pad = max(dilations)
    height, width = x.shape[-2:]
    padded = F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]  # (C, H + 2p, W + 2p)
    for d in dilations:
        for dy, dx in offsets:
            top, left = pad + dy * d, pad + dx * d
            yield padded[:, top : top + height, left : left + width]


def local_std(image: Tensor, dilations: tuple[int, ...] = DEFAULT_DILATIONS) -> Tensor:
    """sigma_i,c: unbiased std over the 3 x 3 windows of every dilation, (C, H, W) -> (C, H, W)."""
    window = torch.stack(list(_shifted(image, _WINDOW, dilations)))  # (9 x len(d), C, H, W)
    return window.std(dim=0, correction=1)


def pamr_affinity(image: Tensor, dilations: tuple[int, ...] = DEFAULT_DILATIONS) -> Tensor:
    """a(i, j) = softmax_j(-mean_c |I_i - I_j| / (1e-8 + 0.1 sigma_i)) of a (C, H, W) image -> (J, H, W)."""
    near = torch.stack(list(_shifted(image, _DIRECTIONS, dilations)))  # (J, C, H, W)
    scale = 1e-8 + STD_SCALE * local_std(image, dilations)  # (C, H, W)
    k = -((near - image[None]).abs() / scale[None]).mean(dim=1)  # (J, H, W)
    return torch.softmax(k, dim=0)


def pamr(
    image: Tensor,
    masks: Tensor,
    iterations: int = DEFAULT_ITERATIONS,
    dilations: tuple[int, ...] = DEFAULT_DILATIONS,
) -> Tensor:
    """Refine (K, H, W) soft masks on a (C, H, W) image: m <- sum_j a(i, j) m_j, `iterations` times."""
    if image.shape[-2:] != masks.shape[-2:]:
        raise ValueError(
            f"pamr: image {tuple(image.shape)} and masks {tuple(masks.shape)} differ in size"
        )
    aff = pamr_affinity(image.to(masks.dtype), dilations)  # (J, H, W)
    for _ in range(iterations):
        out = torch.zeros_like(masks)
        for a, shifted in zip(aff, _shifted(masks, _DIRECTIONS, dilations), strict=True):
            out.addcmul_(a[None], shifted)  # (1, H, W) * (K, H, W)
        masks = out
    return masks


def median3x3(labels: Tensor) -> Tensor:
    """3 x 3 median of an (H, W) map, edge pixels repeated beyond the border -> (H, W), same dtype.

    For a 3-wide window, repeating the edge is what scipy's default 'reflect' border does.
    """
    window = torch.cat(list(_shifted(labels[None], _WINDOW, (1,))))  # (9, H, W)
    return window.median(dim=0).values  # the 5th of 9: always one of the window's values


def refine_labels(
    image: Tensor,
    labels: Tensor,
    num_labels: int,
    iterations: int = DEFAULT_ITERATIONS,
    dilations: tuple[int, ...] = DEFAULT_DILATIONS,
) -> Tensor:
    """PAMR of an (H, W) long label map on a (C, H, W) image, then a 3 x 3 median -> (H, W) long.

    The median runs on the label ids themselves (as the released code does); any order-keeping
    renumbering of the ids gives the same result, so the ids need not be contiguous.
    """
    onehot = F.one_hot(labels, num_labels)  # (H, W, K)
    masks = pamr(image, onehot.permute(2, 0, 1).float(), iterations, dilations)  # (K, H, W)
    return median3x3(masks.argmax(dim=0))


def refine_scores(
    image: Tensor,
    scores: Tensor,
    size: int = DEFAULT_SIZE,
    iterations: int = DEFAULT_ITERATIONS,
    dilations: tuple[int, ...] = DEFAULT_DILATIONS,
    antialias: bool = True,
) -> Tensor:
    """Released PAMR of (K, h, w) concept scores on a (3, R, R) image -> (size, size) long labels.

    As DiffCut's evaluation runs it: the labels are the argmax of the scores upsampled to
    size x size (the concept assignment at that size), the image is resized to size x size
    (bilinear; the released code does not antialias), then `refine_labels`.
    """
    work = (size, size)
    small = F.interpolate(image[None], size=work, mode="bilinear", align_corners=False,
                          antialias=antialias)[0]  # (3, s, s)
    labels = argmax_first_dim(upsample(scores, work))  # (K, s, s) -> (s, s)
    return refine_labels(small, labels, scores.shape[0], iterations, dilations)


def nearest_resize(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """(h, w) label map -> (H, W): each output pixel takes the input pixel under its centre."""
    h, w = labels.shape
    rows = (torch.arange(size[0], device=labels.device) * 2 + 1) * h // (2 * size[0])  # (H,)
    cols = (torch.arange(size[1], device=labels.device) * 2 + 1) * w // (2 * size[1])  # (W,)
    return labels[rows[:, None], cols[None, :]]
