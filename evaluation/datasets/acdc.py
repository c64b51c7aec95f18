"""ACDC (adverse conditions: fog, night, rain, snow) with the Cityscapes 19 train-id classes.

The in-context protocol uses Cityscapes train as the memory and ACDC val as the queries.
"""

from __future__ import annotations

import numpy as np

from shared import storage

from .base import EvalDataset, nonempty, require
from .cityscapes import CLASSES, LABEL_LUT, pair_by_suffix, target_index

CONDITIONS = ("fog", "night", "rain", "snow")
LAYOUT = """  <root>/rgb_anon/<condition>/{train,val}/<sequence>/<name>_rgb_anon.png
  <root>/gt/<condition>/{train,val}/<sequence>/<name>_gt_labelTrainIds.png  (or _gt_labelIds.png)
  (<condition> in fog, night, rain, snow)"""


class ACDC(EvalDataset):
    name = "acdc"
    classes = CLASSES
    layout = LAYOUT

    def __init__(self, root: str, split: str = "val", conditions: tuple[str, ...] = CONDITIONS):
        super().__init__(root, split)
        require(self.root, self.name, ["rgb_anon", "gt"], LAYOUT)
        images, gt = [], []
        for cond in conditions:
            images += storage.glob(storage.join(self.root, "rgb_anon", cond, split, "*",
                                                "*_rgb_anon.png"))
            gt += storage.glob(storage.join(self.root, "gt", cond, split, "*", "*_gt_label*Ids.png"))
        train_ids = target_index(gt, "_gt_labelTrainIds.png")
        self.mapped = not train_ids
        targets = train_ids or target_index(gt, "_gt_labelIds.png")
        items = pair_by_suffix(sorted(images), "_rgb_anon.png", targets)
        self.items = nonempty(items, self.root, self.name, split, LAYOUT)

    def convert_target(self, raw: np.ndarray) -> np.ndarray:
        return LABEL_LUT[raw] if self.mapped else raw
