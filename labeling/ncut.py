"""Recursive normalized cut (Shi & Malik) on token features, as DiffCut uses it.

For one image with tokens F (N, C), L2-normalised:
    W = F F^T, min-max normalised over the whole matrix, then W ** alpha.
For a region (a set of tokens): A = W restricted to it, d = row sums of A, u = second-smallest
eigenvector of I - D^-1/2 A D^-1/2, y = D^-1/2 u, sign flipped so the largest |y| is positive;
100 thresholds linspace(0.99 min y, 0.99 max y); partition x = y > t; NCut(x) = cut/assoc(x) +
cut/assoc(not x); keep the best. If the best NCut < tau the region splits and both sides recurse
(positive side first), otherwise it is a leaf; a region of <= 1 token is a leaf. Segment ids are
the leaves numbered in depth-first order, positive side first.

`reference_recursive_ncut` is the straightforward algorithm (one region at a time, full `eigh`,
a Python loop over thresholds). `batched_recursive_ncut` gives the same partitions faster:
- every pending region of every image is processed in one round, bucketed by size into
  zero-padded batches (padded rows are decoupled: zero affinity, Laplacian diagonal 3);
- larger regions: block inverse iteration on M = L + 4 q q^T (q = D^1/2 1 / |.|, the
  null vector moved out of the way). M is built and factored in float32; a few plain steps with
  that factor find the low invariant subspace, then each float64 Rayleigh-Ritz check (products
  M v from the float64 affinities) is followed by corrections P^-1 (M x - x theta) of the two
  lowest Ritz vectors x, which join the next basis (a Davidson step); their error shrinks with
  the residual, so the Fiedler vector reaches float64 accuracy. A vector is
  accepted only when its float64 residual is below 1e-8 of the gap to the next Ritz value (else
  a full `eigh` is used). Children start from their parent's Ritz vectors; a slowly converging
  region is refactored at a shift towards lambda_2;
- a region is a leaf without any eigenvector when a float64 Cholesky of M - tau I succeeds,
  since that proves lambda_2 > tau and every NCut is >= lambda_2;
- small regions: a direct solver, LAPACK's MRRR for the one eigenvector on the CPU (up to 320
  tokens), a batched full `eigh` elsewhere (up to 64);
- the 100 thresholds are scored at once: affinities summed per (row, threshold bin), then prefix
  sums over the bins give every cut with no cancellation, O(n^2) instead of O(100 n^2).
On the CPU, F F^T (BLAS syrk), Cholesky, its solves, the skinny products and the direct
eigensolver go through SciPy/NumPy's OpenBLAS (`CPU_SCIPY_LAPACK`); other devices use torch. The
batch's Gram products run first, back to back, on BLAS's own threads; the solver then holds
that BLAS to one thread (its idle threads would spin against torch's). On a GPU the host
waits for the device once per batch of regions and per solver step, never per region or image
(region bookkeeping uses index tensors, the leaves are numbered on the device). The large buffers
live in an `NCutWorkspace`, which a caller keeps across batches so that their memory is
first-touched once. The sign rule and the first-minimum rule make both versions choose alike.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from scipy.linalg import blas, lapack
from threadpoolctl import ThreadpoolController
from torch import Tensor

NUM_THRESHOLDS = 100
THRESHOLD_SCALE = 0.99
DEG_EPS = 1e-12  # degree floor: a token with zero affinity never divides by zero
SIGN_TIE_RTOL = 1e-9  # |y| values this close to the largest count as tied (first index wins)
PAD_EIGENVALUE = 3.0  # padded rows of the Laplacian: above its whole spectrum [0, 2]
DEFLATION_SHIFT = 4.0  # moves the null vector D^1/2 1 above the spectrum before inverting
DIRECT_MAX_SIZE = 320  # regions up to this many tokens use LAPACK's one-vector solver (CPU)
EIGH_MAX_SIZE = 64  # without it (torch.linalg), a batched full eigh up to this many tokens
BLOCK_SIZE = 12  # vectors per region in the block inverse iteration
REFACTOR_STEPS = 8  # a new shifted Cholesky costs about this many inverse-iteration steps
FIRST_STEPS = 3  # inverse-iteration steps before the first convergence check
WARM_STEPS = 2  # the same when every region starts from its parent's Ritz vectors
CPU_SCIPY_LAPACK = True  # False: CPU tensors use torch.linalg like other devices
GRAM_BLOCK = 128  # rows per block of the affinity's F F^T
FACTOR_DTYPE = torch.float32  # M is factored in this precision; residuals stay float64
MIN_SHIFT_GAP = 1e-4  # lambda_2 - sigma kept above this, where float32 solves stay accurate
CORRECTED = 2  # Ritz vectors whose corrections join the basis (the Fiedler vector and the next)
ROW_BIN_MIN_SIZE = 256  # larger regions group the rows by bin before summing the cuts
SIZE_STEP = 64  # larger regions are zero-padded up to a multiple of this to share a batch


def affinity_matrix(features: Tensor, alpha: float = 10.0, out: Tensor | None = None) -> Tensor:
    """W = minmax(F F^T) ** alpha for (N, C) tokens, L2-normalised first; all-equal W -> ones. -> (N, N) float64.

    F F^T is one product per image, so an image gets the same W bit for bit in any batch: float32
    on the CPU (the features come from a 16-bit UNet), float64 on a GPU (free there, and immune to
    TF32 matmul settings); the normalisation and the power run in float64, in place in `out`
    (an (N, N) float64 tensor, allocated when not given).
    """
    return _minmax_power(_mirror_lower(_lower_gram(_unit_rows(features))), alpha, out)


def _unit_rows(features: Tensor) -> Tensor:
    """(N, C) rows L2-normalised in the Gram's precision: float32 on the CPU, float64 on a GPU."""
    dtype = torch.float64 if features.is_cuda else torch.float32
    return F.normalize(features.to(dtype), dim=-1)


