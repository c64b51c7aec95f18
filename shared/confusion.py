"""Confusion matrices and IoU, for the evaluation's retrieved labels and the labeling stage's
pseudo-labels against ground truth. Pure tensor functions; rows are true classes, columns
predicted classes (or pseudo-classes, which need not be as many).
"""

from __future__ import annotations

import torch


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int | None = 255,
    num_pred: int | None = None,
) -> torch.Tensor:
    """M[t, p] = #{pixels of true class t predicted as p}, ignored pixels skipped.

    -> (num_classes, num_pred) int64; ``num_pred`` defaults to ``num_classes`` (square).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    num_pred = num_classes if num_pred is None else num_pred
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target class {int(target.max())} outside [0, {num_classes})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_pred):
        raise ValueError(f"predicted class outside [0, {num_pred})")
    flat = target * num_pred + pred
    return torch.bincount(flat, minlength=num_classes * num_pred).view(num_classes, num_pred)


def pair_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU(t, p) = M[t, p] / (#true t + #predicted p - M[t, p]) for every pair -> float64.

    0 where neither class has a pixel.
    """
    conf = confusion.double()
    union = conf.sum(dim=1, keepdim=True) + conf.sum(dim=0, keepdim=True) - conf  # (T, 1) + (1, P)
    return torch.where(union > 0, conf / union.clamp(min=1), torch.zeros_like(conf))


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN) per true class c, column c being its prediction -> (T,) float64.

    Columns past the T classes hold pixels predicted as no true class: they count as misses
    (FN) only. NaN for a class absent from both target and prediction.
    """
    if confusion.ndim != 2 or confusion.shape[1] < confusion.shape[0]:
        raise ValueError(f"confusion must be (T, P) with P >= T, got {tuple(confusion.shape)}")
    num_true = confusion.shape[0]
    conf = confusion.double()
    tp = conf.diagonal()
    fp = conf[:, :num_true].sum(dim=0) - tp  # predicted c, truly another class
    fn = conf.sum(dim=1) - tp  # truly c, predicted another class (or none)
    denom = tp + fp + fn
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))
