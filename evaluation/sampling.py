"""Which patches of an augmented memory image enter the bank, and with which values.

Rare-class-favouring sampling: with n_c the number of patches of the image in which class c
appears, patch j scores s_j = (sum_{c in classes(j)} n_c) * u_j, u_j ~ U(0, 1), and the m
lowest-scoring patches are kept. A patch holding only a rare class has a small sum and is
almost always kept; background patches of a large region compete among themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transfer import patch_histograms, patch_mean_depth


def rare_class_scores(hist: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """s_j = (sum_{c: h_jc > 0} n_c) u_j with n_c = #{patches j': h_j'c > 0}; hist (N, C) -> (N,)."""
    present = (hist > 0).float()  # (N, C)
    counts = present.sum(dim=0)  # (C,) patches in which each class appears
    return (present @ counts) * uniform  # (N, C) x (C,) -> (N,)


def sample_patches(
    hist: torch.Tensor, num: int, generator: torch.Generator, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (sorted) of the ``num`` lowest-scoring eligible patches; fewer if fewer are eligible."""
    uniform = torch.rand(hist.shape[0], generator=generator)
    scores = rare_class_scores(hist, uniform)
    if eligible is not None:
        scores = torch.where(eligible, scores, torch.full_like(scores, float("inf")))
        num = min(num, int(eligible.sum()))
    num = min(num, hist.shape[0])
    if num <= 0:
        return torch.zeros(0, dtype=torch.long)
    keep = torch.topk(scores, num, largest=False).indices
    return torch.sort(keep).values


def memory_patches(
    features: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    num: int,
    generator: torch.Generator,
    task: str = "segmentation",
    num_classes: int = 1,
    ignore_index: int = 255,
    min_valid: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank entries of one augmented image: (m, D) L2-normalised features, (m, C) values.

    features (h, w, D) for an (S, S) image; target (S, S) labels or depth in metres; valid (S, S)
    marks pixels inside the original image. Values: class histograms (ignore counted as class 0)
    or the patch-mean depth (C = 1). Patches less than ``min_valid`` inside the image, and depth
    patches without any measured pixel, are never chosen.
    """
    h, w, d = features.shape
    patch = target.shape[0] // h
    if target.shape != (h * patch, w * patch):
        raise ValueError(f"target {tuple(target.shape)} does not match a {h}x{w} feature grid")
    inside = valid.float().view(h, patch, w, patch).mean(dim=(1, 3)) >= min_valid  # (h, w)
    if task == "segmentation":
        values = patch_histograms(target[None], num_classes, patch, ignore_index)[0]  # (h, w, C)
        sample_hist = values
        eligible = inside
    elif task == "depth":
        depth_ok = valid & (target > 0)
        mean, has = patch_mean_depth(target[None].float(), depth_ok[None], patch)
        values = mean[0, ..., None]  # (h, w, 1)
        sample_hist = torch.ones_like(values)  # no classes: plain uniform sampling
        eligible = inside & has[0]
    else:
        raise ValueError(f"unknown task {task!r}; expected 'segmentation' or 'depth'")
    keep = sample_patches(sample_hist.reshape(h * w, -1), num, generator, eligible.reshape(-1))
    feats = F.normalize(features.reshape(h * w, d).float(), dim=-1)[keep]  # (m, D)
    return feats, values.reshape(h * w, -1)[keep]
