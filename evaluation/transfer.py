"""Label transfer from a memory bank and the benchmark metrics. Pure tensor functions, no I/O.

A query patch takes the values (class histograms, or depth) of its k most cosine-similar bank
patches, weighted by softmax(similarity / temperature). Segmentation is scored by mIoU from a
confusion matrix, depth by RMSE in metres.

Class matching before the IoU: ``identity`` scores predicted class c as class c (the DIP
authors' evaluation); ``hungarian`` first relabels the predicted classes by the one-to-one
assignment that maximises the summed IoU (open-hummingbird-eval). Retrieved labels carry the
true class ids, so the two agree unless the prediction confuses classes systematically.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from shared.confusion import class_iou, confusion_matrix, pair_iou
from shared.patch_labels import patch_label_histograms
from shared.soft_transfer import check_temperature, soft_transfer

from .search import TorchSearch, transfer_from_shards

MATCHINGS = ("identity", "hungarian")


def exact_topk(
    query: torch.Tensor, bank: torch.Tensor, k: int, query_chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k: s_ij = <q_i/|q_i|, b_j/|b_j|>, the k largest per query (descending).

    query (Nq, D), bank (Nb, D) -> similarities (Nq, min(k, Nb)) float32, indices int64, on the
    CPU. The benchmark's exact search (:class:`evaluation.search.TorchSearch`, float32) over a
    bank of one shard, on the query's device, ``query_chunk`` queries at a time.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and bank {tuple(bank.shape)} must be (N, D)")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    searcher = TorchSearch(k=k, device=query.device, query_chunk=query_chunk)
    sims, idx = searcher.search(query, [(0, bank)])
    kk = min(k, bank.shape[0])  # TorchSearch pads a small bank's slots with (-inf, -1)
    return sims[:, :kk], idx[:, :kk]


def weighted_values(sims: torch.Tensor, values: torch.Tensor, temperature: float) -> torch.Tensor:
    """y_i = sum_k softmax_k(s_ik / T) v_ik for sims (Nq, k) and neighbour values (Nq, k, C)."""
    out = soft_transfer(sims[:, None, :], values, temperature)  # (Nq, 1, k) x (Nq, k, C)
    return out[:, 0]  # (Nq, C)


def label_transfer(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_values: torch.Tensor,
    k: int = 30,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Soft top-k transfer: y_i = sum_{j in topk_i} softmax_j(cos(q_i, b_j) / T) v_j -> (Nq, C).

    The benchmark's path on a bank of one shard: exact search, then the streamed transfer
    (:func:`evaluation.search.transfer_from_shards`); the result is on the query's device.
    """
    if bank_values.shape[0] != bank.shape[0]:
        raise ValueError(
            f"bank has {bank.shape[0]} patches but bank_values has {bank_values.shape[0]} rows"
        )
    check_temperature(temperature)
    sims, idx = exact_topk(query, bank, k)
    values = bank_values if bank_values.ndim == 2 else bank_values[:, None]
    out = transfer_from_shards(sims, idx, [(0, values)], values.shape[1], temperature)
    return out.to(query.device)


