"""ACDC (adverse conditions: fog, night, rain, snow) with the Cityscapes 19 train-id classes.

The in-context protocol uses Cityscapes train as the memory and ACDC val as the queries.
"""

from __future__ import annotations

import numpy as np

from shared import storage

from .base import EvalDataset, complete, nonempty, require
from .cityscapes import CLASSES, LABEL_LUT, pair_by_suffix, sibling_target, target_index

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
        suffix = "_gt_labelIds.png" if self.mapped else "_gt_labelTrainIds.png"
        targets = train_ids or target_index(gt, suffix)
        items = pair_by_suffix(sorted(images), "_rgb_anon.png", targets, lambda uri: sibling_target(
            uri, "rgb_anon", "_rgb_anon.png", "gt", suffix))
        self.items = complete(nonempty(items, self.root, self.name, split, LAYOUT), self.name,
                              split)

    def convert_target(self, raw: np.ndarray) -> np.ndarray:
        return LABEL_LUT[raw] if self.mapped else raw
