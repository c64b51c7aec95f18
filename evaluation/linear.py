"""Linear-probe baseline: a frozen encoder, a 1x1 convolution trained on its patch features.

Features of the training images are computed once (the encoder never changes); the head maps
each D-dimensional patch feature to C class logits, the logits are bilinearly upsampled to the
label size, and trained with pixel cross-entropy (ignore index skipped). Scored by mIoU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.devices import default_device

from .encode import encode_resized
from .transfer import ConfusionAccumulator


def extract_features(backbone, dataset, indices, size: int, batch_size: int = 8,
                     device=None, threads: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features (N, h, w, D) float16 and labels (N, S, S) of the images at ``indices``."""
    return encode_resized(backbone, dataset, list(indices), size, batch_size,
                          default_device(device), lambda dense: dense.half().cpu(), threads)


def linear_head(dim: int, num_classes: int) -> nn.Conv2d:
    """logits_c(patch) = w_c . f(patch) + b_c, as a 1x1 convolution over the patch grid."""
    return nn.Conv2d(dim, num_classes, kernel_size=1)


def head_logits(head: nn.Module, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Features (B, h, w, D) -> logits (B, C, H, W), bilinearly upsampled."""
    logits = head(feats.permute(0, 3, 1, 2).float())  # (B, D, h, w) -> (B, C, h, w)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def train_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 16,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device=None,
) -> nn.Conv2d:
    """Train the 1x1-conv head with AdamW on cached features; returns the head (eval mode)."""
    device = default_device(device)
    torch.manual_seed(seed)
    head = linear_head(feats.shape[-1], num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    size = tuple(labels.shape[-2:])
    for _ in range(epochs):
        order = torch.randperm(feats.shape[0], generator=gen)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            logits = head_logits(head, feats[batch].to(device), size)
            loss = F.cross_entropy(logits, labels[batch].to(device).long(),
                                   ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def evaluate_linear_probe(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                          num_classes: int, ignore_index: int = 255,
                          batch_size: int = 16) -> float:
    """mIoU of the head's argmax predictions; identity matching (the head is trained on the true
    class ids, as open-hummingbird-eval's linear-probe mode also scores it)."""
    device = next(head.parameters()).device
    acc = ConfusionAccumulator(num_classes, ignore_index)
    for start in range(0, feats.shape[0], batch_size):
        logits = head_logits(head, feats[start : start + batch_size].to(device),
                             tuple(labels.shape[-2:]))
        acc.update(logits.argmax(dim=1).cpu(), labels[start : start + batch_size])
    return acc.miou("identity")


def run_linear_probe(backbone, train, val, size: int, epochs: int = 10, lr: float = 1e-3,
                     batch_size: int = 16, seed: int = 0, device=None,
                     weight_decay: float = 1e-4) -> dict:
    """Linear-probe mIoU of a frozen encoder: train on ``train``, score on ``val``."""
    tr_f, tr_l = extract_features(backbone, train, range(len(train)), size, device=device)
    va_f, va_l = extract_features(backbone, val, range(len(val)), size, device=device)
    head = train_linear_probe(tr_f, tr_l, train.num_classes, train.ignore_index, epochs, lr,
                              batch_size, weight_decay, seed=seed, device=device)
    return {"miou": evaluate_linear_probe(head, va_f, va_l, val.num_classes, val.ignore_index),
            "matching": "identity", "train_images": len(train), "val_images": len(val)}
