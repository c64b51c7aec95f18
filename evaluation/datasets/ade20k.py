"""ADE20K (SceneParsing, ADEChallengeData2016): 150 classes; stored 0 ("other") is ignored."""

from __future__ import annotations

import numpy as np

from .base import EvalDataset, complete, descend, nonempty, paired_items, require

CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
LAYOUT = """  <root>/images/{training,validation}/<id>.jpg
  <root>/annotations/{training,validation}/<id>.png  (0 = other/ignored, 1..150 = classes)
  (<root> is ADEChallengeData2016/, or a folder holding it)"""

# stored value v -> class v - 1; 0 -> ignore
_LUT = np.concatenate([[255], np.arange(150), np.full(105, 255)]).astype(np.uint8)


class ADE20K(EvalDataset):
    name = "ade20k"
    classes = CLASSES
    splits = {"train": "training", "val": "validation"}
    layout = LAYOUT

    def __init__(self, root: str, split: str = "val"):
        super().__init__(root, split)
        self.root = descend(self.root, "ADEChallengeData2016")
        folder = self.splits[split]
        require(self.root, self.name, [f"images/{folder}", f"annotations/{folder}"], LAYOUT)
        items = paired_items(self.root, folder)
        self.items = complete(nonempty(items, self.root, self.name, folder, LAYOUT), self.name,
                              split)

    def convert_target(self, raw: np.ndarray) -> np.ndarray:
        return _LUT[raw]
