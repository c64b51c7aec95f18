"""Cityscapes (gtFine), the 19 evaluation classes ("train ids"), 255 ignore.

Targets are ``*_gtFine_labelTrainIds.png`` when present (the output of the official
createTrainIdLabelImgs script), else ``*_gtFine_labelIds.png`` mapped through the train-id table.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shared import storage

from .base import EvalDataset, Item, complete, lut, nonempty, require

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
# Cityscapes label id -> train id; every other id (void, license plate, ...) is ignored.
LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                     24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LABEL_LUT = lut(LABEL_TO_TRAIN_ID)
LAYOUT = """  <root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
  <root>/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png  (or _gtFine_labelIds.png)"""


def pair_by_suffix(images: list[str], image_suffix: str, targets: dict[str, str],
                   expected: Callable[[str], str]) -> list[Item]:
    """One item per image: its stem (name without ``image_suffix``), its target from ``targets``,
    or ``expected(image_uri)`` when it has none (so the missing file can be named)."""
    items = []
    for uri in images:
        stem = uri.rsplit("/", 1)[-1][: -len(image_suffix)]
        items.append(Item(stem, uri, targets.get(stem) or expected(uri)))
    return items


def sibling_target(image_uri: str, image_folder: str, image_suffix: str, target_folder: str,
                   target_suffix: str) -> str:
    """Where an image's target belongs, e.g. <root>/leftImg8bit/val/<city>/<n>_leftImg8bit.png
    -> <root>/gtFine/val/<city>/<n>_gtFine_labelTrainIds.png."""
    head, tail = image_uri.rsplit(f"/{image_folder}/", 1)
    return f"{head}/{target_folder}/{tail[: -len(image_suffix)]}{target_suffix}"


def target_index(uris: list[str], suffix: str) -> dict[str, str]:
    """stem -> target URI for files ending in ``suffix``."""
    return {u.rsplit("/", 1)[-1][: -len(suffix)]: u for u in uris if u.endswith(suffix)}


class Cityscapes(EvalDataset):
    name = "cityscapes"
    classes = CLASSES
    layout = LAYOUT

    def __init__(self, root: str, split: str = "val"):
        super().__init__(root, split)
        require(self.root, self.name, [f"leftImg8bit/{split}", f"gtFine/{split}"], LAYOUT)
        images = storage.glob(storage.join(self.root, "leftImg8bit", split, "*",
                                           "*_leftImg8bit.png"))
        gt = storage.glob(storage.join(self.root, "gtFine", split, "*", "*_gtFine_label*Ids.png"))
        train_ids = target_index(gt, "_gtFine_labelTrainIds.png")
        self.mapped = not train_ids  # only raw label ids: map them through the table
        suffix = "_gtFine_labelIds.png" if self.mapped else "_gtFine_labelTrainIds.png"
        targets = train_ids or target_index(gt, suffix)
        items = pair_by_suffix(images, "_leftImg8bit.png", targets, lambda uri: sibling_target(
            uri, "leftImg8bit", "_leftImg8bit.png", "gtFine", suffix))
        self.items = complete(nonempty(items, self.root, self.name, split, LAYOUT), self.name,
                              split)

    def convert_target(self, raw: np.ndarray) -> np.ndarray:
        return LABEL_LUT[raw] if self.mapped else raw
