"""Concept assignment: token-grid segments -> a label per pixel at the image's own size.

c_k = mean normalised token feature of segment k; the label of a pixel is
argmax_k <bilinear-upsampled feature, c_k>. Bilinear upsampling is linear, so this equals the
argmax over the K score maps <f, c_k> computed on the token grid and then upsampled, which needs
K maps instead of C feature channels at full size. The upsampling is written as two small
interpolation matrices (rows and columns), so the full-size maps are produced a band of rows at a
time and never held in memory at once.

Everything here runs on the tensors' own device with no host synchronisation once the number of
segments is given (`num_segments`): a GPU worker queues the whole assignment, through the
contiguous renumbering (`contiguous_ids`), without waiting on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

BAND_ELEMENTS = 1 << 24  # K x rows x W values per band of rows


def segment_centroids(features: Tensor, labels: Tensor, num_segments: int | None = None) -> Tensor:
    """c_k = mean of the (N, C) features with label k -> (K, C); an empty segment gets zeros."""
    k = int(labels.max()) + 1 if num_segments is None else num_segments  # None: a host sync
    sums = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    # counts as sums of ones (exact integers): unlike bincount, no host sync on a GPU
    counts = torch.zeros(k, dtype=features.dtype, device=features.device)
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=features.dtype))
    return sums / counts.clamp_min(1)[:, None]


def concept_scores(
    features: Tensor, labels: Tensor, grid: tuple[int, int], num_segments: int | None = None
) -> Tensor:
    """<f_token, c_k> for (h*w, C) features and (h*w,) segment labels -> (K, h, w) score maps."""
    centroids = segment_centroids(features, labels, num_segments)  # (K, C)
    scores = centroids @ features.T  # (K, C) x (C, h*w) -> (K, h*w)
    return scores.reshape(-1, *grid)


def bilinear_matrix(
    out_size: int, in_size: int, dtype: torch.dtype = torch.float32, device=None
) -> Tensor:
    """(out, in) weights of 1-D bilinear resizing with half-pixel centres (align_corners=False).

    Built on `device` in float64 (each step one correctly rounded operation, so every device gets
    the same bits), then cast: no host-to-device copy, which would wait for queued GPU work.
    """
    src = (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * (in_size / out_size)
    src = (src - 0.5).clamp_min(0.0)  # F.interpolate clamps negative coordinates to the first pixel
    lo = src.floor().long().clamp_max(in_size - 1)
    hi = (lo + 1).clamp_max(in_size - 1)
    frac = (src - lo)[:, None]  # (out, 1)
    cols = torch.arange(in_size, device=device)[None, :]  # (1, in)
    # at the last pixel lo == hi and the two weights add up: (1 - frac) + frac
    mat = torch.where(cols == lo[:, None], 1.0 - frac, 0.0)  # (out, in)
    return mat.add_(torch.where(cols == hi[:, None], frac, 0.0)).to(dtype)


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
        out[top : top + band] = argmax_first_dim(rows)
    return out


def argmax_first_dim(x: Tensor) -> Tensor:
    """x.argmax(dim=0) of a (K, ...) tensor -> (...) long; the first maximum wins, as in argmax.

    On the CPU the K values of each position are made adjacent first: an argmax over the last
    dimension runs about 2.5x faster there than one over the first (18 against 48 ms for
    15 x 480 x 640), copy included. Other devices reduce over the first dimension directly.
    """
    if x.device.type != "cpu":
        return x.argmax(dim=0)
    return x.movedim(0, -1).contiguous().argmax(dim=-1)


def assign_concepts(
    features: Tensor,
    labels: Tensor,
    grid: tuple[int, int],
    out_size: tuple[int, int],
    num_segments: int | None = None,
) -> Tensor:
    """Full-resolution labels: argmax_k <upsampled f, c_k> via upsampled score maps -> (H, W) long."""
    return upsample_argmax(concept_scores(features, labels, grid, num_segments), out_size)


def contiguous_ids(labels: Tensor, num_labels: int) -> Tensor:
    """Map the ids present in long `labels` (0..num_labels-1) to 0..S-1, keeping their order.

    -> int32 tensor of the same shape, on the same device; the ids that no pixel has are skipped.
    A presence mask and its running count replace a sort (`unique`), and nothing waits on the
    device: the output size is known.
    """
    present = torch.zeros(num_labels, dtype=torch.int32, device=labels.device)
    present.index_fill_(0, labels.reshape(-1), 1)  # (num_labels,) 1 where an id occurs
    new_id = present.cumsum_(0).sub_(1)  # (num_labels,) rank among the present ids
    return torch.take(new_id, labels)
