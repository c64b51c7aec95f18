"""Procedural scenes with exact ground-truth segmentation, for tests and small benchmarks.

Each object class has its own shape AND its own texture (disc + stripes, square + checkerboard,
triangle + dots, ring + noise, bar + waves); colours are drawn at random per instance, so colour
alone says nothing about the class. Backgrounds (gradients, radial gradients, low-frequency
clouds, grain) are all class 0. Objects overlap (later ones occlude earlier ones) and may leave
the frame. Everything is vectorised numpy and deterministic given the seed.
"""

from __future__ import annotations

import numpy as np

from shared.images import encode_jpeg, encode_png
from shared.seeds import derive_seed

CLASS_NAMES = [
    "background",
    "striped_disc",
    "checkered_square",
    "dotted_triangle",
    "noisy_ring",
    "wavy_bar",
]
IGNORE_INDEX = 255
BACKGROUND_KINDS = ("gradient", "radial", "clouds", "grain")

SQUARE_HALF_SIDE = 0.8  # half side of a square, in units of the object radius
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------
# Pure shape and texture functions on object-local coordinates (u, v), in pixels


def shape_mask(cls: int, u: np.ndarray, v: np.ndarray, radius: float, param: float) -> np.ndarray:
    """Inside-test of the class's shape centred at the origin; ``param`` is the ring's inner
    radius fraction or the bar's aspect ratio (ignored by the other shapes)."""
    name = CLASS_NAMES[cls]
    if name == "striped_disc":
        return u * u + v * v <= radius * radius
    if name == "checkered_square":
        return np.maximum(np.abs(u), np.abs(v)) <= SQUARE_HALF_SIDE * radius
    if name == "dotted_triangle":
        # equilateral, circumradius r: three half-planes at distance r/2 (the apothem)
        angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        inside = np.ones(u.shape, dtype=bool)
        for angle in angles:
            inside &= u * np.cos(angle) + v * np.sin(angle) <= radius / 2
        return inside
    if name == "noisy_ring":
        dist2 = u * u + v * v
        return (dist2 <= radius * radius) & (dist2 >= (param * radius) ** 2)
    if name == "wavy_bar":
        return (u / radius) ** 2 + (v / (param * radius)) ** 2 <= 1.0
    raise ValueError(f"class {cls} ({name}) has no shape")


