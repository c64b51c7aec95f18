"""Dataset names -> readers, and which dataset provides each one's memory (training) images."""

from __future__ import annotations

from .acdc import ACDC
from .ade20k import ADE20K
from .base import EvalDataset
from .cityscapes import Cityscapes
from .cocostuff import CocoStuff27
from .nyu import NYUv2Depth
from .pcontext import PascalContext
from .synthetic import SyntheticScenes
from .voc import PascalVOC

DATASETS: dict[str, type[EvalDataset]] = {
    "voc": PascalVOC,
    "ade20k": ADE20K,
    "pcontext": PascalContext,
    "cityscapes": Cityscapes,
    "acdc": ACDC,
    "cocostuff": CocoStuff27,
    "nyu": NYUv2Depth,
    "synthetic": SyntheticScenes,
}
# The paper's benchmark: every real dataset (synthetic scenes are for tests and demos).
PAPER_DATASETS = ("voc", "ade20k", "pcontext", "cityscapes", "acdc", "cocostuff", "nyu")
# Memory images come from another dataset: Cityscapes train is the memory for ACDC.
MEMORY_SOURCE = {"acdc": "cityscapes"}


def dataset_class(name: str) -> type[EvalDataset]:
    """The reader class of a dataset name; unknown names raise KeyError listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known datasets: "
                       f"{', '.join(sorted(DATASETS))}") from None


def open_dataset(name: str, root: str, split: str) -> EvalDataset:
    """Reader for ``split`` ("train" = memory images, "val" = queries) of dataset ``name``."""
    return dataset_class(name)(root, split)


def memory_dataset_name(name: str) -> str:
    """The dataset whose training images form the memory bank when evaluating ``name``."""
    return MEMORY_SOURCE.get(name, name)
