"""Pictures of pseudo-labels, pure NumPy: class colours, overlays, segment outlines, crops, mosaics.

Arrays in, arrays out: images are (H, W, 3) uint8 RGB, maps are (H, W) integer ids. Nothing here
reads or writes files (labeling/show.py does). A class keeps its colour everywhere: the colour of
id c depends on c alone, not on the image, the label set or how many classes it has.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import hsv_to_rgb

# The first 20 ids take matplotlib's "tab20" categorical colours, its ten strong tones first and
# then their ten light tones, so that neighbouring ids differ in hue; later ids step the hue by
# the golden ratio, which keeps any run of consecutive ids well apart, and vary value and
# saturation.
_TAB20 = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)
GOLDEN = 0.618033988749895
OUTLINE = np.array([255, 255, 255], np.uint8)  # segment boundaries
DIM = 0.3  # brightness of the pixels around a cropped region


def class_colours(ids: np.ndarray) -> np.ndarray:
    """Colours (..., 3) uint8 of class (or segment) ids (...): fixed per id, categorical."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((*ids.shape, 3), np.uint8)
    base = ids < len(_TAB20)
    out[base] = _TAB20[ids[base]]
    rest = ids[~base]
    if rest.size:
        hue = (rest * GOLDEN) % 1.0
        sat = 0.55 + 0.35 * ((rest * 7) % 3) / 2  # 0.55, 0.725, 0.9
        val = 0.95 - 0.25 * ((rest * 5) % 4) / 3  # 0.95 ... 0.70
        rgb = hsv_to_rgb(np.stack([hue, sat, val], axis=-1))  # (n, 3) in [0, 1]
        out[~base] = np.round(rgb * 255).astype(np.uint8)
    return out


def colorize(ids: np.ndarray) -> np.ndarray:
    """An id map (H, W) as its class colours (H, W, 3) uint8."""
    ids = np.asarray(ids)
    unique, inverse = np.unique(ids, return_inverse=True)  # colour each id once, not per pixel
    return class_colours(unique)[inverse.reshape(ids.shape)]


def blend(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * image + alpha * colours, rounded to uint8 (both (H, W, 3))."""
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def check_same_size(image: np.ndarray, ids: np.ndarray, what: str) -> None:
    """ValueError unless the map covers the image pixel for pixel."""
    if ids.shape != image.shape[:2]:
        raise ValueError(f"{what} is {ids.shape[1]}x{ids.shape[0]} but its image is "
                         f"{image.shape[1]}x{image.shape[0]} (width x height)")


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image tinted by the class colour of each pixel's pseudo-label."""
    check_same_size(image, labels, "the label map")
    return blend(image, colorize(labels), alpha)


def boundaries(ids: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another id (a 1-pixel outline)."""
    ids = np.asarray(ids)
    edge = np.zeros(ids.shape, bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def segment_overlay(image: np.ndarray, segments: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image tinted by a colour per segment id, with the segment outlines in white."""
    check_same_size(image, segments, "the segment map")
    out = blend(image, colorize(segments), alpha)
    out[boundaries(segments)] = OUTLINE
    return out


def downscale(array: np.ndarray, max_side: int) -> np.ndarray:
    """Nearest-neighbour subsampling so that the longer side is at most ``max_side``.

    Images and their maps go through the same index grid, so they stay pixel-aligned.
    """
    h, w = array.shape[:2]
    scale = max(h, w) / max_side
    if scale <= 1:
        return array
    rows = (np.arange(max(1, round(h / scale))) * scale).astype(np.int64).clip(0, h - 1)
    cols = (np.arange(max(1, round(w / scale))) * scale).astype(np.int64).clip(0, w - 1)
    return array[rows][:, cols]


def largest_region(labels: np.ndarray, class_id: int,
                   segments: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool mask of the largest segment of ``class_id`` in an image.

    A segment's pixels are those of one segment id that carry the class; without a segment map
    the class's whole mask is the region. Empty when the class is absent.
    """
    mask = np.asarray(labels) == class_id
    if segments is None or not mask.any():
        return mask
    ids, counts = np.unique(np.asarray(segments)[mask], return_counts=True)
    return mask & (segments == ids[np.argmax(counts)])


def region_tile(image: np.ndarray, mask: np.ndarray, tile: int, colour: np.ndarray,
                margin: float = 0.15, border: int = 2) -> np.ndarray:
    """A (tile, tile, 3) picture of a region: its bounding box (plus ``margin`` of its size on
    each side), the pixels outside the region dimmed, scaled to fit (nearest), centred on grey,
    framed in ``colour`` (the class colour)."""
    rows, cols = np.nonzero(mask)
    out = np.full((tile, tile, 3), 64, np.uint8)
    if rows.size:
        h, w = mask.shape
        pad_r = int(margin * (rows.max() - rows.min() + 1))
        pad_c = int(margin * (cols.max() - cols.min() + 1))
        r0, r1 = max(0, rows.min() - pad_r), min(h, rows.max() + 1 + pad_r)
        c0, c1 = max(0, cols.min() - pad_c), min(w, cols.max() + 1 + pad_c)
        crop = image[r0:r1, c0:c1].astype(np.float32)
        inside = mask[r0:r1, c0:c1, None]
        crop = np.where(inside, crop, crop * DIM).astype(np.uint8)
        inner = tile - 2 * border
        scale = inner / max(crop.shape[:2])
        out_h = max(1, round(crop.shape[0] * scale))
        out_w = max(1, round(crop.shape[1] * scale))
        ri = np.minimum((np.arange(out_h) / scale).astype(np.int64), crop.shape[0] - 1)
        ci = np.minimum((np.arange(out_w) / scale).astype(np.int64), crop.shape[1] - 1)
        top, left = (tile - out_h) // 2, (tile - out_w) // 2
        out[top:top + out_h, left:left + out_w] = crop[ri][:, ci]
    out[:border], out[-border:], out[:, :border], out[:, -border:] = colour, colour, colour, colour
    return out


def mosaic_row(tiles: list[np.ndarray], gap: int = 4, background: int = 255) -> np.ndarray:
    """Tiles of equal size side by side, ``gap`` pixels apart: (tile, n * tile + gaps, 3)."""
    if not tiles:
        raise ValueError("a mosaic row needs at least one tile")
    t = tiles[0].shape[0]
    row = np.full((t, len(tiles) * (t + gap) - gap, 3), background, np.uint8)
    for i, tile in enumerate(tiles):
        row[:, i * (t + gap):i * (t + gap) + t] = tile
    return row
