"""What ``labeling.import`` reads: per-image label maps named like the images, and pairs files.

Three sources, each giving one map per image of an image folder:

- class maps (``maps``): ``<maps>/<image id>.pt`` (a 2-D integer tensor of class ids, loaded with
  ``torch.load(..., weights_only=True)``, as the DIP authors' released COCO pseudo-labels are)
  or ``<maps>/<image id>.png`` (8- or 16-bit greyscale / palette PNG of class ids);
- ground-truth masks (``masks``): ``<masks>/<image id>.png``, 255 = ignore by default;
- a dataset layout (``dataset``): a reader of ``evaluation/datasets`` (e.g. ``synthetic``:
  ``images/<split>/*.jpg``, ``masks/<split>/*.png``, ``classes.json``), its classes and its
  ignore index, its stored values converted as its evaluation does.

An image id is the image's path below the image root without its extension (labeling/listing.py);
a map matches the image of the same id. Per-image problems (no map, two maps, undecodable map,
wrong dtype, rank or size, a class id out of range) are :class:`MapError`: the import records them
against the image and goes on. Problems of the input as a whole (a malformed pairs file, a pairs
line naming an unknown image, a missing folder) are :class:`LabelImportError`, a user error.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from labeling.listing import is_image, list_images
from shared import storage
from shared.images import decode_png, nearest_indices, shorter_side_size

TENSOR_EXTENSION = ".pt"
PNG_EXTENSION = ".png"
DEFAULT_MASK_IGNORE = 255  # the ignore value of every ground-truth layout in evaluation/datasets


class LabelImportError(ValueError):
    """The import's input as a whole is unusable; the message names the file (and line)."""


class MapError(ValueError):
    """One image's map is missing or unusable; recorded against that image by name."""


@dataclass
class Source:
    """The images of an import and, per image, where its map is (or why it has none)."""

    kind: str  # "class_maps" | "ground_truth"
    images_root: str
    maps_root: str
    image_ids: list[str]
    image_uris: list[str]
    map_uris: list[str | None]  # None: the image has no usable map, see problems
    problems: dict[int, str]  # image index -> why it has no map
    decode: Callable[[bytes, str], np.ndarray]  # map bytes, map URI -> (h, w) integer array
    ignore_index: int | None
    num_classes: int | None  # K fixed by the source (a dataset's classes), else None
    same_size: bool  # ground truth: a map must be exactly at its image's size
    unmatched: list[str] = field(default_factory=list)  # map URIs without an image

    def __len__(self) -> int:
        return len(self.image_ids)


# --------------------------------------------------------------------------- decoding


