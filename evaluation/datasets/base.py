"""What every evaluation dataset offers: a list of (image, target) files at any fsspec URI.

A reader is built from a root URI and a split, checks the standard on-disk layout up front (a
wrong root is an error that names what was expected), and loads one sample at a time:

    image  (H, W, 3) uint8 RGB
    target (H, W) uint8 class ids with ``ignore_index`` for unlabelled pixels (segmentation), or
           (H, W) float32 depth in metres with 0 where there is no measurement (depth)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared import storage
from shared.images import decode_image, decode_png


class DatasetLayoutError(ValueError):
    """A data root does not hold the expected on-disk layout; the message says what was expected."""


@dataclass(frozen=True)
class Item:
    """One sample: its id and where its image and target live."""

    image_id: str
    image_uri: str
    target_uri: str


def require(root: str, dataset: str, expected: Sequence[str], layout: str) -> None:
    """Raise DatasetLayoutError unless every path in ``expected`` (relative to root) exists."""
    missing = [rel for rel in expected if not storage.exists(storage.join(root, rel))]
    if missing:
        raise DatasetLayoutError(
            f"{dataset}: data root {root} does not have the expected layout; missing "
            f"{', '.join(missing)}. Expected:\n{layout}"
        )


def read_id_list(root: str, rel: str, dataset: str, layout: str) -> list[str]:
    """Image ids listed one per line in ``root/rel`` (blank lines skipped)."""
    require(root, dataset, [rel], layout)
    ids = [line.split()[0] for line in storage.read_text(storage.join(root, rel)).splitlines()
           if line.strip()]
    if not ids:
        raise DatasetLayoutError(f"{dataset}: split list {storage.join(root, rel)} is empty")
    return ids


def descend(root: str, folder: str) -> str:
    """``root/folder`` when the dataset sits one level down (e.g. VOCdevkit/VOC2012), else root."""
    nested = storage.join(root, folder)
    return nested if storage.isdir(nested) else root


def paired_items(root: str, folder: str) -> list[Item]:
    """``<root>/images/<folder>/<id>.jpg`` with ``<root>/annotations/<folder>/<id>.png``."""
    items = []
    for uri in storage.glob(storage.join(root, "images", folder, "*.jpg")):
        image_id = uri.rsplit("/", 1)[-1][: -len(".jpg")]
        items.append(Item(image_id, uri, storage.join(root, "annotations", folder, f"{image_id}.png")))
    return items


def nonempty(items: list[Item], root: str, dataset: str, split: str, layout: str) -> list[Item]:
    """``items`` unless empty; an empty split is a layout error naming the root and split."""
    if not items:
        raise DatasetLayoutError(
            f"{dataset}: no {split} images found under {root}. Expected:\n{layout}"
        )
    return items


def missing_files(uris: Sequence[str]) -> list[str]:
    """Those of ``uris`` that do not exist, in order; one listing per distinct parent folder."""
    names: dict[str, set[str]] = {}
    for uri in uris:
        names.setdefault(uri.rsplit("/", 1)[0], set())
    for parent in names:
        names[parent] = {child.rsplit("/", 1)[-1] for child in storage.ls(parent)}
    return [u for u in uris if u.rsplit("/", 1)[-1] not in names[u.rsplit("/", 1)[0]]]


def _shown(uris: list[str], limit: int = 3) -> str:
    more = f" and {len(uris) - limit} more" if len(uris) > limit else ""
    return ", ".join(uris[:limit]) + more


def complete(items: list[Item], dataset: str, split: str, target: str = "mask",
             listed: bool = False) -> list[Item]:
    """``items`` when every target file exists (and, if ``listed``, every image file: the ids
    came from a split list, not a listing); else a one-line DatasetLayoutError that names the
    first missing files and counts them. Checked up front so no evaluation dies halfway."""
    if listed:
        images = missing_files([item.image_uri for item in items])
        if images:
            raise DatasetLayoutError(f"{dataset}: {len(images)} of {len(items)} {split} images "
                                     f"listed for the split are missing: {_shown(images)}")
    targets = missing_files([item.target_uri for item in items])
    if targets:
        raise DatasetLayoutError(f"{dataset}: {len(targets)} of {len(items)} {split} images "
                                 f"have no {target} file: {_shown(targets)}")
    return items


class EvalDataset:
    """Base reader. Subclasses set the class attributes and fill ``self.items`` in ``__init__``."""

    name: str = ""
    task: str = "segmentation"  # or "depth"
    classes: tuple[str, ...] = ()
    ignore_index: int = 255
    splits: dict[str, str] = {"train": "train", "val": "val"}  # generic -> dataset split name
    layout: str = ""

    def __init__(self, root: str, split: str):
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; choose one of "
                             f"{', '.join(self.splits)}")
        self.root = str(root).rstrip("/")
        self.split = split
        self.items: list[Item] = []

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.task == "segmentation" else 1

    def __len__(self) -> int:
        return len(self.items)

    @property
    def image_ids(self) -> list[str]:
        return [item.image_id for item in self.items]

    def subset(self, indices: Sequence[int]) -> EvalDataset:
        """A reader over the items at ``indices`` only (same classes, same root)."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.items = [self.items[int(i)] for i in indices]
        return out

    def convert_target(self, raw: np.ndarray) -> np.ndarray:
        """Stored label values -> class ids / ignore (identity unless a dataset remaps)."""
        return raw

    def load_image(self, index: int) -> np.ndarray:
        item = self.items[index]
        return decode_image(storage.read_bytes(item.image_uri), name=item.image_uri)

    def load_target(self, index: int) -> np.ndarray:
        item = self.items[index]
        raw = decode_png(storage.read_bytes(item.target_uri), name=item.target_uri)
        return self.convert_target(raw)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, target (H, W)) of sample ``index``; sizes are checked."""
        image, target = self.load_image(index), self.load_target(index)
        if image.shape[:2] != target.shape:
            item = self.items[index]
            raise ValueError(
                f"{self.name}: image {item.image_uri} is {image.shape[1]}x{image.shape[0]} but "
                f"its target {item.target_uri} is {target.shape[1]}x{target.shape[0]}"
            )
        return image, target

    def describe(self) -> dict:
        """Identity of this reader (for manifests and result tables)."""
        return {"dataset": self.name, "root": self.root, "split": self.split,
                "num_images": len(self), "num_classes": self.num_classes,
                "ignore_index": self.ignore_index, "task": self.task}


def lut(mapping: dict[int, int], default: int = 255) -> np.ndarray:
    """A 256-entry uint8 lookup table: stored value -> class id (``default`` elsewhere)."""
    table = np.full(256, default, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table
