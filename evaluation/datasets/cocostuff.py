"""COCO-Stuff 164k with the 27 coarse classes (12 thing + 15 stuff supercategories), 255 ignore.

Stored masks hold COCO-Stuff id - 1 (0..181; 255 unlabelled); each fine class maps to its
supercategory in the COCO-Stuff label hierarchy.
"""

from __future__ import annotations

import numpy as np

from .base import EvalDataset, complete, lut, nonempty, paired_items, require

CLASSES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)
# COCO thing ids 1..91 (including the 11 unused ids) by supercategory, as id ranges.
THING_RANGES = [((1, 1), "person"), ((2, 9), "vehicle"), ((10, 15), "outdoor"),
                ((16, 25), "animal"), ((26, 33), "accessory"), ((34, 43), "sports"),
                ((44, 51), "kitchen"), ((52, 61), "food"), ((62, 71), "furniture"),
                ((72, 77), "electronic"), ((78, 83), "appliance"), ((84, 91), "indoor")]
# COCO-Stuff stuff classes, ids 92..182 in this (alphabetical) order, with their supercategory.
STUFF = [
    ("banner", "textile"), ("blanket", "textile"), ("branch", "plant"), ("bridge", "building"),
    ("building-other", "building"), ("bush", "plant"), ("cabinet", "furniture-stuff"),
    ("cage", "structural"), ("cardboard", "rawmaterial"), ("carpet", "floor"),
    ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"), ("cloth", "textile"),
    ("clothes", "textile"), ("clouds", "sky"), ("counter", "furniture-stuff"),
    ("cupboard", "furniture-stuff"), ("curtain", "textile"), ("desk-stuff", "furniture-stuff"),
    ("dirt", "ground"), ("door-stuff", "furniture-stuff"), ("fence", "structural"),
    ("floor-marble", "floor"), ("floor-other", "floor"), ("floor-stone", "floor"),
    ("floor-tile", "floor"), ("floor-wood", "floor"), ("flower", "plant"), ("fog", "water"),
    ("food-other", "food-stuff"), ("fruit", "food-stuff"), ("furniture-other", "furniture-stuff"),
    ("grass", "plant"), ("gravel", "ground"), ("ground-other", "ground"), ("hill", "solid"),
    ("house", "building"), ("leaves", "plant"), ("light", "furniture-stuff"), ("mat", "textile"),
    ("metal", "rawmaterial"), ("mirror-stuff", "furniture-stuff"), ("moss", "plant"),
    ("mountain", "solid"), ("mud", "ground"), ("napkin", "textile"), ("net", "structural"),
    ("paper", "rawmaterial"), ("pavement", "ground"), ("pillow", "textile"),
    ("plant-other", "plant"), ("plastic", "rawmaterial"), ("platform", "ground"),
    ("playingfield", "ground"), ("railing", "structural"), ("railroad", "ground"),
    ("river", "water"), ("road", "ground"), ("rock", "solid"), ("roof", "building"),
    ("rug", "textile"), ("salad", "food-stuff"), ("sand", "ground"), ("sea", "water"),
    ("shelf", "furniture-stuff"), ("sky-other", "sky"), ("skyscraper", "building"),
    ("snow", "ground"), ("solid-other", "solid"), ("stairs", "furniture-stuff"),
    ("stone", "solid"), ("straw", "plant"), ("structural-other", "structural"),
    ("table", "furniture-stuff"), ("tent", "building"), ("textile-other", "textile"),
    ("towel", "textile"), ("tree", "plant"), ("vegetable", "food-stuff"), ("wall-brick", "wall"),
    ("wall-concrete", "wall"), ("wall-other", "wall"), ("wall-panel", "wall"),
    ("wall-stone", "wall"), ("wall-tile", "wall"), ("wall-wood", "wall"),
    ("water-other", "water"), ("waterdrops", "water"), ("window-blind", "window"),
    ("window-other", "window"), ("wood", "solid"),
]
FIRST_STUFF_ID = 92


def fine_to_coarse() -> dict[int, int]:
    """Stored mask value (COCO-Stuff id - 1) -> coarse class index."""
    index = {name: i for i, name in enumerate(CLASSES)}
    out = {}
    for (lo, hi), superclass in THING_RANGES:
        for fine_id in range(lo, hi + 1):
            out[fine_id - 1] = index[superclass]
    for offset, (_, superclass) in enumerate(STUFF):
        out[FIRST_STUFF_ID + offset - 1] = index[superclass]
    return out


LAYOUT = """  <root>/images/{train2017,val2017}/<id>.jpg
  <root>/annotations/{train2017,val2017}/<id>.png  (COCO-Stuff id - 1 per pixel, 255 unlabelled)"""


class CocoStuff27(EvalDataset):
    name = "cocostuff"
    classes = CLASSES
    splits = {"train": "train2017", "val": "val2017"}
    layout = LAYOUT

    def __init__(self, root: str, split: str = "val"):
        super().__init__(root, split)
        folder = self.splits[split]
        require(self.root, self.name, [f"images/{folder}", f"annotations/{folder}"], LAYOUT)
        items = paired_items(self.root, folder)
        self.items = complete(nonempty(items, self.root, self.name, folder, LAYOUT), self.name,
                              split)
        self._lut = lut(fine_to_coarse())

    def convert_target(self, raw: np.ndarray) -> np.ndarray:
        return self._lut[raw]
