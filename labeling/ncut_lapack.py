"""The linear algebra of the normalized cut, per platform: SciPy/NumPy's OpenBLAS on the CPU, torch elsewhere.

The cut needs six kernels: the lower triangle of F F^T, skinny products A v with a symmetric A,
an in-place Cholesky factorisation, solves with that factor, one eigenvector of small symmetric
matrices, and a context in which the solver's BLAS runs. `ScipyLinalg` (CPU tensors only) and
`TorchLinalg` (any device) implement the same kernels; `NCutOptions` says which one CPU tensors
use, and `NCutOptions.linalg_for(device)` resolves it. Other devices always use torch. Both give
the same segments; the SciPy kernels are faster on the CPUs measured (see benchmarks/bench_ncut.py).

Both keep a Cholesky factor in the same layout: for row-major M, the lower factor G (M = G G^T)
in M's own lower triangle, row-major, which is where LAPACK's upper factor U of M's column-major
view (M^T = M) lands, and the layout in which both triangular solves read G fastest.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas, lapack
from threadpoolctl import ThreadpoolController
from torch import Tensor

DIRECT_MAX_SIZE = 320  # regions up to this many tokens use LAPACK's one-vector solver (CPU)
EIGH_MAX_SIZE = 64  # without it (torch.linalg), a batched full eigh up to this many tokens
GRAM_BLOCK = 128  # rows per block of the affinity's F F^T
CPU_LINALGS = ("scipy", "torch")


class Linalg(Protocol):
    """The kernels the cut calls; `direct_max_size` is the largest region the direct eigensolver takes."""

    direct_max_size: int

    def lower_gram(self, feats: Tensor, out: Tensor | None = None) -> Tensor: ...

    def symmetric_product(self, a: Tensor, v: Tensor) -> Tensor: ...

    def cholesky_(self, m: Tensor) -> Tensor: ...

    def chol_solve(self, chol: Tensor, v: Tensor) -> Tensor: ...

    def eigenvector(self, mats: Tensor, valid: Tensor, index: int) -> Tensor: ...

    def solver_threads(self) -> contextlib.AbstractContextManager: ...


@dataclass(frozen=True)
class NCutOptions:
    """How `batched_recursive_ncut` computes, never what: every choice gives the same segments.

    cpu_linalg: "scipy" (default): CPU tensors use SciPy/NumPy's OpenBLAS and LAPACK; "torch":
        torch.linalg, the path every other device takes.
    direct_max_size: regions up to this many tokens use the direct eigensolver, larger ones the
        block inverse iteration; None: the kernels' own cut-off (DIRECT_MAX_SIZE with SciPy's
        one-vector solver, EIGH_MAX_SIZE with torch's full eigh).
    """

    cpu_linalg: Literal["scipy", "torch"] = "scipy"
    direct_max_size: int | None = None

    def __post_init__(self) -> None:
        if self.cpu_linalg not in CPU_LINALGS:
            raise ValueError(
                f"NCutOptions.cpu_linalg must be one of {CPU_LINALGS}, got {self.cpu_linalg!r}"
            )
        if self.direct_max_size is not None and self.direct_max_size < 1:
            raise ValueError(
                f"NCutOptions.direct_max_size must be a positive token count or None, "
                f"got {self.direct_max_size!r}"
            )

    def linalg_for(self, device: torch.device | str) -> Linalg:
        """The kernels for tensors on `device`: SciPy's on the CPU when chosen, torch's otherwise."""
        if torch.device(device).type == "cpu" and self.cpu_linalg == "scipy":
            return ScipyLinalg(_or(self.direct_max_size, DIRECT_MAX_SIZE))
        return TorchLinalg(_or(self.direct_max_size, EIGH_MAX_SIZE))


def _or(value: int | None, default: int) -> int:
    """`value` unless it is None."""
    return default if value is None else value


def default_linalg(device: torch.device | str) -> Linalg:
    """The kernels the default options give tensors on `device`."""
    return NCutOptions().linalg_for(device)


@dataclass(frozen=True)
class TorchLinalg:
    """torch's BLAS and torch.linalg, batched over regions: any device."""

    direct_max_size: int = EIGH_MAX_SIZE

    def lower_gram(self, feats: Tensor, out: Tensor | None = None) -> Tensor:
        """The lower triangle of F F^T for (N, C) rows, in `out` when given -> (N, N); the rest is not set.

        Each row block of GRAM_BLOCK rows is multiplied only with the rows up to its own end,
        which skips nearly half of the products.
        """
        n = feats.shape[0]
        out = feats.new_empty(n, n) if out is None else out
        for lo in range(0, n, GRAM_BLOCK):
            hi = min(lo + GRAM_BLOCK, n)
            out[lo:hi, :hi] = feats[lo:hi] @ feats[:hi].T  # (b, C) x (C, hi) -> (b, hi)
        return out

    def symmetric_product(self, a: Tensor, v: Tensor) -> Tensor:
        """A v for symmetric (R, n, n) A and skinny (R, n, k) v -> (R, n, k)."""
        return a @ v

    def cholesky_(self, m: Tensor) -> Tensor:
        """Cholesky of each (R, n, n) matrix in place, G in M's lower triangle -> success (R,) bool.

        The strict upper triangle is zeroed; failure means M is not positive definite.
        """
        upper = m.transpose(-1, -2)  # column-major view of M^T, which is M up to rounding
        info = torch.empty(m.shape[0], dtype=torch.int32, device=m.device)
        torch.linalg.cholesky_ex(upper, upper=True, out=(upper, info))
        return info == 0

    def chol_solve(self, chol: Tensor, v: Tensor) -> Tensor:
        """(G G^T)^-1 v by two triangular solves: (R, n, n), (R, n, k) -> (R, n, k)."""
        z = torch.linalg.solve_triangular(chol, v, upper=False)
        # G^T x = z as x^T G = z^T: both solves then read G in its own (row-major) layout
        return torch.linalg.solve_triangular(chol, z.mT, upper=False, left=False).mT

    def eigenvector(self, mats: Tensor, valid: Tensor, index: int) -> Tensor:
        """Eigenvector `index` (ascending) of each zero-padded symmetric (R, n, n) matrix, by a batched full eigh -> (R, n).

        The padding must have eigenvalues above the wanted one.
        """
        return torch.linalg.eigh(mats).eigenvectors[..., index]

    def solver_threads(self) -> contextlib.AbstractContextManager:
        """Torch keeps its own threads: nothing to change."""
        return contextlib.nullcontext()


