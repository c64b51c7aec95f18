"""The straightforward recursive normalized cut, and the rules the batched solver shares with it.

One region at a time: A = W restricted to the region, d = row sums, u = second eigenvector of
I - D^-1/2 A D^-1/2 by a full `eigh`, y = D^-1/2 u with the sign rule of `flip_sign`, then a Python
loop over the 100 thresholds. `labeling.ncut.batched_recursive_ncut` gives the same partitions
much faster; it takes the degree floor, the sign rule, the thresholds and the leaf numbering
from here, which (with the first-minimum rule) makes both versions choose alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from labeling.ncut_affinity import affinity_matrix
from labeling.ncut_lapack import NCutOptions

NUM_THRESHOLDS = 100
THRESHOLD_SCALE = 0.99
DEG_EPS = 1e-12  # degree floor: a token with zero affinity never divides by zero
SIGN_TIE_RTOL = 1e-9  # |y| values this close to the largest count as tied (first index wins)


def flip_sign(y: Tensor, valid: Tensor | None = None) -> Tensor:
    """y * sign(y_i) with i the first index whose |y_i| ties (to 1e-9) with max |y| (rows of y)."""
    mag = y.abs() if valid is None else torch.where(valid, y.abs(), torch.zeros_like(y))
    top = mag.amax(dim=-1, keepdim=True)
    first = (mag >= top * (1 - SIGN_TIE_RTOL)).to(torch.uint8).argmax(dim=-1, keepdim=True)
    sign = torch.where(y.gather(-1, first) < 0, -1.0, 1.0).to(y.dtype)
    return y * sign


def labels_from_leaves(leaves: list[tuple[tuple[int, ...], Tensor]], n: int) -> Tensor:
    """Number leaves in depth-first order (path 0 = positive side) -> (n,) segment ids.

    The ids are written on the leaves' device, one fill per leaf: no token index visits the host.
    """
    device = leaves[0][1].device
    labels = torch.empty(n, dtype=torch.long, device=device)
    for seg, (_, idx) in enumerate(sorted(leaves, key=lambda leaf: leaf[0])):
        labels.index_fill_(0, idx, seg)
    return labels


def reference_recursive_ncut(
    features: Tensor, tau: float = 0.5, alpha: float = 10.0, options: NCutOptions | None = None
) -> Tensor:
    """Recursive 2-way NCut of (N, C) tokens, one region at a time with a full eigh -> (N,) ids.

    `options` choose the kernels of the affinity's F F^T only (the same W as the batched solver
    under the same options); the default is SciPy's on the CPU, torch's elsewhere.
    """
    linalg = (NCutOptions() if options is None else options).linalg_for(features.device)
    w = affinity_matrix(features, alpha, linalg=linalg)
    n = w.shape[0]
    leaves: list[tuple[tuple[int, ...], Tensor]] = []
    stack = [((), torch.arange(n, device=w.device))]
    while stack:
        path, idx = stack.pop()
        if idx.numel() <= 1:
            leaves.append((path, idx))
            continue
        a = w[idx][:, idx]
        d = a.sum(dim=1).clamp_min(DEG_EPS)
        s = d.rsqrt()
        lap = torch.eye(len(idx), dtype=a.dtype, device=a.device) - s[:, None] * a * s[None, :]
        y = flip_sign(s * torch.linalg.eigh(lap).eigenvectors[:, 1])
        best, best_x = reference_best_split(y, a, d)
        if best < tau:
            stack.append(((*path, 1), idx[~best_x]))
            stack.append(((*path, 0), idx[best_x]))
        else:
            leaves.append((path, idx))
    return labels_from_leaves(leaves, n).to(features.device)


def reference_best_split(y: Tensor, a: Tensor, d: Tensor) -> tuple[float, Tensor | None]:
    """The reference's loop over the 100 thresholds of one region -> (best NCut, y > t*; None if no cut)."""
    best, best_x = float("inf"), None
    lo, hi = THRESHOLD_SCALE * y.min().item(), THRESHOLD_SCALE * y.max().item()
    for t in torch.linspace(lo, hi, NUM_THRESHOLDS, dtype=y.dtype, device=y.device):
        x = y > t
        if not x.any() or x.all():
            continue
        assoc_a, assoc_b = d[x].sum(), d[~x].sum()
        cut = a[x][:, ~x].sum()
        ncut = (cut / assoc_a + cut / assoc_b).item()
        if ncut < best:
            best, best_x = ncut, x
    return best, best_x
