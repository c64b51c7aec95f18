"""Pseudo-label quality against ground truth: unsupervised mIoU after matching classes.

NumPy in and out; the confusion matrix and the IoU are shared.confusion's.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from shared.confusion import class_iou, confusion_matrix, pair_iou


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.int64))


def confusion(truth: np.ndarray, pred: np.ndarray, num_true: int, num_pred: int,
              ignore_index: int = 255) -> np.ndarray:
    """(num_true, num_pred) pixel counts of true class i labelled as pseudo-class j."""
    return confusion_matrix(_tensor(pred), _tensor(truth), num_true, ignore_index,
                            num_pred).numpy()


def confusion_entries(truth: np.ndarray, pred: np.ndarray, ignore_index: int = 255
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero cells of :func:`confusion` as columns (true class, pseudo-class, pixels)."""
    if truth.shape != pred.shape:
        raise ValueError(f"ground-truth mask is {truth.shape}, pseudo-labels are {pred.shape}")
    keep = truth.reshape(-1) != ignore_index
    t = truth.reshape(-1)[keep].astype(np.int64)
    p = pred.reshape(-1)[keep].astype(np.int64)
    cells, pixels = np.unique(t * 65536 + p, return_counts=True)  # pseudo-classes are uint16
    return cells // 65536, cells % 65536, pixels.astype(np.int64)


def confusion_from_entries(true_class: np.ndarray, pred_class: np.ndarray, pixels: np.ndarray,
                           num_true: int, num_pred: int) -> np.ndarray:
    """(num_true, num_pred) confusion matrix summed from (true, pred, pixels) columns."""
    flat = np.asarray(true_class, np.int64) * num_pred + np.asarray(pred_class, np.int64)
    return np.bincount(flat, weights=pixels, minlength=num_true * num_pred).astype(
        np.int64).reshape(num_true, num_pred)


def _miou_from_mapping(conf: np.ndarray, mapping: np.ndarray) -> float:
    """mIoU over true classes when pseudo-class j is read as true class mapping[j] (-1: none)."""
    num_true = conf.shape[0]
    mapped = np.zeros((num_true, num_true + 1), dtype=np.int64)  # last column: unmatched
    target = np.where(mapping >= 0, mapping, num_true)
    for j in range(conf.shape[1]):
        mapped[:, target[j]] += conf[:, j]
    return float(torch.nanmean(class_iou(torch.from_numpy(mapped))))


def hungarian_miou(conf: np.ndarray) -> float:
    """Unsupervised mIoU: one-to-one matching of pseudo-classes to true classes maximising overlap."""
    rows, cols = linear_sum_assignment(-conf)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return _miou_from_mapping(conf, mapping)


def majority_miou(conf: np.ndarray) -> float:
    """Many-to-one mIoU: each pseudo-class is read as the true class it overlaps most."""
    mapping = np.where(conf.sum(0) > 0, conf.argmax(0), -1)
    return _miou_from_mapping(conf, mapping)


def best_match_ious(truth: np.ndarray, segments: np.ndarray, ignore_index: int = 255
                    ) -> np.ndarray:
    """Per ground-truth region (each class present in ``truth``), its IoU with the segment that
    overlaps it best -> (R,) float64; ignored pixels count in neither region nor segment.

    Class-agnostic: it asks whether each true region is recovered as one segment, whatever the
    segment's id, so it scores segment maps (before any pseudo-class is assigned).
    """
    if truth.shape != segments.shape:
        raise ValueError(f"ground-truth mask is {truth.shape}, segment map is {segments.shape}")
    conf = confusion(truth, segments, int(truth.max()) + 1, int(segments.max()) + 1,
                     ignore_index)  # (T, S) pixels of region t in segment s
    present = conf.sum(1) > 0  # the ignore class has no pixels left
    iou = pair_iou(torch.from_numpy(conf)).numpy()  # (T, S)
    return iou[present].max(axis=1)
