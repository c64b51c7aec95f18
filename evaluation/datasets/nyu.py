"""NYUv2 depth, the official 795 / 654 split in the widely used "official_splits" layout.

Depth maps are 16-bit PNGs in millimetres; 0 means no measurement. Targets come back in metres
(float32), with pixels beyond ``max_depth`` set to 0 (invalid).
"""

from __future__ import annotations

import numpy as np

from shared import storage
from shared.images import decode_png

from .base import EvalDataset, Item, complete, nonempty, require

LAYOUT = """  <root>/official_splits/{train,test}/<scene>/rgb_<n>.jpg
  <root>/official_splits/{train,test}/<scene>/sync_depth_<n>.png  (uint16, millimetres)"""
DEPTH_SCALE = 1000.0  # stored units per metre
MAX_DEPTH = 10.0


class NYUv2Depth(EvalDataset):
    name = "nyu"
    task = "depth"
    classes = ("depth",)
    ignore_index = 0
    splits = {"train": "train", "val": "test"}
    layout = LAYOUT

    def __init__(self, root: str, split: str = "val", max_depth: float = MAX_DEPTH):
        super().__init__(root, split)
        folder = self.splits[split]
        self.max_depth = max_depth
        require(self.root, self.name, [f"official_splits/{folder}"], LAYOUT)
        items = []
        for uri in storage.glob(storage.join(self.root, "official_splits", folder, "*",
                                             "rgb_*.jpg")):
            folder_uri, name = uri.rsplit("/", 1)
            number = name[len("rgb_") : -len(".jpg")]
            scene = folder_uri.rsplit("/", 1)[-1]
            items.append(Item(f"{scene}/{number}", uri,
                              storage.join(folder_uri, f"sync_depth_{number}.png")))
        self.items = complete(nonempty(items, self.root, self.name, folder, LAYOUT), self.name,
                              split, target="depth map")

    def load_target(self, index: int) -> np.ndarray:
        item = self.items[index]
        raw = decode_png(storage.read_bytes(item.target_uri), name=item.target_uri)
        if raw.dtype != np.uint16:
            raise ValueError(f"nyu: depth map {item.target_uri} must be a 16-bit PNG, "
                             f"got {raw.dtype}")
        depth = raw.astype(np.float32) / DEPTH_SCALE
        depth[depth > self.max_depth] = 0.0
        return depth
