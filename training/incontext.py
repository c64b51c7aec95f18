"""The in-context objective of DIP: patch label histograms, soft nearest-neighbour label transfer
from a support set, and the per-pixel loss. Pure tensor functions, no I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.patch_labels import patch_grid, patch_label_histograms, pixel_patch_index
from shared.soft_transfer import check_temperature, soft_transfer

LOSS_KINDS = ("released", "nll")


def patchify_labels(
    labels: torch.Tensor,
    num_classes: int,
    patch_size: int,
    ignore_index: int | None = None,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Patch label histogram y_j = (1/p^2) sum_{pixels in patch j} onehot(label) (ignored pixels add 0).

    labels: integer Tensor[B,H,W] -> FloatTensor[B, (H/p)*(W/p), num_classes], patches in row-major
    order. ``check_values=False`` skips the label range check, which waits for the device; only for
    callers that checked the labels on the host before moving them.
    """
    hist = patch_label_histograms(labels, num_classes, patch_size, ignore_index,
                                  check_values=check_values)  # (B, H/p, W/p, C)
    return hist.flatten(1, 2)  # (B, (H/p)*(W/p), C)


def soft_nn_predict(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Soft nearest-neighbour transfer (Eq. 1-2): y_i = sum_j softmax_j(cos(q_i, k_j) / T) v_j."""
    check_temperature(temperature)
    if keys.shape[:2] != values.shape[:2]:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree on (B,Ns)")
    q = F.normalize(query, dim=-1)  # (B,Nq,D)
    k = F.normalize(keys, dim=-1)  # (B,Ns,D)
    sim = q @ k.transpose(1, 2)  # (B,Nq,D) x (B,D,Ns) -> (B,Nq,Ns)
    return soft_transfer(sim, values, temperature)  # (B,Nq,C)


def soft_nn_predict_indexed(
    query: torch.Tensor,
    support_keys: torch.Tensor,
    support_values: torch.Tensor,
    support_index: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Eq. 1-2 for a batch of tasks sharing a pool of M support images.

    query (B,Nq,D), support_keys (M,Ns,D), support_values (M,Ns,C), support_index (B,S) -> (B,Nq,C):
    task b's support is images support_index[b]. Equals ``soft_nn_predict(query,
    support_keys[support_index].flatten(1, 2), support_values[support_index].flatten(1, 2), T)``,
    but each support image is normalised once, not once per task that uses it.
    """
    check_temperature(temperature)
    if support_keys.shape[:2] != support_values.shape[:2]:
        raise ValueError(f"support keys {tuple(support_keys.shape)} and values "
                         f"{tuple(support_values.shape)} disagree on (M,Ns)")
    b, s = support_index.shape
    q = F.normalize(query, dim=-1)  # (B,Nq,D)
    k = F.normalize(support_keys, dim=-1)  # (M,Ns,D)
    device = k.device.type
    if torch.is_autocast_enabled(device):
        # the matmul would cast the gathered keys anyway: casting the M images first gathers half
        k = k.to(torch.get_autocast_dtype(device))
    keys = k[support_index].reshape(b, s * k.shape[1], -1)  # (B,S,Ns,D) -> (B,S*Ns,D)
    values = support_values[support_index].reshape(b, s * k.shape[1], -1)  # (B,S*Ns,C)
    sim = q @ keys.transpose(1, 2)  # (B,Nq,D) x (B,D,S*Ns) -> (B,Nq,S*Ns)
    return soft_transfer(sim, values, temperature)  # (B,Nq,C)


def incontext_loss(
    pred: torch.Tensor,
    labels: torch.Tensor,
    patch_size: int,
    kind: str = "released",
    ignore_index: int | None = None,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Per-pixel loss of the patch prediction, nearest-upsampled by p to the label map.

    "released": CE(upsample(pred), labels) with pred taken as logits, L = mean(logsumexp(pred) - pred[y]).
    "nll":      L = mean(-log(upsample(pred)[y] + 1e-8)), the paper's wording.
    Pixels equal to ``ignore_index`` are left out of the mean. ``check_values=False`` skips the
    label range check (a device sync and a data-dependent shape), as in :func:`patchify_labels`.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
    if pred.ndim != 3 or labels.ndim != 3 or pred.shape[0] != labels.shape[0]:
        raise ValueError(f"pred (B,Nq,C) {tuple(pred.shape)} and labels (B,H,W) {tuple(labels.shape)} disagree")
    b, nq, num_classes = pred.shape
    height, width = labels.shape[1:]
    h, w = patch_grid(height, width, patch_size)
    if nq != h * w:
        raise ValueError(f"pred has {nq} patches but a {height}x{width} label map has {h}x{w}")
    labels = labels.long().reshape(b, -1)  # (B,H*W)
    valid = torch.ones_like(labels, dtype=torch.bool)
    if ignore_index is not None:
        valid = labels != ignore_index
    if check_values and ((labels[valid] < 0) | (labels[valid] >= num_classes)).any():
        raise ValueError(f"labels outside [0, {num_classes}) that are not the ignore index {ignore_index}")
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
    # (score of each patch per class), gathered per pixel instead of materialising (B,C,H,W)
    scores = pred.log_softmax(dim=-1) if kind == "released" else torch.log(pred + 1e-8)  # (B,Nq,C)
    patch = pixel_patch_index(height, width, patch_size, pred.device).expand(b, -1)  # (B,H*W)
    flat = patch * num_classes + labels.clamp(0, num_classes - 1)  # (B,H*W)
    picked = scores.reshape(b, -1).gather(1, flat)  # (B,H*W) score of the pixel's label
    return -(picked * valid).sum() / valid.sum()