def _lower_gram(feats: Tensor, out: Tensor | None = None) -> Tensor:
    """The lower triangle of F F^T for (N, C) rows, in `out` when given -> (N, N); the rest is not set.

    On the CPU, BLAS's symmetric rank-k update (`syrk`, through SciPy) computes it; elsewhere each
    row block of GRAM_BLOCK rows is multiplied only with the rows up to its own end. Either way
    nearly half of the products are skipped.
    """
    n = feats.shape[0]
    out = feats.new_empty(n, n) if out is None else out
    if _scipy_lapack(feats) and feats.dtype in (torch.float32, torch.float64):
        syrk = blas.ssyrk if feats.dtype == torch.float32 else blas.dsyrk
        x = feats.contiguous().numpy()  # (N, C) row-major: x.T is (C, N) column-major
        c = out.numpy().T  # the upper triangle of column-major C is the lower one of row-major
        result = syrk(1.0, x.T, beta=0.0, c=c, trans=1, lower=0, overwrite_c=True)
        if not np.shares_memory(result, c):  # cannot happen for a contiguous `out`
            c[...] = result
        return out
    for lo in range(0, n, GRAM_BLOCK):
        hi = min(lo + GRAM_BLOCK, n)
        out[lo:hi, :hi] = feats[lo:hi] @ feats[:hi].T  # (b, C) x (C, hi) -> (b, hi)
    return out


def _minmax_power(sim: Tensor, alpha: float, out: Tensor | None = None) -> Tensor:
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


def _mirror_lower(x: Tensor) -> Tensor:
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


def flip_sign(y: Tensor, valid: Tensor | None = None) -> Tensor:
    """y * sign(y_i) with i the first index whose |y_i| ties (to 1e-9) with max |y| (rows of y)."""
    mag = y.abs() if valid is None else torch.where(valid, y.abs(), torch.zeros_like(y))
    top = mag.amax(dim=-1, keepdim=True)
    first = (mag >= top * (1 - SIGN_TIE_RTOL)).to(torch.uint8).argmax(dim=-1, keepdim=True)
    sign = torch.where(y.gather(-1, first) < 0, -1.0, 1.0).to(y.dtype)
    return y * sign