def patch_histograms(
    labels: torch.Tensor, num_classes: int, patch_size: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Patch class histogram h_jc = (1/p^2) #{pixels of patch j with label c}; ignore counts as c=0.

    labels (B, H, W) -> (B, H/p, W/p, C); every histogram sums to 1 (the reference evaluations'
    rule; :func:`shared.patch_labels.patch_label_histograms` with ``ignore_as=0``).
    """
    return patch_label_histograms(labels, num_classes, patch_size, ignore_index, ignore_as=0)


def patch_mean_depth(
    depth: torch.Tensor, valid: torch.Tensor, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch depth d_j = mean of the valid pixels of patch j -> (B, h, w), and which patches have any."""
    b, height, width = depth.shape
    h, w = height // patch_size, width // patch_size
    blocks = (depth * valid).view(b, h, patch_size, w, patch_size).sum(dim=(2, 4))
    counts = valid.float().view(b, h, patch_size, w, patch_size).sum(dim=(2, 4))
    has = counts > 0
    return torch.where(has, blocks / counts.clamp(min=1), torch.zeros_like(blocks)), has


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch scores (B, h, w, C) -> bilinear per-pixel scores (B, C, H, W)."""
    return F.interpolate(scores.permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                         align_corners=False)


def _check_square(confusion: torch.Tensor) -> None:
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be square (C, C), got {tuple(confusion.shape)}")


def hungarian_mapping(confusion: torch.Tensor) -> torch.Tensor:
    """mapping[p] = the true class predicted class p is read as: the permutation maximising
    sum_p IoU(mapping[p], p) (scipy's linear_sum_assignment on the cost 1 - IoU) -> (C,) int64."""
    _check_square(confusion)
    rows, cols = linear_sum_assignment(1.0 - pair_iou(confusion.cpu()).numpy())
    mapping = np.empty(confusion.shape[1], dtype=np.int64)
    mapping[cols] = rows  # square: every predicted class gets exactly one true class
    return torch.from_numpy(mapping)


def match_classes(confusion: torch.Tensor, matching: str = "identity") -> torch.Tensor:
    """The confusion matrix with its predicted columns relabelled by ``matching`` -> (C, C)."""
    _check_square(confusion)
    if matching == "identity":
        return confusion
    if matching != "hungarian":
        raise ValueError(f"unknown matching {matching!r}; expected one of {MATCHINGS}")
    mapping = hungarian_mapping(confusion).to(confusion.device)
    matched = torch.zeros_like(confusion)
    return matched.index_add_(1, mapping, confusion)  # column p lands in column mapping[p]


def iou_per_class(confusion: torch.Tensor, matching: str = "identity") -> torch.Tensor:
    """IoU_c = TP / (TP + FP + FN) per class after ``matching``; NaN for a class absent from both
    target and prediction."""
    return class_iou(match_classes(confusion, matching))


def miou(confusion: torch.Tensor, matching: str = "identity") -> float:
    """mIoU = nanmean_c TP_c / (TP_c + FP_c + FN_c) of a (C, C) confusion matrix (rows = truth),
    predicted classes first matched to true ones by ``matching`` ("identity" or "hungarian")."""
    return float(torch.nanmean(iou_per_class(confusion, matching)))


class ConfusionAccumulator:
    """Sums confusion matrices over batches of predictions (pixel counts in int64)."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pixels of one batch of predicted and true label maps."""
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index).cpu()

    def miou(self, matching: str = "identity") -> float:
        """mIoU of the pixels so far, predicted classes matched by ``matching``."""
        return miou(self.matrix, matching)


def squared_error_sum(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: sum of (pred - target)^2 over valid pixels and their count -> ((B,), (B,))."""
    diff2 = (pred.float() - target.float()) ** 2 * valid
    return diff2.flatten(1).sum(dim=1), valid.flatten(1).float().sum(dim=1)


class DepthAccumulator:
    """RMSE = sqrt(mean (d_pred - d_true)^2) over valid pixels, per image and over all pixels."""

    def __init__(self) -> None:
        self.per_image: list[float] = []
        self.total_sq = 0.0
        self.total_n = 0.0

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> None:
        """Add a batch (B, H, W) of predicted and true depths (metres) and the valid-pixel mask."""
        sq, n = squared_error_sum(pred, target, valid)
        for s, c in zip(sq.tolist(), n.tolist(), strict=True):
            if c > 0:
                self.per_image.append((s / c) ** 0.5)
            self.total_sq += s
            self.total_n += c

    def rmse(self) -> float:
        """Mean over images of the per-image RMSE (the usual NYUv2 convention)."""
        if not self.per_image:
            return float("nan")
        return sum(self.per_image) / len(self.per_image)

    def rmse_pixels(self) -> float:
        """RMSE over all valid pixels of all images at once."""
        return (self.total_sq / self.total_n) ** 0.5 if self.total_n else float("nan")