def decode_tensor_map(data: bytes, uri: str) -> np.ndarray:
    """A ``.pt`` file holding one 2-D integer tensor -> int64 (H, W); MapError otherwise.

    Loaded with ``weights_only=True``: a pickle of anything but tensors and plain containers is
    refused, never executed."""
    import torch

    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MapError(f"{uri}: not a tensor file that torch.load(weights_only=True) accepts "
                       f"({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(value, torch.Tensor):
        raise MapError(f"{uri}: holds a {type(value).__name__}; expected one 2-D integer tensor "
                       "of class ids")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise MapError(f"{uri}: class map has dtype {value.dtype}; expected an integer tensor "
                       "of class ids")
    if value.ndim != 2:
        raise MapError(f"{uri}: class map has shape {tuple(value.shape)}; expected (H, W)")
    return value.to(torch.int64).numpy()


def decode_png_map(data: bytes, uri: str) -> np.ndarray:
    """An 8/16-bit greyscale or palette PNG of class ids -> uint8/uint16 (H, W); MapError."""
    try:
        return decode_png(data, name=uri)
    except ValueError as exc:  # ImageDecodeError: corrupt, not a PNG, a colour PNG
        raise MapError(str(exc)) from None


def decode_class_map(data: bytes, uri: str) -> np.ndarray:
    """Decode a class map by its extension (``.pt`` or ``.png``)."""
    if uri.lower().endswith(TENSOR_EXTENSION):
        return decode_tensor_map(data, uri)
    return decode_png_map(data, uri)


def check_values(labels: np.ndarray, uri: str, ignore_index: int | None,
                 num_classes: int | None) -> None:
    """MapError unless every value is a class id in [0, K) (or < 65536 with K open) or ignore."""
    values = labels if ignore_index is None else labels[labels != ignore_index]
    if not values.size:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise MapError(f"{uri}: class map holds the negative value {low}")
    if num_classes is not None and high >= num_classes:
        raise MapError(f"{uri}: class map holds class id {high}, but K = {num_classes} classes "
                       "(ids 0..K-1)")
    if high > 65535:
        raise MapError(f"{uri}: class map holds class id {high}; label maps hold ids up to 65535")


# --------------------------------------------------------------------------- geometry


def to_image_frame(labels: np.ndarray, height: int, width: int, view: str,
                   resize: int = 256, crop: int = 224) -> np.ndarray:
    """A map in the frame of its (height, width) image, by nearest-neighbour indexing.

    ``view="image"``: the map covers the whole image (any size); it is resized to the image.
    ``view="train_crop"``: the map (crop x crop) is the training view of the image,
    Resize(shorter side = resize) + CenterCrop(crop) (what the authors' released training pairs
    its 224 x 224 labels with). Each image pixel takes the crop pixel its own pixel lands on in
    the resized frame, clamped to the crop's border outside it, so ``train_geometry`` of the
    result gives back the map exactly whenever the image is at least the resized size.
    """
    h, w = labels.shape
    if view == "image":
        rows = nearest_indices(h, height).numpy()  # (height,) source row of each image row
        cols = nearest_indices(w, width).numpy()
    elif view == "train_crop":
        if (h, w) != (crop, crop):
            raise MapError(f"class map is {w}x{h}; map_view 'train_crop' expects {crop}x{crop}")
        rh, rw = shorter_side_size(height, width, resize)
        top, left = int(round((rh - crop) / 2.0)), int(round((rw - crop) / 2.0))
        # image pixel y lies in resized row floor((2y + 1) rh / 2H): nearest_indices(rh, H)
        rows = np.clip(nearest_indices(rh, height).numpy() - top, 0, crop - 1)
        cols = np.clip(nearest_indices(rw, width).numpy() - left, 0, crop - 1)
    else:
        raise ValueError(f"unknown map view {view!r}; expected 'image' or 'train_crop'")
    return labels[rows[:, None], cols[None, :]]  # (height, width)


# --------------------------------------------------------------------------- listings


def list_maps(root: str, extensions: tuple[str, ...]) -> dict[str, list[str]]:
    """Map URIs below folder ``root`` by id (path without extension), in path order."""
    if storage.kind(root) != "directory":
        raise FileNotFoundError(f"map folder not found: {root}")
    own = storage.resolve(root).rstrip("/") + "/"
    found: dict[str, list[str]] = {}
    for uri in storage.find(root):
        rel = uri[len(own):] if uri.startswith(own) else uri.rsplit("/", 1)[-1]
        ext = next((e for e in extensions if rel.lower().endswith(e)), None)
        if ext is not None:
            found.setdefault(rel[: -len(ext)], []).append(uri)
    return found


def match_maps(image_ids: list[str], maps: dict[str, list[str]], maps_root: str,
               extensions: tuple[str, ...]) -> tuple[list[str | None], dict[int, str], list[str]]:
    """(map URI per image or None, why not per image index, map URIs without an image)."""
    uris: list[str | None] = []
    problems: dict[int, str] = {}
    names = " or ".join(extensions)
    for i, image_id in enumerate(image_ids):
        candidates = maps.get(image_id, [])
        uris.append(candidates[0] if len(candidates) == 1 else None)
        if not candidates:
            problems[i] = f"no map {image_id}{names} under {maps_root}"
        elif len(candidates) > 1:
            problems[i] = f"two maps for one image: {' and '.join(candidates)}; keep one"
    known = set(image_ids)
    unmatched = [u for i, us in maps.items() if i not in known for u in us]
    return uris, problems, sorted(unmatched)


def folder_source(images: str, maps: str, ground_truth: bool,
                  ignore_index: int | None) -> Source:
    """Images under ``images`` with the class maps (or ground-truth masks) under ``maps``."""
    listing = list_images(images)
    if not listing.num_rows:
        raise FileNotFoundError(f"no images (jpg/png/webp/bmp/tif) found under {images}")
    ids = listing.column("image_id").to_pylist()
    extensions = (PNG_EXTENSION,) if ground_truth else (TENSOR_EXTENSION, PNG_EXTENSION)
    uris, problems, unmatched = match_maps(ids, list_maps(maps, extensions), maps, extensions)
    if ground_truth and ignore_index is None:
        ignore_index = DEFAULT_MASK_IGNORE
    return Source("ground_truth" if ground_truth else "class_maps", images, maps, ids,
                  listing.column("uri").to_pylist(), uris, problems,
                  decode_png_map if ground_truth else decode_class_map, ignore_index, None,
                  ground_truth, unmatched)


def dataset_source(name: str, root: str, split: str, ignore_index: int | None) -> Source:
    """The images and ground-truth masks of a registered evaluation dataset layout."""
    from evaluation.datasets import open_dataset

    reader = open_dataset(name, root, split)
    if reader.task != "segmentation":
        raise LabelImportError(f"dataset {name!r} is a {reader.task} dataset; an oracle label "
                               "set needs segmentation masks")

    def decode(data: bytes, uri: str) -> np.ndarray:
        return reader.convert_target(decode_png_map(data, uri))

    items = reader.items
    return Source("ground_truth", reader.root, reader.root, [it.image_id for it in items],
                  [it.image_uri for it in items], [it.target_uri for it in items], {}, decode,
                  reader.ignore_index if ignore_index is None else ignore_index,
                  reader.num_classes, True)


# --------------------------------------------------------------------------- pairs file


def pair_image_id(name: str) -> str | None:
    """The image id a pairs-file entry names (its path without the image extension), or None."""
    return name[: name.rindex(".")] if is_image(name) else None


@dataclass(frozen=True)
class PairsFile:
    """The pairs of a pairs file, in file order, and the sha256 of its text."""

    uri: str
    queries: list[str]
    positives: list[str]
    sha256: str


def read_pairs_file(uri: str, image_ids: list[str]) -> PairsFile:
    """The (query id, positive id) pairs of a pairs file in the authors' released format.

    One pair per line, ``query.jpg: positive.jpg``: two image file names relative to the image
    root, split at the one ``:`` (the released loader drops the one space after it; any
    surrounding whitespace is dropped here). Blank lines are skipped. A malformed line, or one
    naming an image that is not in the image folder, is a LabelImportError naming the file and
    the line."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise FileNotFoundError(f"pairs file not found: {uri}") from None
    except UnicodeDecodeError as exc:
        raise LabelImportError(f"pairs file {uri} is not UTF-8 text: {exc}") from None
    known = set(image_ids)
    queries, positives = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(":")]
        if len(parts) != 2 or not all(parts):
            raise LabelImportError(f"pairs file {uri} line {number}: expected "
                                   f"'query.jpg: positive.jpg', got {line.strip()[:120]!r}")
        ids = [pair_image_id(p) for p in parts]
        for name, image_id in zip(parts, ids, strict=True):
            if image_id is None or image_id not in known:
                why = ("is not an image file name" if image_id is None
                       else "is not an image of the image folder")
                raise LabelImportError(f"pairs file {uri} line {number}: {name!r} {why}")
        queries.append(ids[0])
        positives.append(ids[1])
    if not queries:
        raise LabelImportError(f"pairs file {uri} holds no pairs")
    return PairsFile(uri, queries, positives, hashlib.sha256(text.encode()).hexdigest())
