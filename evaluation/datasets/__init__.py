"""Evaluation dataset readers (one module per dataset), the registry, and low-shot subsets."""

from .base import DatasetLayoutError, EvalDataset
from .registry import DATASETS, PAPER_DATASETS, dataset_class, memory_dataset_name, open_dataset

__all__ = ["DATASETS", "PAPER_DATASETS", "DatasetLayoutError", "EvalDataset", "dataset_class",
           "memory_dataset_name", "open_dataset"]