def thresholds(lo: Tensor, hi: Tensor, steps: int = NUM_THRESHOLDS) -> Tensor:
    """Rows of linspace(lo, hi, steps) for (R,) bounds -> (R, steps); exact at both ends."""
    step = ((hi - lo) / (steps - 1))[:, None]
    i = torch.arange(steps, device=lo.device, dtype=lo.dtype)[None, :]
    low_half = lo[:, None] + i * step
    high_half = hi[:, None] - (steps - 1 - i) * step
    return torch.where(i < steps // 2, low_half, high_half)


def _labels_from_leaves(leaves: list[tuple[tuple[int, ...], Tensor]], n: int) -> Tensor:
    """Number leaves in depth-first order (path 0 = positive side) -> (n,) segment ids.

    The ids are written on the leaves' device, one fill per leaf: no token index visits the host.
    """
    device = leaves[0][1].device
    labels = torch.empty(n, dtype=torch.long, device=device)
    for seg, (_, idx) in enumerate(sorted(leaves, key=lambda leaf: leaf[0])):
        labels.index_fill_(0, idx, seg)
    return labels


def reference_recursive_ncut(features: Tensor, tau: float = 0.5, alpha: float = 10.0) -> Tensor:
    """Recursive 2-way NCut of (N, C) tokens, one region at a time with a full eigh -> (N,) ids."""
    w = affinity_matrix(features, alpha)
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
    return _labels_from_leaves(leaves, n).to(features.device)


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


def _normalized_laplacian(
    a: Tensor, valid: Tensor, dtype: torch.dtype | None = None, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """L = I - D^-1/2 A D^-1/2 of zero-padded (R, n, n) affinities, padded diagonal 3 -> (L, d, D^-1/2).

    L is built in `dtype` (default: A's; `out`'s when given, L is then written there); the
    degrees d and D^-1/2 keep A's precision.
    """
    d = torch.where(valid, a.sum(dim=-1).clamp_min(DEG_EPS), torch.zeros_like(a[..., 0]))
    # (R, n), 0 on padding
    s = torch.where(valid, d.clamp_min(DEG_EPS).rsqrt(), torch.zeros_like(d))
    dtype = out.dtype if out is not None else dtype or a.dtype
    sd = s.to(dtype)
    if out is not None:
        lap = out.copy_(a).mul_(sd[:, :, None])
    else:
        lap = a * sd[:, :, None] if dtype == a.dtype else a.to(dtype).mul_(sd[:, :, None])
    lap.mul_(-sd[:, None, :])  # -D^-1/2 A D^-1/2, (R, n, n)
    lap.diagonal(dim1=1, dim2=2).add_(torch.where(valid, 1.0, PAD_EIGENVALUE).to(dtype))
    return lap, d, s


def _project_out(v: Tensor, q: Tensor) -> Tensor:
    """v - q (q^T v) for a unit vector q per region: (R, n, k), (R, n) -> (R, n, k)."""
    return v - q[:, :, None] * (q[:, None, :] @ v)


def _deflated(
    a: Tensor, valid: Tensor, dtype: torch.dtype | None = None, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """M = L + 4 q q^T (q = D^1/2 1 / |.|, the null vector of L) of (R, n, n) affinities -> (M, d, D^-1/2, q).

    M is built in `dtype` (default: A's), in `out` when given; d, D^-1/2 and q keep A's precision.
    """
    lap, d, s = _normalized_laplacian(a, valid, dtype, out)
    q = torch.where(valid, d.sqrt(), 0.0)
    q = q / q.norm(dim=-1, keepdim=True)
    qd = q.to(lap.dtype)
    return lap.baddbmm_(qd[:, :, None], qd[:, None, :], alpha=DEFLATION_SHIFT), d, s, q


def _apply_deflated(a: Tensor, s: Tensor, q: Tensor, v: Tensor) -> Tensor:
    """M v from the affinities, without M: v - D^-1/2 A D^-1/2 v + 4 q q^T v, padded rows 3 v -> (R, n, k)."""
    diag = torch.where(s > 0, 1.0, PAD_EIGENVALUE).to(v.dtype)[:, :, None]  # s is 0 only on padding
    av = _symmetric_product(a, s[:, :, None] * v)  # (R, n, n) x (R, n, k) -> (R, n, k)
    mv = diag * v - s[:, :, None] * av
    return mv.baddbmm_(q[:, :, None], q[:, None, :] @ v, alpha=DEFLATION_SHIFT)


def _symmetric_product(a: Tensor, v: Tensor) -> Tensor:
    """A v for symmetric (R, n, n) A and skinny (R, n, k) v -> (R, n, k).

    On the CPU (SciPy path) it is computed as (v^T A)^T with NumPy's OpenBLAS, whose kernels
    stream a wide right-hand matrix faster than torch's BLAS streams A for a skinny product
    (about 1.2 against 1.4 ms at n = 1024, k = 12, float64).
    """
    if not _scipy_lapack(a):
        return a @ v
    vt = v.transpose(-1, -2).contiguous().numpy()  # (R, k, n)
    return torch.from_numpy(np.matmul(vt, a.numpy())).transpose(-1, -2)


def _rayleigh_ritz(mv: Tensor, v: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k lowest Ritz pairs of M on span(v) (orthonormal columns) given mv = M v -> (values (R, k), vectors x (R, n, k), M x)."""
    theta, s = torch.linalg.eigh(v.transpose(-1, -2) @ mv)  # ascending, (R, m), (R, m, m)
    s = s[..., :k]
    return theta[:, :k], v @ s, mv @ s


def _factor(m: Tensor, sigma: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cholesky G G^T of M - sigma I, in place: M is overwritten -> (G in M's lower triangle, success).

    Failure means sigma >= the smallest eigenvalue of M. LAPACK works on M's own memory (no
    (R, n, n) copy): the upper factor G^T of M's column-major view is G stored row-major, the
    layout in which both triangular solves run fastest. The strict upper triangle keeps M's
    entries on the CPU path (no solve reads it) and is zeroed by torch on other devices.
    """
    if sigma is not None:
        m.diagonal(dim1=-2, dim2=-1).sub_(sigma[:, None])
    if _scipy_lapack(m):
        return m, _cpu_factor(m)
    upper = m.transpose(-1, -2)  # column-major view of M^T, which is M up to rounding
    info = torch.empty(m.shape[0], dtype=torch.int32, device=m.device)
    torch.linalg.cholesky_ex(upper, upper=True, out=(upper, info))
    return m, info == 0


def _chol_solve(chol: Tensor, v: Tensor) -> Tensor:
    """(G G^T)^-1 v by two triangular solves: (R, n, n), (R, n, k) -> (R, n, k)."""
    if _scipy_lapack(chol):
        return _cpu_chol_solve(chol, v)
    z = torch.linalg.solve_triangular(chol, v, upper=False)
    # G^T x = z as x^T G = z^T: both solves then read G in its own (row-major) layout
    return torch.linalg.solve_triangular(chol, z.mT, upper=False, left=False).mT


# On the CPU, Cholesky and its solves go through SciPy's LAPACK one region at a time: `potrf`
# factors in place without zeroing the other triangle, and on some CPUs (AMD) it runs about twice
# as fast as the LAPACK torch links. Row-major M seen column-major is M^T = M, so LAPACK's upper
# factor U (M = U^T U) lands row-major as the lower G = U^T, the layout the torch path uses too.


def _scipy_lapack(x: Tensor) -> bool:
    """Whether x's linear algebra goes through SciPy's LAPACK (CPU tensors, unless switched off)."""
    return x.device.type == "cpu" and CPU_SCIPY_LAPACK


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """The BLAS libraries loaded with this module (SciPy's and NumPy's, which the solver calls), found once."""
    return ThreadpoolController()


def _single_threaded_scipy(x: Tensor) -> contextlib.AbstractContextManager:
    """Context in which SciPy's BLAS runs one thread, when x's linear algebra goes through SciPy.

    The solver alternates many short SciPy LAPACK calls with torch operations: the idle threads
    of each library spin-wait and take the cores from the other (on 2 cores, 3x slower). Torch
    keeps its threads for its own operations.
    """
    if not _scipy_lapack(x):
        return contextlib.nullcontext()
    return _blas_controller().limit(limits=1, user_api="blas")


def _cpu_factor(m: Tensor) -> Tensor:
    """In-place LAPACK potrf of each contiguous (n, n) CPU matrix of m -> success (R,) bool."""
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


def _cpu_chol_solve(chol: Tensor, v: Tensor) -> Tensor:
    """(G G^T)^-1 v with LAPACK potrs on each region: (R, n, n), (R, n, k) -> (R, n, k)."""
    potrs = lapack.dpotrs if chol.dtype == torch.float64 else lapack.spotrs
    out = np.empty(v.shape, dtype=v.numpy().dtype)
    for i, (mat, rhs) in enumerate(zip(chol.numpy(), v.numpy(), strict=True)):
        x, info = potrs(mat.T, rhs, lower=False)
        if info != 0:
            raise RuntimeError(f"LAPACK potrs failed with info={info}")
        out[i] = x
    return torch.from_numpy(out)


class NCutWorkspace:
    """Memory for the large (B, N, N) and (R, n, n) arrays of `batched_recursive_ncut`, one buffer per role.

    On the CPU a fresh array of this size is paid for again in page faults when it is first
    written, about as much time as a pass of arithmetic over it. One buffer per role, grown to
    the largest batch seen, is reused by every batch of a call and, when the caller keeps the
    workspace, by every later call.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        """An uninitialised `shape` tensor in `role`'s buffer (valid until the next get of the role)."""
        numel = math.prod(shape)
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[role] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[idx] without a copy when idx selects every row in order."""
    return x if idx.numel() == x.shape[0] else x[idx]


def _inverse_iteration(
    a: Tensor,
    valid: Tensor,
    start: Tensor,
    tau: float,
    steps: int,
    max_steps: int,
    rtol: float,
    atol: float,
    workspace: NCutWorkspace,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Smallest eigenvectors of M = L + 4 q q^T by block inverse iteration -> (u, converged, leaf, block, d, D^-1/2).

    M has the spectrum of L with the null eigenvalue (vector q = D^1/2 1 / |.|) moved to 4, so its
    smallest eigenvector is the Fiedler vector u2. M is built and factored in float32 (half the
    memory traffic of float64, and LAPACK runs about twice as fast), and `steps` plain inverse
    iteration steps with that factor P find the low invariant subspace to float32 accuracy. Each
    further step is a float64 Rayleigh-Ritz check on the basis, products M v taken from the
    float64 affinities (and kept for the Ritz vectors), followed by the corrections
    P^-1 (M x - x theta) of the lowest Ritz vectors, which join the Ritz vectors in the next
    basis: with an exact P that span holds an inverse iteration step, and with float32's P the
    error shrinks with the residual, so the Fiedler vector converges to float64 accuracy (the
    residual test is in float64).
    A region whose predicted convergence is slow is refactored at a shift sigma < lambda_2 (a
    successful Cholesky of M - sigma I proves sigma < lambda_2); `leaf` marks regions proven to
    have lambda_2 > tau by a float64 Cholesky of M - tau I: every NCut is >= lambda_2, so such a
    region cannot split. `block` holds the final Ritz vectors (ascending), a good start for the
    regions' children.
    """
    out = workspace.get("factor", a.shape, FACTOR_DTYPE, a.device)
    m, d, s, q = _deflated(a, valid, FACTOR_DTYPE, out)
    chol, ok = _factor(m)  # m is consumed
    u = torch.zeros_like(q)
    converged, leaf, tried = torch.zeros_like(ok), torch.zeros_like(ok), torch.zeros_like(ok)
    work = ok.nonzero()[:, 0]  # a failed factorisation (not positive definite) goes to the fallback
    aw, vaw, cw, rw, qw, vw = (_rows(x, work) for x in (a, valid, chol, s, q, start))  # rw: D^-1/2
    sw = torch.zeros_like(qw[:, 0])  # current shift of each region's factor
    low, qlow = cw.dtype, qw.to(cw.dtype)
    v = torch.linalg.qr(_project_out(vw.to(low), qlow)).Q  # (W, n, k)
    for _ in range(steps):
        v = torch.linalg.qr(_project_out(_chol_solve(cw, v), qlow)).Q
    vw = torch.linalg.qr(_project_out(v.to(a.dtype), qw)).Q
    block = start.clone()
    used, k = steps, start.shape[-1]
    known = None  # M times the first k columns of the basis vw, when known
    while work.numel():
        mv = _apply_deflated(aw, rw, qw, vw if known is None else vw[..., k:])
        mv = mv if known is None else torch.cat([known, mv], dim=-1)
        theta, ritz, known = _rayleigh_ritz(mv, vw, k)
        resid = known - ritz * theta[:, None, :]  # (W, n, k)
        first = resid[..., 0].norm(dim=-1)  # theta[:, 0] >= lambda_2
        target = torch.clamp(rtol * (theta[:, 1] - theta[:, 0]), min=atol)
        unsettled = ~converged[work]  # an accepted vector is kept; until compaction it rides along
        done = (first <= target) | ~unsettled
        rows = work[unsettled]
        u[rows], block[rows] = ritz[unsettled, :, 0], ritz[unsettled]
        converged[rows] = done[unsettled]
        leaf[rows] |= done[unsettled] & (theta[unsettled, 0] - first[unsettled] > tau * (1 + 1e-9))
        test = ~done & (theta[:, 0] > tau) & ~tried[work]
        if test.any():  # one float64 Cholesky of M - tau I decides lambda_2 > tau
            mt = _deflated(aw[test], vaw[test])[0]
            _, proven = _factor(mt, torch.full_like(theta[test, 0], tau * (1 + 1e-9)))
            tried[work[test]] = True
            leaf[work[test.nonzero()[proven, 0]]] = True
        live = ~done & ~leaf[work]
        if used >= max_steps or not live.any():
            break
        # the error shrinks by about (lambda_2 - sigma) / (lambda_{k+2} - sigma) per step
        rate = ((theta[:, 0] - sw) / (theta[:, -1] - sw)).clamp(1e-300, 1 - 1e-12)
        need = torch.log(target / first) / torch.log(rate)
        slow = live & (need > REFACTOR_STEPS)
        if slow.any():  # refactor at sigma = theta_0 - |r|, kept where float32 solves stay accurate
            shift = (theta[slow, 0] - first[slow].clamp_min(MIN_SHIFT_GAP)).clamp_min(0.0)
            factor, better = _factor(_deflated(aw[slow], vaw[slow], low)[0], shift)
            rows = slow.nonzero()[better, 0]
            cw[rows], sw[rows] = factor[better], shift[better]
        if 2 * int(live.sum()) <= len(work):  # compact once at most half the regions still iterate
            work, aw, vaw, cw, rw, qw, sw = (x[live] for x in (work, aw, vaw, cw, rw, qw, sw))
            ritz, resid, known = ritz[live], resid[live], known[live]
        # the next basis: the Ritz vectors and the corrections P^-1 (M x - x theta) of the first
        # CORRECTED ones, made orthogonal to them (twice, for full accuracy) and to q; with an
        # exact P this span holds the inverse iteration step x - M^-1 (M x - x theta) = theta
        # M^-1 x. Correcting all k converges no faster: the others only need float32 accuracy.
        extra = _project_out(_chol_solve(cw, resid[..., :CORRECTED].to(low)).to(a.dtype), qw)
        for _ in range(2):
            extra = extra - ritz @ (ritz.transpose(-1, -2) @ extra)
        extra = torch.linalg.qr(extra).Q
        vw = torch.cat([ritz, extra], dim=-1)
        if (ritz.transpose(-1, -2) @ extra).abs().amax() > 1e-8:  # a correction inside span(x)
            vw, known = torch.linalg.qr(vw).Q, None  # any orthonormal basis; all of M v anew
        used += 1
    return u, converged, leaf, block, d, s


def fiedler_vectors(
    a: Tensor,
    valid: Tensor,
    start: Tensor | None = None,
    tau: float = math.inf,
    first_steps: int = FIRST_STEPS,
    max_steps: int = 40,
    rtol: float = 1e-8,
    atol: float = 1e-13,
    workspace: NCutWorkspace | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """y = D^-1/2 u2 of (I - D^-1/2 A D^-1/2) for zero-padded (R, n, n) regions -> (y, d, leaf, block).

    With `start` (R, n, k) the iterative solver runs (full eigh where it does not converge),
    `leaf` marks regions proven to have lambda_2 > tau and `block` (R, n, k) holds the final Ritz
    vectors; without it every region uses a full eigh (block None). y (R, n) is sign-flipped so its
    largest |y| is positive; d (R, n) are the degrees. `workspace` lends the (R, n, n) temporaries.
    """
    workspace = NCutWorkspace() if workspace is None else workspace
    leaf, block = torch.zeros_like(valid[:, 0]), None
    if start is None:
        out = workspace.get("laplacian", a.shape, a.dtype, a.device)
        lap, d, s = _normalized_laplacian(a, valid, out=out)
        u = _eigenvector(lap, valid, 1)  # padded eigenvalues sit above, at 3
    else:
        u, converged, leaf, block, d, s = _inverse_iteration(
            a, valid, start, tau, first_steps, max_steps, rtol, atol, workspace
        )
        redo = (~converged & ~leaf).nonzero()[:, 0]
        if redo.numel():  # q's eigenvalue sits above, at 4: the smallest is lambda_2
            m = _deflated(a[redo], valid[redo])[0]
            u[redo] = _eigenvector(m, valid[redo], 0)
    return flip_sign(s * u, valid), d, leaf, block


def _eigenvector(mats: Tensor, valid: Tensor, index: int) -> Tensor:
    """Eigenvector `index` (ascending) of each zero-padded symmetric (R, n, n) matrix -> (R, n).

    The padding must have eigenvalues above the wanted one. On the CPU each region's own (m, m)
    block goes to LAPACK's MRRR solver (SciPy `eigh`, driver evr), which reduces the matrix to
    tridiagonal form but computes only the one eigenvector: about 3x cheaper than a full `eigh`
    at n = 128 to 256. Other devices use a batched full `eigh`.
    """
    if not _scipy_lapack(mats):
        return torch.linalg.eigh(mats).eigenvectors[..., index]
    out = torch.zeros_like(mats[..., 0])
    for i, (mat, m) in enumerate(zip(mats.numpy(), valid.sum(dim=-1).tolist(), strict=True)):
        _, vec = scipy.linalg.eigh(
            mat[:m, :m], subset_by_index=[index, index], driver="evr", check_finite=False
        )
        out[i, :m] = torch.from_numpy(vec[:, 0])
    return out


def best_split(
    y: Tensor, a: Tensor, d: Tensor, valid: Tensor, workspace: NCutWorkspace | None = None
) -> tuple[Tensor, Tensor]:
    """min over the 100 thresholds of cut/assoc(y>t) + cut/assoc(y<=t) -> (best NCut (R,), y > t* (R, n)).

    Token i lies above threshold j exactly when j < bin_i, bin_i = #{j : t_j < y_i} (0..100).
    The affinities are first summed per (row, column bin), one pass over A; prefix sums over the
    column bins then give each row's weight to {bin <= j}, and cut_j adds those of the rows in
    bins > j: for larger regions after grouping the rows by bin too (suffix sums over 102 row
    bins instead of masked sums over n rows). Every cut is a sum of non-negative terms (no
    cancellation; an empty bin adds exact zeros, so thresholds that cut the same sets get the
    same value), and the cost is O(n^2 + 100 n) instead of O(100 n^2).
    """
    r, n = y.shape
    steps = NUM_THRESHOLDS
    inf = torch.full_like(y[:, 0], float("inf"))
    lo = torch.where(valid, y, inf[:, None]).amin(dim=-1)
    hi = torch.where(valid, y, -inf[:, None]).amax(dim=-1)
    t = thresholds(THRESHOLD_SCALE * lo, THRESHOLD_SCALE * hi)  # (R, 100)
    # t is sorted (each half is monotone, and the halves meet in order even after rounding), so a
    # binary search counts #{j : t_j < y_i} exactly
    bins = torch.searchsorted(t, y.contiguous())  # (R, n) in 0..100
    bins = torch.where(valid, bins, steps + 1)  # padding: a bin of its own, never counted
    workspace = NCutWorkspace() if workspace is None else workspace
    # weight from each row to each column bin: (R, n, n) -> (R, n, 102)
    by_bin = workspace.get("bins", (r, n, steps + 2), a.dtype, a.device).zero_()
    by_bin.scatter_add_(2, bins[:, None, :].expand(r, n, n), a)
    if n > ROW_BIN_MIN_SIZE:  # weight from each row bin to each column bin: (R, 102, 102)
        pairs = a.new_zeros(r, steps + 2, steps + 2)
        pairs.scatter_add_(1, bins[:, :, None].expand(r, n, steps + 2), by_bin)
        lower = pairs[:, :, :steps].cumsum(dim=2)  # (R, 102, 100): to column bins <= j
        from_above = lower.flip(1).cumsum(dim=1).flip(1)  # (R, 102, 100): from row bins >= b
        cut = from_above[:, 1 : steps + 1].diagonal(dim1=1, dim2=2)  # (R, 100): row bins > j
    else:
        lower = by_bin[..., :steps].cumsum_(dim=-1)  # (R, n, 100): weight to {k : bin_k <= j}
        above = bins[:, :, None] > torch.arange(steps, device=y.device)  # (R, n, 100)
        cut = lower.mul_(above).sum(dim=1)  # (R, 100); padding rows (bin 101) carry no weight
    deg = a.new_zeros(r, steps + 2).scatter_add_(1, bins, d)[:, : steps + 1]  # (R, 101)
    count = bins.new_zeros(r, steps + 2).scatter_add_(1, bins, valid.to(bins.dtype))[:, : steps + 1]
    assoc_rest = deg.cumsum(dim=-1)[:, :steps]  # (R, 100): degree of {bin <= j}
    assoc = deg.flip(-1).cumsum(dim=-1).flip(-1)[:, 1:]  # degree of {bin > j}, no subtraction
    n_rest = count.cumsum(dim=-1)[:, :steps]
    n_above = valid.sum(dim=-1, keepdim=True) - n_rest  # token counts are exact
    ncut = cut / assoc + cut / assoc_rest
    usable = (n_above > 0) & (n_rest > 0) & ~ncut.isnan()
    ncut = torch.where(usable, ncut, inf[:, None])
    best_t = ncut.argmin(dim=-1, keepdim=True)  # first minimum, like the reference's strict "<"
    positive = (bins > best_t) & valid
    return ncut.gather(1, best_t)[:, 0], positive


def _bucket_size(n: int) -> int:
    """Padded size for a region of n tokens: the next multiple of SIZE_STEP."""
    return -(-n // SIZE_STEP) * SIZE_STEP


def _split_regions(w: Tensor, regions: list, start: Tensor, tau: float, workspace: NCutWorkspace):
    """Best 2-way cut of each (image, path, token ids, warm start) region -> (best NCut, positive, block)."""
    r, n, full = len(regions), max(len(reg[2]) for reg in regions), w.shape[-1]
    valid = torch.zeros(r, n, dtype=torch.bool, device=w.device)
    images = [reg[0] for reg in regions]
    if n == full and images == list(range(w.shape[0])):  # every whole image: the first level
        a = w
    elif n == full:
        a = w.index_select(0, torch.tensor(images, device=w.device))
    else:
        a = workspace.get("affinity", (r, n, n), w.dtype, w.device)
    iterative = n > (DIRECT_MAX_SIZE if _scipy_lapack(w) else EIGH_MAX_SIZE)
    block = None  # (R, n, k) starts of the iterative solver; the direct solver needs none
    if iterative:
        block = torch.zeros(r, n, start.shape[1], dtype=w.dtype, device=w.device)
    for i, (img, _, idx, warm) in enumerate(regions):
        m = len(idx)
        valid[i, :m] = True
        if iterative:
            block[i, :m] = start[idx]
            if warm is not None:  # the parent's Ritz vectors on these tokens, plus one fixed column
                block[i, :m, 1:] = warm
        if n != full:  # W[idx][:, idx]: whole rows first, then the columns straight into A
            rows = workspace.get("rows", (m, full), w.dtype, w.device)
            torch.index_select(w[img], 0, idx, out=rows)
            torch.gather(rows, 1, idx[None, :].expand(m, m), out=a[i, :m, :m])
            a[i, :m, m:] = 0.0
            a[i, m:] = 0.0
    warm_all = all(reg[3] is not None for reg in regions)
    steps = WARM_STEPS if warm_all else FIRST_STEPS
    y, d, leaf, block = fiedler_vectors(a, valid, block, tau, steps, workspace=workspace)
    best = torch.full_like(y[:, 0], float("inf"))
    positive = torch.zeros_like(valid)
    todo = (~leaf).nonzero()[:, 0]
    if todo.numel():
        subset = (_rows(x, todo) for x in (y, a, d, valid))
        best[todo], positive[todo] = best_split(*subset, workspace=workspace)
    return best, positive, block


def batched_recursive_ncut(
    features: Tensor,
    tau: float = 0.5,
    alpha: float = 10.0,
    max_batch_elements: int = 1 << 25,
    workspace: NCutWorkspace | None = None,
) -> Tensor:
    """Recursive NCut of (B, N, C) tokens, all pending regions of all images at once -> (B, N) ids.

    `workspace` keeps the large buffers between calls (pass the same one for every batch of a
    stream: the memory is then first touched once, not once per batch); a fresh one by default.
    """
    if features.ndim != 3:
        raise ValueError(
            f"batched_recursive_ncut expects (B, N, C) features, got shape {tuple(features.shape)}"
        )
    b, n, _ = features.shape
    workspace = NCutWorkspace() if workspace is None else workspace
    w = workspace.get("affinities", (b, n, n), torch.float64, features.device)
    grams = None
    for i, f in enumerate(features):  # per image, as affinity_matrix: same bits in any batch
        unit = _unit_rows(f)
        if grams is None:
            grams = workspace.get("grams", (b, n, n), unit.dtype, unit.device)
        _lower_gram(unit, out=grams[i])  # back to back, with as many BLAS threads as it has
    with _single_threaded_scipy(w):
        for i in range(b):
            _minmax_power(_mirror_lower(grams[i]), alpha, out=w[i])
        return _recursive_splits(w, tau, max_batch_elements, workspace).to(features.device)


def _recursive_splits(
    w: Tensor, tau: float, max_batch_elements: int, workspace: NCutWorkspace
) -> Tensor:
    """The rounds of `batched_recursive_ncut` on (B, N, N) affinities -> (B, N) ids."""
    b, n, _ = w.shape
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(n, BLOCK_SIZE, generator=gen, dtype=w.dtype).to(w.device)  # fixed per token
    leaves: list[list] = [[] for _ in range(b)]
    pending = [(i, (), torch.arange(n, device=w.device), None) for i in range(b)]
    while pending:  # one round = every pending region of every image, bucketed by size
        buckets: dict[int, list] = {}
        for region in pending:
            if len(region[2]) <= 1:
                leaves[region[0]].append(region[1:3])
            else:
                buckets.setdefault(_bucket_size(len(region[2])), []).append(region)
        pending = []
        for size, regions in sorted(buckets.items()):
            chunk = max(1, max_batch_elements // (size * size))
            for lo in range(0, len(regions), chunk):
                group = regions[lo : lo + chunk]
                best, positive, block = _split_regions(w, group, start, tau, workspace)
                pending += _children(group, best < tau, positive, block, leaves)
    return torch.stack([_labels_from_leaves(leaves[i], n) for i in range(b)])


def _children(
    group: list, split: Tensor, positive: Tensor, block: Tensor | None, leaves: list[list]
) -> list:
    """The two sides of each splitting region of `group`, as new regions; the others join `leaves`.

    One host wait for the whole group: which regions split and the size c of each positive
    side. A stable sort of the (R, n) tokens by side lists the positive side first, each side in
    token order (what a boolean mask selects), so the children's token ids and warm starts are
    gathered with index tensors and never visit the host.
    """
    sizes = torch.where(split, positive.sum(dim=1), -1).tolist()  # (R,), -1: a leaf
    order = None  # (R, n): positive side, negative side, then padding (positions >= m)
    if max(sizes) >= 0:
        order = torch.argsort((~positive).to(torch.uint8), dim=1, stable=True)
    children = []
    for i, ((img, path, idx, _), c) in enumerate(zip(group, sizes, strict=True)):
        if c < 0:
            leaves[img].append((path, idx))
            continue
        m = len(idx)
        warm = None if block is None else block[i, :m, 1:]
        for side, rows in ((0, order[i, :c]), (1, order[i, c:m])):
            children.append((img, (*path, side), idx[rows], None if warm is None else warm[rows]))
    return children


def recursive_ncut(features: Tensor, tau: float = 0.5, alpha: float = 10.0) -> Tensor:
    """Recursive NCut of one image's (N, C) tokens -> (N,) segment ids 0..S-1 (depth-first order)."""
    if features.ndim != 2:
        raise ValueError(
            f"recursive_ncut expects (N, C) features, got shape {tuple(features.shape)}"
        )
    return batched_recursive_ncut(features[None], tau=tau, alpha=alpha)[0]
