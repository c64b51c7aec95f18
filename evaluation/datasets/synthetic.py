"""The procedural scenes of shared.synthetic: images/, masks/ and classes.json under one root."""

from __future__ import annotations

from shared import storage
from shared.synthetic import CLASS_NAMES

from .base import DatasetLayoutError, EvalDataset, Item, complete, nonempty, require

LAYOUT = """  <root>/classes.json              {"classes": [...], "ignore_index": 255}
  <root>/images/{train,val}/<id>.jpg
  <root>/masks/{train,val}/<id>.png  (uint8 class id per pixel)"""


class SyntheticScenes(EvalDataset):
    name = "synthetic"
    classes = tuple(CLASS_NAMES)
    layout = LAYOUT

    def __init__(self, root: str, split: str = "val"):
        super().__init__(root, split)
        require(self.root, self.name, ["classes.json", f"images/{split}", f"masks/{split}"], LAYOUT)
        meta = storage.read_json(storage.join(self.root, "classes.json"))
        if not isinstance(meta, dict) or "classes" not in meta:
            raise DatasetLayoutError(f"{self.name}: {storage.join(self.root, 'classes.json')} "
                                     "must hold {\"classes\": [...], \"ignore_index\": ...}")
        self.classes = tuple(meta["classes"])
        self.ignore_index = int(meta.get("ignore_index", 255))
        images = storage.glob(storage.join(self.root, "images", split, "*.jpg"))
        items = []
        for uri in images:
            image_id = uri.rsplit("/", 1)[-1][: -len(".jpg")]
            items.append(Item(image_id, uri, storage.join(self.root, "masks", split,
                                                          f"{image_id}.png")))
        self.items = complete(nonempty(items, self.root, self.name, split, LAYOUT), self.name,
                              split)
