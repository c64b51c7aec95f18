"""Pascal VOC 2012 with the SBD augmented training set ("trainaug"): 21 classes, 255 ignore."""

from __future__ import annotations

from shared import storage

from .base import EvalDataset, Item, complete, descend, read_id_list, require

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
LAYOUT = """  <root>/JPEGImages/<id>.jpg
  <root>/SegmentationClassAug/<id>.png        (trainaug masks, class id per pixel)
  <root>/SegmentationClass/<id>.png           (val masks, palette PNG)
  <root>/ImageSets/Segmentation/trainaug.txt  (or train_aug.txt, aug.txt) and val.txt
  (<root> is VOC2012/, or a VOCdevkit/ holding VOC2012/)"""


class PascalVOC(EvalDataset):
    name = "voc"
    classes = CLASSES
    splits = {"train": "trainaug", "val": "val"}
    layout = LAYOUT

    def __init__(self, root: str, split: str = "val"):
        super().__init__(root, split)
        self.root = descend(self.root, "VOC2012")
        if split == "train":
            lists = [f"ImageSets/Segmentation/{n}.txt" for n in ("trainaug", "train_aug", "aug")]
            rel = next((r for r in lists if storage.exists(storage.join(self.root, r))), lists[0])
            masks = "SegmentationClassAug"
        else:
            rel, masks = "ImageSets/Segmentation/val.txt", "SegmentationClass"
        require(self.root, self.name, ["JPEGImages", masks], LAYOUT)
        ids = read_id_list(self.root, rel, self.name, LAYOUT)
        items = [
            Item(i, storage.join(self.root, "JPEGImages", f"{i}.jpg"),
                 storage.join(self.root, masks, f"{i}.png"))
            for i in ids
        ]
        self.items = complete(items, self.name, split, listed=True)
