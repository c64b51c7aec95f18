"""Soft nearest-neighbour label transfer, the equation training and evaluation share.

y_i = sum_j softmax_j(s_ij / T) v_j: a query patch takes the values of support (or bank) patches
weighted by the softmax of their similarities over a temperature (Eq. 1-2 of the paper). In
training the j run over every patch of the support images; in evaluation over the k nearest
bank patches of each query. Pure tensor functions, no I/O.
"""

from __future__ import annotations

import torch


def check_temperature(temperature: float) -> None:
    """ValueError unless the softmax temperature is positive."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def transfer_weights(sims: torch.Tensor, temperature: float) -> torch.Tensor:
    """w_ij = softmax_j(s_ij / T) over the last dimension, in float32 or wider.

    Low-precision similarities are widened first: s / 0.07 overflows float16's range.
    """
    check_temperature(temperature)
    dtype = torch.promote_types(sims.dtype, torch.float32)
    return torch.softmax(sims.to(dtype) / temperature, dim=-1)


def soft_transfer(sims: torch.Tensor, values: torch.Tensor, temperature: float) -> torch.Tensor:
    """y_i = sum_j softmax_j(s_ij / T) v_j: sims (..., Nq, N), values (..., N, C) -> (..., Nq, C)."""
    weights = transfer_weights(sims, temperature)  # (..., Nq, N)
    return weights @ values.to(weights.dtype)  # (..., Nq, N) x (..., N, C) -> (..., Nq, C)
