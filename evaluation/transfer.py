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

MATCHINGS = ("identity", "hungarian")


def _check_k(k: int, bank_size: int) -> int:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if bank_size <= 0:
        raise ValueError("the memory bank is empty")
    return min(k, bank_size)


def exact_topk(
    query: torch.Tensor, bank: torch.Tensor, k: int, query_chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k: s_ij = <q_i/|q_i|, b_j/|b_j|>, the k largest per query (descending).

    query (Nq, D), bank (Nb, D) -> similarities (Nq, k) float32, indices (Nq, k) int64.
    Computed in float32 whatever the input dtype, ``query_chunk`` queries at a time.
    """
    if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and bank {tuple(bank.shape)} must be (N, D)")
    k = _check_k(k, bank.shape[0])
    b = F.normalize(bank.float(), dim=-1)  # (Nb, D)
    sims, idx = [], []
    for start in range(0, query.shape[0], query_chunk):
        q = F.normalize(query[start : start + query_chunk].float(), dim=-1)  # (c, D)
        s, i = torch.topk(q @ b.T, k, dim=1)  # (c, D) x (D, Nb) -> (c, Nb) -> (c, k)
        sims.append(s)
        idx.append(i)
    if not sims:
        return query.new_zeros(0, k, dtype=torch.float32), query.new_zeros(0, k, dtype=torch.long)
    return torch.cat(sims), torch.cat(idx)


def weighted_values(sims: torch.Tensor, values: torch.Tensor, temperature: float) -> torch.Tensor:
    """y_i = sum_k softmax_k(s_ik / T) v_ik for sims (Nq, k) and neighbour values (Nq, k, C)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    weights = torch.softmax(sims.float() / temperature, dim=1)  # (Nq, k)
    return torch.einsum("qk,qkc->qc", weights, values.float())  # (Nq, C)


def label_transfer(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_values: torch.Tensor,
    k: int = 30,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Soft top-k transfer: y_i = sum_{j in topk_i} softmax_j(cos(q_i, b_j) / T) v_j -> (Nq, C)."""
    if bank_values.shape[0] != bank.shape[0]:
        raise ValueError(
            f"bank has {bank.shape[0]} patches but bank_values has {bank_values.shape[0]} rows"
        )
    values = bank_values if bank_values.ndim == 2 else bank_values[:, None]
    sims, idx = exact_topk(query, bank, k)
    return weighted_values(sims, values[idx], temperature)  # values[idx]: (Nq, k, C)


def patch_histograms(
    labels: torch.Tensor, num_classes: int, patch_size: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Patch class histogram h_jc = (1/p^2) #{pixels of patch j with label c}; ignore counts as c=0.

    labels (B, H, W) -> (B, H/p, W/p, C); every histogram sums to 1.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}")
    b, height, width = labels.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"label map {height}x{width} is not a whole number of {patch_size}-patches")
    labels = labels.long()
    if ignore_index is not None:
        labels = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"label values must lie in [0, {num_classes}) or be {ignore_index}")
    h, w = height // patch_size, width // patch_size
    onehot = F.one_hot(labels, num_classes).float()  # (B, H, W, C)
    blocks = onehot.view(b, h, patch_size, w, patch_size, num_classes)
    return blocks.mean(dim=(2, 4))  # (B, h, w, C)


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


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """M[t, p] = #{pixels with true class t predicted as p}, ignored pixels skipped -> (C, C) int64."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"target class {int(target.max())} outside [0, {num_classes})")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted class outside [0, {num_classes})")
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _check_square(confusion: torch.Tensor) -> None:
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be square (C, C), got {tuple(confusion.shape)}")


def pair_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU(t, p) = M[t, p] / (#true t + #predicted p - M[t, p]) for every pair -> (C, C) float64."""
    conf = confusion.double()
    union = conf.sum(dim=1, keepdim=True) + conf.sum(dim=0, keepdim=True) - conf  # (C, 1) + (1, C)
    return torch.where(union > 0, conf / union.clamp(min=1), torch.zeros_like(conf))


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
    conf = match_classes(confusion, matching).double()
    tp = conf.diagonal()
    fp = conf.sum(dim=0) - tp  # predicted c, truly another class
    fn = conf.sum(dim=1) - tp  # truly c, predicted another class
    denom = tp + fp + fn
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))


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
