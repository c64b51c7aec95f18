"""The paper's pictures, as PNG files at any URI.

- correlation maps: one query patch's cosine similarity to every patch of a reference image,
  for two (or more) encoders side by side, on one colour scale shown by a colour bar;
- retrieved-label segmentations next to the ground truth;
- a pseudo in-context task from a label set: query, positive, and their pseudo-labels.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # object API: no global pyplot state, no display needed
from matplotlib.patches import Rectangle

from shared import storage
from shared.images import eval_geometry, load_image, to_tensor


def correlation_map(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """c_ij = cos(q, r_ij) for a query feature (D,) and reference features (h, w, D) -> (h, w)."""
    return F.normalize(reference.float(), dim=-1) @ F.normalize(query.float(), dim=0)


def palette(num_classes: int, ignore_index: int | None = 255, seed: int = 0) -> np.ndarray:
    """(256 or num_classes, 3) uint8 colours: class 0 dark grey, others random, ignore white."""
    rng = np.random.default_rng(seed)
    size = max(num_classes, 256)
    colours = rng.integers(40, 256, (size, 3), dtype=np.uint8)
    colours[0] = (40, 40, 40)
    if ignore_index is not None and ignore_index < size:
        colours[ignore_index] = (255, 255, 255)
    return colours


def colorize(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> RGB (H, W, 3) through a palette (values wrap around its length)."""
    return colours[np.asarray(labels).astype(np.int64) % len(colours)]


def save_figure(fig, uri: str, dpi: int = 100) -> None:
    """Render ``fig`` as PNG and write it atomically to ``uri``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    storage.write_bytes(uri, buffer.getvalue())


def _prepare(image: np.ndarray, size: int) -> torch.Tensor:
    # antialiased resizing overshoots [0, 1] slightly; imshow wants the valid range
    return eval_geometry(to_tensor(image), None, size)[0].clamp(0, 1)


CORRELATION_CMAP = "inferno"  # one colour map and one scale, -1..1, for every encoder's panel


def correlation_figure(query_image: np.ndarray, reference_image: np.ndarray,
                       patch: tuple[int, int], encoders: list[tuple[str, object]], size: int
                       ) -> tuple[Figure, list[np.ndarray]]:
    """Query image with the chosen patch (row, col) boxed, then one heat map per encoder on the
    reference image, all on the same colour scale, with a colour bar of the cosine similarity.
    Returns the figure and the correlation maps (h, w)."""
    q_img, r_img = _prepare(query_image, size), _prepare(reference_image, size)
    fig = Figure(figsize=(3.2 * (1 + len(encoders)) + 0.8, 3.4))
    axes = fig.subplots(1, 1 + len(encoders))
    axes[0].imshow(q_img.permute(1, 2, 0).numpy())
    maps, heat = [], None
    for ax, (label, backbone) in zip(axes[1:], encoders, strict=True):
        device = next(backbone.parameters()).device
        with torch.inference_mode():
            dense = backbone.dense_features(torch.stack([q_img, r_img]).to(device)).cpu()
        row, col = patch
        corr = correlation_map(dense[0, row, col], dense[1]).numpy()  # (h, w)
        maps.append(corr)
        ax.imshow(r_img.permute(1, 2, 0).numpy())
        heat = ax.imshow(corr, cmap=CORRELATION_CMAP, alpha=0.6, extent=(0, size, size, 0),
                         interpolation="bilinear", vmin=-1, vmax=1)
        ax.set_title(label)
    p = encoders[0][1].patch_size
    axes[0].add_patch(Rectangle((patch[1] * p, patch[0] * p), p, p, fill=False,
                                    edgecolor="red", linewidth=2))
    axes[0].set_title("query patch")
    for ax in axes:
        ax.axis("off")
    bar = fig.colorbar(heat, ax=list(axes[1:]), fraction=0.046, pad=0.02)
    bar.set_label("cosine similarity to the query patch")
    bar.solids.set_alpha(1)  # the scale at full strength, not faded like the overlay
    return fig, maps


def plot_correlation(query_image: np.ndarray, reference_image: np.ndarray,
                     patch: tuple[int, int], encoders: list[tuple[str, object]], size: int,
                     uri: str) -> list[np.ndarray]:
    """:func:`correlation_figure` written as PNG to ``uri``; returns the correlation maps."""
    fig, maps = correlation_figure(query_image, reference_image, patch, encoders, size)
    save_figure(fig, uri)
    return maps


def plot_segmentations(images: list[np.ndarray], predictions: list[np.ndarray],
                       ground_truths: list[np.ndarray], num_classes: int, uri: str,
                       ignore_index: int = 255) -> None:
    """One row per image: the image, the retrieved-label segmentation, the ground truth."""
    colours = palette(num_classes, ignore_index)
    fig = Figure(figsize=(9, 3 * len(images)))
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (img, pred, gt) in enumerate(zip(images, predictions, ground_truths, strict=True)):
        for ax, picture, title in zip(axes[row], (img, colorize(pred, colours),
                                                  colorize(gt, colours)),
                                      ("image", "retrieved labels", "ground truth"),
                                      strict=True):
            ax.imshow(picture)
            ax.set_title(title)
            ax.axis("off")
    save_figure(fig, uri)


def plot_pseudo_task(labelset, query_id: str, uri: str, positive_id: str | None = None) -> str:
    """Query and positive images of a label set's pair, with their pseudo-label maps.

    ``labelset`` is a shared.labelset.LabelSet. Returns the positive's id.
    """
    pairs = labelset.pairs().to_pylist()
    if positive_id is None:
        match = [p for p in pairs if p["query_id"] == query_id]
        if not match:
            raise ValueError(f"label set {labelset.uri} has no pair with query {query_id!r}")
        positive_id = match[0]["positive_id"]
    uris = dict(zip(labelset.images().column("image_id").to_pylist(),
                    labelset.images().column("uri").to_pylist(), strict=True))
    colours = palette(labelset.num_classes, None)
    fig = Figure(figsize=(7, 7))
    axes = fig.subplots(2, 2)
    for col, (image_id, role) in enumerate(((query_id, "query"), (positive_id, "positive"))):
        axes[0, col].imshow(load_image(uris[image_id]))
        axes[0, col].set_title(f"{role}: {image_id}")
        axes[1, col].imshow(colorize(labelset.label_map(image_id), colours))
        axes[1, col].set_title(f"{role} pseudo-labels")
    for ax in axes.flat:
        ax.axis("off")
    save_figure(fig, uri)
    return positive_id
