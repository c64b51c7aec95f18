"""The token affinity W of the normalized cut, shared by the reference and the batched solver.

W = F F^T over L2-normalised (N, C) tokens, min-max normalised over the whole matrix, then
W ** alpha. F F^T is one product per image, so an image gets the same W bit for bit in any batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from labeling.ncut_lapack import GRAM_BLOCK, Linalg, default_linalg


def affinity_matrix(
    features: Tensor, alpha: float = 10.0, out: Tensor | None = None, linalg: Linalg | None = None
) -> Tensor:
    """W = minmax(F F^T) ** alpha for (N, C) tokens, L2-normalised first; all-equal W -> ones. -> (N, N) float64.

    F F^T is float32 on the CPU (the features come from a 16-bit UNet), float64 on a GPU (free
    there, and immune to TF32 matmul settings), computed by `linalg`'s kernels (default: those
    of the features' device); the normalisation and the power run in float64, in place in `out`
    (an (N, N) float64 tensor, allocated when not given).
    """
    unit = unit_rows(features)
    linalg = default_linalg(unit.device) if linalg is None else linalg
    return minmax_power(mirror_lower(linalg.lower_gram(unit)), alpha, out)


def unit_rows(features: Tensor) -> Tensor:
    """(N, C) rows L2-normalised in the Gram's precision: float32 on the CPU, float64 on a GPU."""
    dtype = torch.float64 if features.is_cuda else torch.float32
    return F.normalize(features.to(dtype), dim=-1)


def minmax_power(sim: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
    """minmax(sim) ** alpha in float64, written in `out` (allocated when not given) -> (N, N)."""
    n = sim.shape[-1]
    w = torch.empty(n, n, dtype=torch.float64, device=sim.device) if out is None else out
    lo, hi = (x.double() for x in torch.aminmax(sim))  # exact: float32 widens to float64 exactly
    w.copy_(sim)
    # all-equal (to 1e-6) similarities give W = 1, decided on the device (no host sync): then
    # (sim - lo) / inf + 1 = 1; otherwise + 0 changes no bit
    flat = hi - lo <= 1e-6 * hi.abs().clamp_min(1e-30)
    span = torch.where(flat, math.inf, hi - lo)
    # (sim - lo) / (hi - lo) lies in [0, 1] without clamping: rounding is monotonic
    return _power_(w.sub_(lo).div_(span).add_(flat.to(w.dtype)), alpha)


def mirror_lower(x: Tensor) -> Tensor:
    """Copy the lower triangle of a square matrix onto its upper triangle, in place -> x."""
    n = x.shape[0]
    for lo in range(0, n, GRAM_BLOCK):
        hi = min(lo + GRAM_BLOCK, n)
        x[:lo, lo:hi] = x[lo:hi, :lo].T
        block = x[lo:hi, lo:hi]
        block.copy_(block.tril() + block.tril(-1).T)
    return x


def _power_(x: Tensor, alpha: float) -> Tensor:
    """x ** alpha in place; by square-and-multiply when alpha is a small positive integer (much faster than pow)."""
    k = int(alpha)
    if alpha != k or not 1 <= k <= 64:
        return x.pow_(alpha)
    base = x.clone() if k & (k - 1) else None  # needed only when k is not a power of two
    for bit in bin(k)[3:]:  # the bits after the leading one
        x.mul_(x)
        if bit == "1":
            x.mul_(base)
    return x
