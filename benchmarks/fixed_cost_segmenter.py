"""A segmenter whose cost is a fixed wait per batch: the labeling pipeline measured without a model.

    segmenter="fixed_cost_segmenter:factory"   # benchmarks/ on the Ray workers' PYTHONPATH

Each call of `_segment` (one batch of the segment stage) sleeps `DIP_FIXED_COST_WAIT` seconds
(default 0.5), a stand-in for a GPU model whose time does not depend on the host's CPUs: with N
actors the pipeline should label N times as many images per second, whatever the machine. The
maps are a colour quantisation of the image (each channel above or below mid-grey, 8 codes,
renumbered 0..S-1), so they depend on the image and are the same in every process, and two
label sets can be compared byte for byte.

With `DIP_FIXED_COST_RECORDS` set to a local folder, each process appends JSON lines to
``<folder>/<pid>.jsonl``: one when the segmenter is built (``kind`` "built", at ``start``), and
one per batch (``kind`` "batch": the wall-clock ``start`` and ``end`` of the wait and the batch's
``images``), each with the Ray node id and the process id. `read_records` collects them: where
and when the work ran.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labeling.segmenter import Segmenter, relabel_contiguous

WAIT_ENV = "DIP_FIXED_COST_WAIT"
RECORDS_ENV = "DIP_FIXED_COST_RECORDS"
DEFAULT_WAIT = 0.5


def quantise(image: np.ndarray, threshold: int = 128) -> np.ndarray:
    """(H, W, 3) uint8 image -> (H, W) uint16 map: one segment per colour code present.

    The code of a pixel is its three channels' bits (value >= threshold), 0..7.
    """
    bits = (image >= threshold).astype(np.uint16)  # (H, W, 3)
    codes = bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]  # (H, W), 0..7
    return relabel_contiguous(codes)


def _node_id() -> str | None:
    """The Ray node this process runs on, or None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class FixedCostSegmenter(Segmenter):
    """Colour-quantisation maps after a fixed wait per batch (see the module docstring)."""

    name = "fixed-cost"

    def __init__(self, wait: float, records: str | None = None,
                 device: str | torch.device | None = None):
        if wait < 0:
            raise ValueError(f"{self.name}: the wait per batch must be >= 0 s, got {wait}")
        self.wait = wait
        self.records = Path(records) if records else None
        self.device = torch.device(device or "cpu")
        self._record("built", start=time.time())

    def _segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        start = time.time()
        time.sleep(self.wait)
        self._record("batch", start=start, end=time.time(), images=len(images))
        return [quantise(image) for image in images]

    def _record(self, kind: str, **fields: Any) -> None:
        if self.records is None:
            return
        row = {"kind": kind, "node": _node_id(), "pid": os.getpid(), **fields}
        self.records.mkdir(parents=True, exist_ok=True)
        with open(self.records / f"{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")  # one line per write, one file per process

    def identity(self) -> dict[str, Any]:
        # the wait changes how long a run takes, never what it writes
        return {"name": self.name, "maps": "colour-quantisation-3bit"}


def _wait_from_env() -> float:
    text = os.environ.get(WAIT_ENV, "")
    if not text:
        return DEFAULT_WAIT
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{WAIT_ENV}={text!r} is not a number of seconds") from None


def factory(device: str | torch.device | None = None) -> FixedCostSegmenter:
    """The segmenter `get_segmenter("fixed_cost_segmenter:factory")` builds in each worker,
    configured by the worker's environment (`DIP_FIXED_COST_WAIT`, `DIP_FIXED_COST_RECORDS`)."""
    return FixedCostSegmenter(_wait_from_env(), os.environ.get(RECORDS_ENV) or None, device)


def read_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record written under ``folder``, ordered by start time."""
    rows = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return sorted(rows, key=lambda r: r["start"])
