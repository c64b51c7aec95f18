"""What every part of the GPU suite measures with: timed calls, FLOP counts, the device's peak.

- ``sync``: ``torch.cuda.synchronize`` on CUDA, nothing on a CPU (called there all the same, so
  the CPU smoke run goes through every timing path a GPU run takes).
- ``time_calls``: warm-up calls, then calls until a time budget is spent; wall seconds of each,
  the device synchronised around every call.
- ``count_flops``: FLOPs of one call, counted by torch's FlopCounterMode (matmuls, convolutions,
  attention). Parts count on the meta device where the model allows it, so the count costs no
  device time and includes attention whatever the device; FlopCounterMode has no formula for the
  CPU's fused attention kernel, so a count made on a CPU leaves attention out (the FLOPs table of
  DESIGN.md was counted that way).
- ``peak_tflops``: the device's dense peak for the precision a part computes in, from the
  vendors' data sheets; None for a CPU or a GPU not in the table (its ratio is then not given).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peak TFLOP/s per GPU and precision; the first matching name wins, so the
# variants with other clocks or memory come before the plain name. None: a variant not listed.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float] | None], ...] = (
    ("H200 NVL", None),
    ("H100 NVL", None),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on a CPU, whose work is done on return."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, budget_s: float, warmup: int = 1,
               min_calls: int = 2, max_calls: int = 10_000) -> list[float]:
    """Wall seconds of each timed call of ``fn``: ``warmup`` untimed calls, then calls until
    ``budget_s`` is spent (at least ``min_calls``, at most ``max_calls``)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls
                                      or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (forward and, if ``fn`` runs it, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_precision(dtype: torch.dtype, kind: str = "matmul") -> str:
    """The peak a computation in ``dtype`` runs at: bf16, fp16, or for float32 tf32 when torch
    lets cuBLAS (``kind`` "matmul") or cuDNN (``kind`` "conv") use TF32, else fp32."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if kind == "conv":
        return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_for_name(name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of the GPU called ``name`` in ``precision``; None if not in the table."""
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return None if peaks is None else peaks.get(precision)
    return None


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """Dense peak TFLOP/s of ``device`` in ``precision``; None for a CPU or an unlisted GPU."""
    return peak_for_name(device_name(device), precision) if device.type == "cuda" else None


def rate_fields(device: torch.device, flops_per_item: float | None, items_per_s: float,
                precision: str | None) -> dict[str, Any]:
    """Achieved TFLOP/s and its fraction of the device's peak (None where either is unknown)."""
    if not flops_per_item:
        return {"tflops": None, "peak_ratio": None, "precision": precision}
    tflops = flops_per_item * items_per_s / 1e12
    peak = peak_tflops(device, precision) if precision else None
    return {"tflops": tflops, "peak_ratio": tflops / peak if peak else None,
            "precision": precision, "peak_tflops": peak}


def peak_memory_gib(device: torch.device) -> float:
    """CUDA max_memory_allocated since the part began (the suite resets it), or the process's
    peak RSS on a CPU (which cannot be reset: the largest of the parts so far)."""
    from training.model import peak_memory_bytes

    return peak_memory_bytes(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
