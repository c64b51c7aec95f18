"""Cityscapes (gtFine), the 19 evaluation classes ("train ids"), 255 ignore.

Targets are ``*_gtFine_labelTrainIds.png`` when present (the output of the official
createTrainIdLabelImgs script), else ``*_gtFine_labelIds.png`` mapped through the train-id table.
"""

from __future__ import annotations

import numpy as np

from shared import storage

from .base import EvalDataset, Item, lut, nonempty, require

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


def pair_by_suffix(images: list[str], image_suffix: str, targets: dict[str, str]) -> list[Item]:
    """Items for the images whose stem (name without ``image_suffix``) has a target."""
    items = []
    for uri in images:
        stem = uri.rsplit("/", 1)[-1][: -len(image_suffix)]
        if stem in targets:
            items.append(Item(stem, uri, targets[stem]))
    return items


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
        targets = train_ids or target_index(gt, "_gtFine_labelIds.png")
        items = pair_by_suffix(images, "_leftImg8bit.png", targets)
        self.items = nonempty(items, self.root, self.name, split, LAYOUT)

    def convert_target(self, raw: np.ndarray) -> np.ndarray:
        return LABEL_LUT[raw] if self.mapped else raw