@dataclass(frozen=True)
class ScipyLinalg:
    """SciPy/NumPy's OpenBLAS and LAPACK, one region at a time: CPU tensors only.

    On some CPUs (AMD) SciPy's LAPACK runs `potrf` about twice as fast as the LAPACK torch
    links, factors in place without zeroing the other triangle, and its MRRR solver computes
    one eigenvector without a full eigendecomposition.
    """

    direct_max_size: int = DIRECT_MAX_SIZE

    def lower_gram(self, feats: Tensor, out: Tensor | None = None) -> Tensor:
        """The lower triangle of F F^T for (N, C) rows by BLAS's symmetric rank-k update (syrk) -> (N, N).

        Written in `out` when given; the rest is not set. Dtypes other than float32/64 take
        torch's blocked product.
        """
        if feats.dtype not in (torch.float32, torch.float64):
            return TorchLinalg().lower_gram(feats, out)
        n = feats.shape[0]
        out = feats.new_empty(n, n) if out is None else out
        syrk = blas.ssyrk if feats.dtype == torch.float32 else blas.dsyrk
        x = feats.contiguous().numpy()  # (N, C) row-major: x.T is (C, N) column-major
        c = out.numpy().T  # the upper triangle of column-major C is the lower one of row-major
        result = syrk(1.0, x.T, beta=0.0, c=c, trans=1, lower=0, overwrite_c=True)
        if not np.shares_memory(result, c):  # cannot happen for a contiguous `out`
            c[...] = result
        return out

    def symmetric_product(self, a: Tensor, v: Tensor) -> Tensor:
        """A v for symmetric (R, n, n) A and skinny (R, n, k) v, as (v^T A)^T -> (R, n, k).

        NumPy's OpenBLAS streams a wide right-hand matrix faster than torch's BLAS streams A for
        a skinny product (about 1.2 against 1.4 ms at n = 1024, k = 12, float64).
        """
        vt = v.transpose(-1, -2).contiguous().numpy()  # (R, k, n)
        return torch.from_numpy(np.matmul(vt, a.numpy())).transpose(-1, -2)

    def cholesky_(self, m: Tensor) -> Tensor:
        """In-place LAPACK potrf of each contiguous (n, n) matrix of m -> success (R,) bool.

        LAPACK works on M's own memory (no (R, n, n) copy); the strict upper triangle keeps
        M's entries, which no solve reads.
        """
        if not m.is_contiguous():
            raise ValueError("the CPU Cholesky works in place and needs a contiguous tensor")
        potrf = lapack.dpotrf if m.dtype == torch.float64 else lapack.spotrf
        ok = torch.empty(m.shape[0], dtype=torch.bool)
        for i, mat in enumerate(m.numpy()):
            factor, info = potrf(mat.T, lower=False, overwrite_a=True, clean=False)
            if not np.shares_memory(factor, mat):  # cannot happen for a contiguous tensor
                mat.T[...] = factor
            ok[i] = info == 0
        return ok

    def chol_solve(self, chol: Tensor, v: Tensor) -> Tensor:
        """(G G^T)^-1 v with LAPACK potrs on each region: (R, n, n), (R, n, k) -> (R, n, k)."""
        potrs = lapack.dpotrs if chol.dtype == torch.float64 else lapack.spotrs
        out = np.empty(v.shape, dtype=v.numpy().dtype)
        for i, (mat, rhs) in enumerate(zip(chol.numpy(), v.numpy(), strict=True)):
            x, info = potrs(mat.T, rhs, lower=False)
            if info != 0:
                raise RuntimeError(f"LAPACK potrs failed with info={info}")
            out[i] = x
        return torch.from_numpy(out)

    def eigenvector(self, mats: Tensor, valid: Tensor, index: int) -> Tensor:
        """Eigenvector `index` (ascending) of each region's own (m, m) block of (R, n, n) mats -> (R, n), 0 on padding.

        LAPACK's MRRR solver (SciPy `eigh`, driver evr) reduces the matrix to tridiagonal form
        but computes only the one eigenvector: about 3x cheaper than a full eigh at n = 128 to 256.
        """
        out = torch.zeros_like(mats[..., 0])
        for i, (mat, m) in enumerate(zip(mats.numpy(), valid.sum(dim=-1).tolist(), strict=True)):
            _, vec = scipy.linalg.eigh(
                mat[:m, :m], subset_by_index=[index, index], driver="evr", check_finite=False
            )
            out[i, :m] = torch.from_numpy(vec[:, 0])
        return out

    def solver_threads(self) -> contextlib.AbstractContextManager:
        """Context in which SciPy's and NumPy's BLAS run one thread.

        The solver alternates many short SciPy LAPACK calls with torch operations: the idle
        threads of each library spin-wait and take the cores from the other (on 2 cores, 3x
        slower). Torch keeps its threads for its own operations.
        """
        return blas_controller().limit(limits=1, user_api="blas")


@functools.cache
def blas_controller() -> ThreadpoolController:
    """The BLAS libraries loaded with this module (SciPy's and NumPy's, which the solver calls), found once."""
    return ThreadpoolController()
