"""Where tensors go by default: the GPU when torch sees one, the CPU otherwise (one code path)."""

from __future__ import annotations

import torch


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; when it is None (or empty), CUDA if available, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