def stripes(u: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Hard two-tone stripes across u: 1 on the first half of each period."""
    return (np.mod(u / period + phase, 1.0) < 0.5).astype(np.float32)


def checkerboard(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Checkerboard with square cells of side ``period``: (floor(u/p) + floor(v/p)) mod 2."""
    return np.mod(np.floor(u / period) + np.floor(v / period), 2).astype(np.float32)


def dots(u: np.ndarray, v: np.ndarray, period: float, radius_frac: float = 0.3) -> np.ndarray:
    """Round dots of radius ``radius_frac * period`` on a square lattice of step ``period``."""
    du = np.mod(u, period) - period / 2
    dv = np.mod(v, period) - period / 2
    return (du * du + dv * dv <= (radius_frac * period) ** 2).astype(np.float32)


def waves(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Smooth wavy lines: 1/2 + 1/2 sin(2 pi (u + 0.3 p sin(pi v / p)) / p)."""
    bent = u + 0.3 * period * np.sin(np.pi * v / period)
    return (0.5 + 0.5 * np.sin(2 * np.pi * bent / period)).astype(np.float32)


def value_noise(rng: np.random.Generator, height: int, width: int, cell: float,
                channels: int = 1) -> np.ndarray:
    """Smooth random field in [0, 1]: uniform values on a lattice of step ``cell`` pixels,
    smoothstep-interpolated. Returns (height, width, channels) float32."""
    grid_h = int(np.ceil(height / cell)) + 1
    grid_w = int(np.ceil(width / cell)) + 1
    grid = rng.random((grid_h, grid_w, channels), dtype=np.float32)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / cell
    xs = (np.arange(width, dtype=np.float32) + 0.5) / cell
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    fy, fx = ys - y0, xs - x0
    fy = (fy * fy * (3 - 2 * fy))[:, None, None]  # smoothstep, (h, 1, 1)
    fx = (fx * fx * (3 - 2 * fx))[None, :, None]  # (1, w, 1)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx  # (h, w, C)
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def add_ignore_border(mask: np.ndarray, width: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Set to ``ignore_index`` every pixel with a differently labelled pixel within ``width``
    (Chebyshev distance); both sides of each boundary are marked."""
    if width <= 0:
        return mask.copy()
    height, wide = mask.shape
    padded = np.pad(mask, width, mode="edge")
    boundary = np.zeros(mask.shape, dtype=bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            shifted = padded[width + dy : width + dy + height, width + dx : width + dx + wide]
            boundary |= shifted != mask
    out = mask.copy()
    out[boundary] = ignore_index
    return out


# ---------------------------------------------------------------------------------------------
# Scene composition


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3).astype(np.float32)


def _colour_pair(rng: np.random.Generator, min_distance: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours at least ``min_distance`` apart, so a texture stays visible."""
    first = _colour(rng)
    for _ in range(32):
        second = _colour(rng)
        if np.linalg.norm(second - first) >= min_distance:
            return first, second
    return first, (255.0 - first).astype(np.float32)


def _mix(t: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per-pixel blend first + t (second - first); t (h, w) -> (h, w, 3)."""
    return first + t[..., None] * (second - first)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random class-0 background, (height, width, 3) float32 in [0, 255]."""
    kind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
    first, second = _colour_pair(rng, min_distance=40.0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = xs * np.cos(angle) + ys * np.sin(angle)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        image = _mix(t, first, second)
    elif kind == "radial":
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        dist = np.hypot(ys - cy, xs - cx)
        image = _mix(dist / max(float(dist.max()), 1e-6), first, second)
    elif kind == "clouds":
        cell = min(height, width) / rng.uniform(2.0, 5.0)
        image = _mix(value_noise(rng, height, width, cell)[..., 0], first, second)
    else:  # grain: flat colour with fine noise
        image = np.broadcast_to(first, (height, width, 3)).copy()
        image += rng.normal(0.0, rng.uniform(6.0, 14.0), size=image.shape).astype(np.float32)
    if kind != "grain" and rng.random() < 0.3:
        image += rng.normal(0.0, 5.0, size=image.shape).astype(np.float32)
    return image.astype(np.float32)


def _texture(rng: np.random.Generator, cls: int, u: np.ndarray, v: np.ndarray,
             period: float) -> np.ndarray:
    """The class's texture on local coordinates, values in [0, 1]."""
    name = CLASS_NAMES[cls]
    if name == "striped_disc":
        return stripes(u, period, rng.random())
    if name == "checkered_square":
        return checkerboard(u + rng.random() * period, v, period)
    if name == "dotted_triangle":
        return dots(u + rng.random() * period, v + rng.random() * period, period)
    if name == "noisy_ring":
        return value_noise(rng, u.shape[0], u.shape[1], cell=rng.uniform(1.5, 3.0))[..., 0]
    return waves(u + rng.random() * period, v, period)


def _paint_object(rng: np.random.Generator, cls: int, image: np.ndarray, mask: np.ndarray) -> None:
    """Draw one random instance of ``cls`` over ``image`` and ``mask`` in place."""
    height, width = mask.shape
    radius = rng.uniform(0.12, 0.32) * min(height, width)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    angle = rng.uniform(0, 2 * np.pi)
    param = rng.uniform(0.45, 0.65) if CLASS_NAMES[cls] == "noisy_ring" else rng.uniform(0.3, 0.45)
    period = max(4.0, radius * rng.uniform(0.22, 0.4))
    first, second = _colour_pair(rng)
    # every shape fits in the box of half side 1.2 r around its centre
    reach = 1.2 * radius
    y0, y1 = max(0, int(cy - reach)), min(height, int(np.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(cx - reach)), min(width, int(np.ceil(cx + reach)) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres, (h, w)
    dx, dy = xs - cx, ys - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)  # rotate into the object's frame
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    inside = shape_mask(cls, u, v, radius, param)
    colour = _mix(_texture(rng, cls, u, v, period), first, second)  # (h, w, 3)
    image[y0:y1, x0:x1][inside] = colour[inside]
    mask[y0:y1, x0:x1][inside] = cls


def make_scene(seed: int, size: tuple[int, int] = (128, 128), max_objects: int = 4,
               ignore_border: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random scene: (image uint8 (H, W, 3), mask uint8 (H, W) of class ids).

    1..max_objects objects of random classes are painted in order over a random background.
    ``ignore_border > 0`` marks pixels near a label boundary as ``IGNORE_INDEX``.
    """
    height, width = (int(s) for s in size)
    if height < 8 or width < 8:
        raise ValueError(f"scene size must be at least 8x8, got {size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    rng = np.random.default_rng(seed)
    image = _background(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        _paint_object(rng, int(rng.integers(1, len(CLASS_NAMES))), image, mask)
    image += rng.normal(0.0, 2.0, size=image.shape).astype(np.float32)  # sensor noise
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if ignore_border > 0:
        mask = add_ignore_border(mask, ignore_border)
    return image, mask


def scene_seed(seed: int, split: str, index: int) -> int:
    """Independent per-image seed derived from (dataset seed, split, index)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return derive_seed(seed, SPLITS.index(split), index)


def image_id(index: int) -> str:
    """Zero-padded image id, e.g. ``000042``."""
    return f"{index:06d}"


def write_synthetic_dataset(root_uri: str, num_train: int = 64, num_val: int = 16,
                            size: tuple[int, int] = (128, 128), seed: int = 0,
                            ignore_border: int = 0, quality: int = 95) -> str:
    """Write a synthetic segmentation dataset; returns ``root_uri``.

    Layout: ``<root>/images/{train,val}/<id>.jpg`` (JPEG ``quality``, 4:4:4 chroma),
    ``<root>/masks/{train,val}/<id>.png``
    (uint8 class ids, 255 = ignore) and ``<root>/classes.json``, written last. Ids are unique
    across splits (val continues after train). The same arguments give byte-identical files.
    """
    from shared import storage  # lazy: keeps this module importable on its own

    if num_train < 0 or num_val < 0:
        raise ValueError(f"counts must be non-negative, got {num_train}, {num_val}")
    next_id = 0
    for split, count in (("train", num_train), ("val", num_val)):
        for index in range(count):
            image, mask = make_scene(scene_seed(seed, split, index), size,
                                     ignore_border=ignore_border)
            name = image_id(next_id)
            next_id += 1
            storage.write_bytes(storage.join(root_uri, "images", split, f"{name}.jpg"),
                                encode_jpeg(image, quality))
            storage.write_bytes(storage.join(root_uri, "masks", split, f"{name}.png"),
                                encode_png(mask))
    storage.write_json(storage.join(root_uri, "classes.json"),
                       {"classes": list(CLASS_NAMES), "ignore_index": IGNORE_INDEX})
    return root_uri
