"""Concept assignment: token-grid segments -> a label per pixel at the image's own size.

c_k = mean normalised token feature of segment k; the label of a pixel is
argmax_k <bilinear-upsampled feature, c_k>. Bilinear upsampling is linear, so this equals the
argmax over the K score maps <f, c_k> computed on the token grid and then upsampled, which needs
K maps instead of C feature channels at full size. The upsampling is written as two small
interpolation matrices (rows and columns), so the full-size maps are produced a band of rows at a
time and never held in memory at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

BAND_ELEMENTS = 1 << 24  # K x rows x W values per band of rows


def segment_centroids(features: Tensor, labels: Tensor, num_segments: int | None = None) -> Tensor:
    """c_k = mean of the (N, C) features with label k -> (K, C); an empty segment gets zeros."""
    k = int(labels.max()) + 1 if num_segments is None else num_segments
    sums = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def concept_scores(features: Tensor, labels: Tensor, grid: tuple[int, int]) -> Tensor:
    """<f_token, c_k> for (h*w, C) features and (h*w,) segment labels -> (K, h, w) score maps."""
    centroids = segment_centroids(features, labels)  # (K, C)
    scores = centroids @ features.T  # (K, C) x (C, h*w) -> (K, h*w)
    return scores.reshape(-1, *grid)


def bilinear_matrix(
    out_size: int, in_size: int, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """(out, in) weights of 1-D bilinear resizing with half-pixel centres (align_corners=False)."""
    src = (torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5
    src = src.clamp_min(0.0)  # F.interpolate clamps negative source coordinates to the first pixel
    lo = src.floor().long().clamp_max(in_size - 1)
    hi = (lo + 1).clamp_max(in_size - 1)
    frac = src - lo
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat.to(dtype=dtype, device=device)


def upsample(maps: Tensor, out_size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) resize of (K, h, w) maps -> (K, H, W), as separable products."""
    ry = bilinear_matrix(out_size[0], maps.shape[1], maps.dtype, maps.device)  # (H, h)
    rx = bilinear_matrix(out_size[1], maps.shape[2], maps.dtype, maps.device)  # (W, w)
    return ry @ maps @ rx.T  # (H, h) x (K, h, w) x (w, W) -> (K, H, W)


def upsample_argmax(maps: Tensor, out_size: tuple[int, int]) -> Tensor:
    """argmax_k of the bilinearly upsampled (K, h, w) maps -> (H, W) long, one band of rows at a time."""
    k, _, w = maps.shape
    height, width = out_size
    ry = bilinear_matrix(height, maps.shape[1], maps.dtype, maps.device)  # (H, h)
    rx = bilinear_matrix(width, w, maps.dtype, maps.device)  # (W, w)
    cols = maps @ rx.T  # (K, h, w) x (w, W) -> (K, h, W)
    band = max(1, BAND_ELEMENTS // (k * width))
    out = torch.empty(height, width, dtype=torch.long, device=maps.device)
    for top in range(0, height, band):
        rows = ry[top : top + band] @ cols  # (b, h) x (K, h, W) -> (K, b, W)
        out[top : top + band] = rows.argmax(dim=0)
    return out


def assign_concepts(
    features: Tensor, labels: Tensor, grid: tuple[int, int], out_size: tuple[int, int]
) -> Tensor:
    """Full-resolution labels: argmax_k <upsampled f, c_k> via upsampled score maps -> (H, W) long."""
    return upsample_argmax(concept_scores(features, labels, grid), out_size)
