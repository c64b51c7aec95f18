"""What the GPU suite writes besides its numbers: the machine and libraries, and the table.

``environment`` records the device (name, memory, compute capability, SMs), the NVIDIA driver
(from nvidia-smi, when present), CUDA and cuDNN as torch was built with them, the float32 flags
that decide TF32, and the versions of the libraries the parts run through. ``render_markdown``
turns the suite's report into the Markdown page that benchmarks/README.md's GPU rows cite.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

import torch

LIBRARIES = ("diffusers", "timm", "transformers", "numpy", "scipy", "pyarrow")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version as nvidia-smi reports it, or None without nvidia-smi."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def faiss_info() -> dict[str, Any]:
    try:
        import faiss

        from evaluation.search import faiss_has_gpu
    except ImportError as exc:
        return {"version": None, "error": str(exc)}
    return {"version": getattr(faiss, "__version__", None), "gpu": faiss_has_gpu()}


def environment(device: torch.device) -> dict[str, Any]:
    """The machine, the driver and the library versions a run measured with."""
    env: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flags": {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                  "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                  "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "libraries": {name: _version(name) for name in LIBRARIES},
        "faiss": faiss_info(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_gib": props.total_memory / 2**30,
                      "capability": f"{props.major}.{props.minor}",
                      "multiprocessors": props.multi_processor_count,
                      "count": torch.cuda.device_count()}
        env["driver"] = nvidia_driver()
    return env


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _result(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"**error**: {row['error']}"
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    return row.get("result", "") + (f" ({row['notes']})" if row.get("notes") else "")


def _header(report: dict[str, Any]) -> list[str]:
    env = report["environment"]
    gpu = env.get("gpu")
    device = (f"{gpu['name']} x{gpu['count']}, {gpu['memory_gib']:.1f} GiB, compute "
              f"capability {gpu['capability']}, {gpu['multiprocessors']} SMs; driver "
              f"{env.get('driver') or 'unknown'}" if gpu else
              f"CPU ({env['cpus']} cores, {env['torch_threads']} torch threads)")
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)
    faiss = env["faiss"]
    flags = env["flags"]
    return [
        f"# GPU suite ({report['mode']} sizes) on {env['device']}", "",
        f"`{report['command']}`: started {report['started']}, {report['total_s']:.0f} s in all.",
        "",
        f"- device: {device}",
        f"- torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), python "
        f"{env['python']}, {env['platform']}",
        f"- libraries: {libs}; faiss {faiss.get('version')} (GPU support: "
        f"{'yes' if faiss.get('gpu') else 'no'})",
        f"- float32: cuDNN TF32 {'on' if flags['cudnn_allow_tf32'] else 'off'}, cuBLAS TF32 "
        f"{'on' if flags['matmul_allow_tf32'] else 'off'} (matmul precision "
        f"{flags['float32_matmul_precision']!r}); training turns cuBLAS TF32 on for its steps",
        *[f"- {note}" for note in report["notes"]], "",
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: the environment, then one table row per part."""
    lines = _header(report)
    lines += ["| part | what | result | TFLOP/s | of peak | peak memory GiB | s |",
              "|---|---|---|---:|---:|---:|---:|"]
    for row in report["parts"]:
        ratio = row.get("peak_ratio")
        peak = f"{ratio:.1%} of {row['precision']}" if ratio is not None else ""
        lines.append(f"| {row['part']} | {row['what']} | {_result(row)} | "
                     f"{_num(row.get('tflops'), '.3g')} | {peak} | "
                     f"{_num(row.get('memory_gib'), '.2f')} | {_num(row.get('seconds'), '.1f')} |")
    return "\n".join(lines) + "\n"
