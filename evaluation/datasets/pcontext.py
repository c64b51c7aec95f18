"""Pascal-Context, 59 classes + background (60 classes, 0 = background), 255 ignore.

Masks are the per-image PNGs of ``SegmentationClassContext`` (0 background, 1..59 the classes).
"""

from __future__ import annotations

from shared import storage

from .base import EvalDataset, Item, complete, descend, read_id_list, require

CLASSES = (
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person",
    "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)
LAYOUT = """  <root>/JPEGImages/<id>.jpg
  <root>/SegmentationClassContext/<id>.png          (0 background, 1..59 classes)
  <root>/ImageSets/SegmentationContext/{train,val}.txt
  (<root> is VOC2010/, or a VOCdevkit/ holding VOC2010/)"""


class PascalContext(EvalDataset):
    name = "pcontext"
    classes = CLASSES
    layout = LAYOUT

    def __init__(self, root: str, split: str = "val"):
        super().__init__(root, split)
        self.root = descend(self.root, "VOC2010")
        require(self.root, self.name, ["JPEGImages", "SegmentationClassContext"], LAYOUT)
        ids = read_id_list(self.root, f"ImageSets/SegmentationContext/{split}.txt", self.name,
                           LAYOUT)
        items = [
            Item(i, storage.join(self.root, "JPEGImages", f"{i}.jpg"),
                 storage.join(self.root, "SegmentationClassContext", f"{i}.png"))
            for i in ids
        ]
        self.items = complete(items, self.name, split, listed=True)
