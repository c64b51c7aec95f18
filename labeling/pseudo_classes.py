"""Pseudo-classes: segment pooling, K-means centroids, patch assignment, per-segment majority vote.

Pure tensor functions; the Ray pipeline and the label-set writer call them per image or batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shared.images import resize_labels


def segment_coverage(segments: torch.Tensor, num_segments: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch of a ``grid`` covered by each segment: (S, gh, gw), sums to 1 per patch.

    ``segments`` is an (H, W) integer map at the image's own size; the image is resized (not
    cropped) to the patch grid, so each patch covers an (H/gh, W/gw) area of the map.
    """
    gh, gw = grid
    onehot = F.one_hot(segments.long(), num_segments).permute(2, 0, 1).float()  # (S, H, W)
    # adaptive average pooling = exact area fractions when H, W are multiples of the grid, and
    # the standard overlapping-bin approximation otherwise
    return F.adaptive_avg_pool2d(onehot[None], (gh, gw))[0]  # (S, gh, gw)


def pool_segment_features(
    patch_features: torch.Tensor, segments: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean patch feature per segment, each patch weighted by the fraction the segment covers.

    patch_features: (gh, gw, D); segments: (H, W) ids in [0, S). Returns (pooled (S, D), area (S,))
    where area is the segment's fraction of the image.
    """
    gh, gw, dim = patch_features.shape
    cover = segment_coverage(segments, num_segments, (gh, gw)).flatten(1)  # (S, gh*gw)
    weight = cover.sum(1, keepdim=True)  # (S, 1)
    pooled = cover @ patch_features.reshape(-1, dim).float() / weight.clamp_min(1e-12)  # (S, D)
    counts = torch.bincount(segments.reshape(-1).long(), minlength=num_segments).float()
    return pooled, counts / segments.numel()


def kmeans(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    niter: int = 25,
    nredo: int = 1,
    use_gpu: bool | None = None,
) -> np.ndarray:
    """K-means centroids (K, D) of ``features`` (N, D) with faiss; deterministic for a seed.

    ``nredo`` restarts from different random initialisations and keeps the lowest objective.
    """
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans needs a non-empty (N, D) array, got shape {x.shape}")
    if k > len(x):
        raise ValueError(f"kmeans: K={k} centroids requested from only {len(x)} segment features")
    if use_gpu is None:
        use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, gpu=bool(use_gpu),
                      max_points_per_centroid=max(256, -(-len(x) // k)), verbose=False)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32)


def kmeans_subset(num_images: int, max_images: int, seed: int) -> np.ndarray:
    """Sorted indices (M,) int64 of the images whose segments feed K-means.

    All images when ``num_images <= max_images``; otherwise a seeded random choice of
    ``max_images`` without replacement (the paper clusters a random subset of large sets), so the
    caller reads only those images' segment rows.
    """
    if num_images < 0 or max_images < 1:
        raise ValueError(f"kmeans_subset: need num_images >= 0 and max_images >= 1, got "
                         f"{num_images} and {max_images}")
    if num_images <= max_images:
        return np.arange(num_images, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_images, max_images, replace=False)).astype(np.int64)


def assign_nearest(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) for each row of ``features`` (N, D) -> (N,)."""
    f = features.float()
    c = centroids.to(f.device, torch.float32)
    # ||f - c||^2 = ||f||^2 - 2 f.c + ||c||^2; ||f||^2 is constant per row
    dist = c.pow(2).sum(1)[None, :] - 2.0 * f @ c.T  # (N, K)
    return dist.argmin(1)


def majority_vote(segments: torch.Tensor, pixel_classes: torch.Tensor, num_segments: int,
                  num_classes: int) -> torch.Tensor:
    """Class of each segment = the most frequent class of its pixels (ties -> smallest id). (S,)"""
    idx = segments.reshape(-1).long() * num_classes + pixel_classes.reshape(-1).long()
    hist = torch.bincount(idx, minlength=num_segments * num_classes)
    return hist.view(num_segments, num_classes).argmax(1)  # argmax returns the first maximum


def pseudo_label_map(
    patch_features: torch.Tensor, segments: torch.Tensor, centroids: torch.Tensor
) -> torch.Tensor:
    """Per-pixel pseudo-class map (H, W): nearest centroid per patch, majority vote per segment.

    patch_features: (gh, gw, D) on the whole resized image; segments: (H, W) ids 0..S-1.
    A pixel carries the class of the patch its centre falls in (nearest-neighbour upsampling;
    a class is never blended with its neighbours).
    """
    gh, gw, dim = patch_features.shape
    num_segments = int(segments.max()) + 1
    patch_cls = assign_nearest(patch_features.reshape(-1, dim), centroids).view(gh, gw)
    # the patch each pixel's centre falls in, in exact integer arithmetic (the image was resized
    # to the grid with half-pixel centres); F.interpolate's "nearest" would shift it half a pixel
    pixel_cls = resize_labels(patch_cls, tuple(segments.shape))  # (H, W)
    seg_cls = majority_vote(segments, pixel_cls, num_segments, centroids.shape[0])  # (S,)
    return seg_cls[segments.long()]


def class_areas(label_map: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Classes present in a pseudo-label map and their area fractions, sorted by class id."""
    ids, counts = torch.unique(label_map.reshape(-1), return_counts=True)
    return ids.cpu().numpy().astype(np.int32), (counts.float() / label_map.numel()).cpu().numpy()
