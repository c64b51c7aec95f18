"""Class histograms of the non-overlapping p x p patches of label maps: the patch values of
in-context training (support labels) and of the evaluation memory bank. Pure tensor functions.

The two stages treat the ignore index differently, so the rule is a parameter: training leaves
ignored pixels out of every class (``ignore_as=None``); the reference evaluations count them as
class 0 (``ignore_as=0``), so every histogram sums to 1.
"""

from __future__ import annotations

import torch


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """(H/p, W/p) of a label map, or ValueError when it is not a whole number of patches."""
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"label map {height}x{width} is not a whole number of {patch_size}x{patch_size} patches"
        )
    return height // patch_size, width // patch_size


def pixel_patch_index(height: int, width: int, patch_size: int, device=None) -> torch.Tensor:
    """Row-major index of the patch each pixel of an (H, W) map lies in -> (H*W,) int64."""
    _, w = patch_grid(height, width, patch_size)
    rows = torch.arange(height, device=device) // patch_size  # (H,)
    cols = torch.arange(width, device=device) // patch_size  # (W,)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)  # (H*W,)


def patch_label_histograms(
    labels: torch.Tensor,
    num_classes: int,
    patch_size: int,
    ignore_index: int | None = None,
    ignore_as: int | None = None,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """h_jc = (1/p^2) #{pixels of patch j with label c}: labels (B, H, W) -> (B, H/p, W/p, C).

    A pixel equal to ``ignore_index`` adds to no class when ``ignore_as`` is None, else it
    counts as class ``ignore_as``. ``check_values=False`` skips the label range check, which
    waits for the device; only for callers that checked the labels on the host.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B,H,W), got shape {tuple(labels.shape)}")
    if ignore_as is not None and not 0 <= ignore_as < num_classes:
        raise ValueError(f"ignore_as {ignore_as} is not a class of [0, {num_classes})")
    b, height, width = labels.shape
    h, w = patch_grid(height, width, patch_size)
    labels = labels.long()
    valid = torch.ones_like(labels, dtype=torch.bool)
    if ignore_index is not None:
        ignored = labels == ignore_index
        if ignore_as is None:
            valid = ~ignored
        else:
            labels = labels.masked_fill(ignored, ignore_as)
    if check_values and (bad := valid & ((labels < 0) | (labels >= num_classes))).any():
        value = int(labels[bad][0])
        raise ValueError(
            f"label {value} outside [0, {num_classes}) and not the ignore index {ignore_index}"
        )
    patch = pixel_patch_index(height, width, patch_size, labels.device)  # (H*W,)
    flat = patch * num_classes + labels.clamp(0, num_classes - 1).reshape(b, -1)  # (B,H*W)
    counts = torch.zeros(b, h * w * num_classes, device=labels.device, dtype=torch.float32)
    counts.scatter_add_(1, flat, valid.reshape(b, -1).float())
    return counts.view(b, h, w, num_classes) / float(patch_size * patch_size)
