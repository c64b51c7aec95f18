"""Pixel-adaptive mask refinement (PAMR, Araslanov & Roth 2020), written from the paper's description.

Masks are refined by repeated label propagation between neighbouring pixels, weighted by image
affinities. For pixel i and a neighbour j (the 8 neighbours of i at each of several dilations):
    k(i, j)  = -mean_c |I_i,c - I_j,c| / sigma_i,c       (sigma_i,c: std of channel c over i and its neighbours)
    a(i, j)  = softmax_j k(i, j)
    m_i     <- sum_j a(i, j) m_j                          (repeated `iterations` times)
Borders replicate the edge pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_DILATIONS = (1, 2, 4, 8, 12, 24)
DEFAULT_ITERATIONS = 10
_DIRECTIONS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(x: Tensor, dilations: tuple[int, ...]):
    """Yield (C, H, W) copies of x shifted to each neighbour offset, edges replicated."""
    pad = max(dilations)
    height, width = x.shape[-2:]
    padded = F.pad(x[None], (pad, pad, pad, pad), mode="replicate")[0]  # (C, H + 2p, W + 2p)
    for d in dilations:
        for dy, dx in _DIRECTIONS:
            yield padded[
                :, pad + dy * d : pad + dy * d + height, pad + dx * d : pad + dx * d + width
            ]


def pamr_affinity(image: Tensor, dilations: tuple[int, ...] = DEFAULT_DILATIONS) -> Tensor:
    """a(i, j) = softmax_j(-mean_c |I_i - I_j| / sigma_i) for a (C, H, W) image -> (J, H, W)."""
    near = torch.stack(list(_shifted(image, dilations)))  # (J, C, H, W)
    window = torch.cat([near, image[None]], dim=0)  # the pixel and its neighbours
    sigma = window.std(dim=0, unbiased=False)  # (C, H, W)
    k = -((near - image[None]).abs() / (sigma[None] + 1e-8)).mean(dim=1)  # (J, H, W)
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
        for a, shifted in zip(aff, _shifted(masks, dilations), strict=True):
            out.addcmul_(a[None], shifted)  # (1, H, W) * (K, H, W)
        masks = out
    return masks
