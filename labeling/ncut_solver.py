"""The Fiedler vectors of many zero-padded regions at once: block inverse iteration with Davidson steps.

For (R, n, n) affinities A (zero-padded; `valid` (R, n) marks the real tokens) the solver finds
y = D^-1/2 u2, u2 the second-smallest eigenvector of L = I - D^-1/2 A D^-1/2. Padded rows are
decoupled: zero affinity, Laplacian diagonal PAD_EIGENVALUE, above L's whole spectrum [0, 2].
Larger regions run a block inverse iteration on M = L + 4 q q^T (q = D^1/2 1 / |.|, the null
vector moved out of the way): M is built and factored in float32; a few plain steps with that
factor find the low invariant subspace, then each float64 Rayleigh-Ritz check is followed by
corrections of the two lowest Ritz vectors (a Davidson step), so the Fiedler vector reaches
float64 accuracy. A vector is accepted only when its float64 residual is below 1e-8 of the gap
to the next Ritz value; children start from their parent's Ritz vectors; a slowly converging
region is refactored at a shift towards lambda_2. A region is a leaf without any eigenvector when
a float64 Cholesky of M - tau I succeeds, since that proves lambda_2 > tau and every NCut is
>= lambda_2. Small regions, and any region that does not converge, use the direct eigensolver.
The platform's kernels come in as a `Linalg` (labeling.ncut_lapack); the large temporaries live
in an `NCutWorkspace`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from labeling.ncut_lapack import Linalg, default_linalg
from labeling.ncut_reference import DEG_EPS, flip_sign

PAD_EIGENVALUE = 3.0  # padded rows of the Laplacian: above its whole spectrum [0, 2]
DEFLATION_SHIFT = 4.0  # moves the null vector D^1/2 1 above the spectrum before inverting
BLOCK_SIZE = 12  # vectors per region in the block inverse iteration
REFACTOR_STEPS = 8  # a new shifted Cholesky costs about this many inverse-iteration steps
FIRST_STEPS = 3  # inverse-iteration steps before the first convergence check
WARM_STEPS = 2  # the same when every region starts from its parent's Ritz vectors
FACTOR_DTYPE = torch.float32  # M is factored in this precision; residuals stay float64
MIN_SHIFT_GAP = 1e-4  # lambda_2 - sigma kept above this, where float32 solves stay accurate
CORRECTED = 2  # Ritz vectors whose corrections join the basis (the Fiedler vector and the next)
LEAF_MARGIN = 1 + 1e-9  # lambda_2 must exceed tau by this factor to prove a leaf


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


def select_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[idx] without a copy when idx selects every row in order."""
    return x if idx.numel() == x.shape[0] else x[idx]


def normalized_laplacian(
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


def deflated(
    a: Tensor, valid: Tensor, dtype: torch.dtype | None = None, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """M = L + 4 q q^T (q = D^1/2 1 / |.|, the null vector of L) of (R, n, n) affinities -> (M, d, D^-1/2, q).

    M is built in `dtype` (default: A's), in `out` when given; d, D^-1/2 and q keep A's precision.
    """
    lap, d, s = normalized_laplacian(a, valid, dtype, out)
    q = torch.where(valid, d.sqrt(), 0.0)
    q = q / q.norm(dim=-1, keepdim=True)
    qd = q.to(lap.dtype)
    return lap.baddbmm_(qd[:, :, None], qd[:, None, :], alpha=DEFLATION_SHIFT), d, s, q


def apply_deflated(a: Tensor, s: Tensor, q: Tensor, v: Tensor, linalg: Linalg) -> Tensor:
    """M v from the affinities, without M: v - D^-1/2 A D^-1/2 v + 4 q q^T v, padded rows 3 v -> (R, n, k)."""
    diag = torch.where(s > 0, 1.0, PAD_EIGENVALUE).to(v.dtype)[:, :, None]  # s is 0 only on padding
    av = linalg.symmetric_product(a, s[:, :, None] * v)  # (R, n, n) x (R, n, k) -> (R, n, k)
    mv = diag * v - s[:, :, None] * av
    return mv.baddbmm_(q[:, :, None], q[:, None, :] @ v, alpha=DEFLATION_SHIFT)


def _rayleigh_ritz(mv: Tensor, v: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k lowest Ritz pairs of M on span(v) (orthonormal columns) given mv = M v -> (values (R, k), vectors x (R, n, k), M x)."""
    theta, s = torch.linalg.eigh(v.transpose(-1, -2) @ mv)  # ascending, (R, m), (R, m, m)
    s = s[..., :k]
    return theta[:, :k], v @ s, mv @ s


def factor(m: Tensor, sigma: Tensor | None, linalg: Linalg) -> tuple[Tensor, Tensor]:
    """Cholesky G G^T of M - sigma I, in place: M is overwritten -> (G in M's lower triangle, success).

    Failure means sigma >= the smallest eigenvalue of M.
    """
    if sigma is not None:
        m.diagonal(dim1=-2, dim2=-1).sub_(sigma[:, None])
    return m, linalg.cholesky_(m)


@dataclass
class _Active:
    """The regions still iterating: their rows in the batch and their per-region tensors."""

    rows: Tensor  # (W,) index of each region in the batch
    a: Tensor  # (W, n, n) float64 affinities
    valid: Tensor  # (W, n)
    chol: Tensor  # (W, n, n) FACTOR_DTYPE Cholesky factor of M - shift I
    s: Tensor  # (W, n) D^-1/2
    q: Tensor  # (W, n) unit null vector of L
    shift: Tensor  # (W,) shift of each factor

    def keep(self, mask: Tensor) -> _Active:
        """The regions where `mask` (W,) holds."""
        return _Active(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})


@dataclass
class _Outcome:
    """What the iteration has found for every region of the batch (R rows)."""

    u: Tensor  # (R, n) accepted (or latest) Fiedler vector of M
    converged: Tensor  # (R,) the residual test passed
    leaf: Tensor  # (R,) proven lambda_2 > tau
    tried: Tensor  # (R,) the float64 Cholesky of M - tau I was attempted
    block: Tensor  # (R, n, k) latest Ritz vectors


class _Ritz(NamedTuple):
    """A Rayleigh-Ritz check of the active regions' basis."""

    theta: Tensor  # (W, k) ascending Ritz values
    vectors: Tensor  # (W, n, k) Ritz vectors x
    products: Tensor  # (W, n, k) M x
    resid: Tensor  # (W, n, k) M x - x theta
    first: Tensor  # (W,) |residual| of the lowest, theta_0 >= lambda_2
    target: Tensor  # (W,) residual at which the lowest is accepted


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
    linalg: Linalg,
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
    active, outcome, d, s, basis = _factored(a, valid, start, workspace, linalg)
    basis = _plain_steps(active, basis, steps, linalg)
    used, k = steps, start.shape[-1]
    known = None  # M times the first k columns of the basis, when known
    while active.rows.numel():
        ritz = _check(active, basis, known, k, rtol, atol, linalg)
        done = _accept(outcome, active.rows, ritz, tau)
        _prove_leaves(outcome, active, ritz.theta, done, tau, linalg)
        live = ~done & ~outcome.leaf[active.rows]
        if used >= max_steps or not live.any():
            break
        _refactor_slow(active, ritz, live, linalg)
        x, resid, mx = ritz.vectors, ritz.resid, ritz.products
        if 2 * int(live.sum()) <= len(active.rows):  # compact once at most half still iterate
            active, x, resid, mx = active.keep(live), x[live], resid[live], mx[live]
        basis, known = _next_basis(active, x, resid, mx, linalg)
        used += 1
    return outcome.u, outcome.converged, outcome.leaf, outcome.block, d, s


def _factored(
    a: Tensor, valid: Tensor, start: Tensor, workspace: NCutWorkspace, linalg: Linalg
) -> tuple[_Active, _Outcome, Tensor, Tensor, Tensor]:
    """Build M in FACTOR_DTYPE and factor it -> (active regions, empty outcome, d, D^-1/2, their starts).

    A failed factorisation (not positive definite) leaves its region out: it goes to the fallback.
    """
    out = workspace.get("factor", a.shape, FACTOR_DTYPE, a.device)
    m, d, s, q = deflated(a, valid, FACTOR_DTYPE, out)
    chol, ok = factor(m, None, linalg)  # m is consumed
    none = torch.zeros_like(ok)
    outcome = _Outcome(torch.zeros_like(q), none, none.clone(), none.clone(), start.clone())
    work = ok.nonzero()[:, 0]
    aw, vaw, cw, rw, qw, vw = (select_rows(x, work) for x in (a, valid, chol, s, q, start))
    active = _Active(work, aw, vaw, cw, rw, qw, torch.zeros_like(qw[:, 0]))
    return active, outcome, d, s, vw


def _plain_steps(active: _Active, start: Tensor, steps: int, linalg: Linalg) -> Tensor:
    """`steps` inverse iteration steps with the low-precision factor, orthogonal to q -> float64 basis (W, n, k)."""
    low, high = active.chol.dtype, active.a.dtype
    qlow = active.q.to(low)
    v = torch.linalg.qr(_project_out(start.to(low), qlow)).Q  # (W, n, k)
    for _ in range(steps):
        v = torch.linalg.qr(_project_out(linalg.chol_solve(active.chol, v), qlow)).Q
    return torch.linalg.qr(_project_out(v.to(high), active.q)).Q


def _check(
    active: _Active,
    basis: Tensor,
    known: Tensor | None,
    k: int,
    rtol: float,
    atol: float,
    linalg: Linalg,
) -> _Ritz:
    """Float64 Rayleigh-Ritz on the basis; products M v only for the columns past `known` (M x of the last check)."""
    mv = apply_deflated(
        active.a, active.s, active.q, basis if known is None else basis[..., k:], linalg
    )
    mv = mv if known is None else torch.cat([known, mv], dim=-1)
    theta, vectors, products = _rayleigh_ritz(mv, basis, k)
    resid = products - vectors * theta[:, None, :]  # (W, n, k)
    first = resid[..., 0].norm(dim=-1)  # theta[:, 0] >= lambda_2
    target = torch.clamp(rtol * (theta[:, 1] - theta[:, 0]), min=atol)
    return _Ritz(theta, vectors, products, resid, first, target)


def _accept(outcome: _Outcome, work: Tensor, ritz: _Ritz, tau: float) -> Tensor:
    """Record the latest Ritz vectors of the unsettled regions; accept the converged -> done (W,).

    An accepted vector is kept; until compaction its region rides along, already done. A
    converged region with theta_0 - |r| > tau (a lower bound on lambda_2) is a leaf.
    """
    theta, first = ritz.theta, ritz.first
    unsettled = ~outcome.converged[work]
    done = (first <= ritz.target) | ~unsettled
    rows = work[unsettled]
    outcome.u[rows], outcome.block[rows] = ritz.vectors[unsettled, :, 0], ritz.vectors[unsettled]
    outcome.converged[rows] = done[unsettled]
    outcome.leaf[rows] |= done[unsettled] & (
        theta[unsettled, 0] - first[unsettled] > tau * LEAF_MARGIN
    )
    return done


def _prove_leaves(
    outcome: _Outcome, active: _Active, theta: Tensor, done: Tensor, tau: float, linalg: Linalg
) -> None:
    """One float64 Cholesky of M - tau I per region that may have lambda_2 > tau: success proves it a leaf."""
    work = active.rows
    test = ~done & (theta[:, 0] > tau) & ~outcome.tried[work]
    if not test.any():
        return
    mt = deflated(active.a[test], active.valid[test])[0]
    _, proven = factor(mt, torch.full_like(theta[test, 0], tau * LEAF_MARGIN), linalg)
    outcome.tried[work[test]] = True
    outcome.leaf[work[test.nonzero()[proven, 0]]] = True


def _refactor_slow(active: _Active, ritz: _Ritz, live: Tensor, linalg: Linalg) -> None:
    """Refactor the slowly converging live regions at sigma = theta_0 - |r|, kept where float32 solves stay accurate.

    The error shrinks by about (lambda_2 - sigma) / (lambda_{k+2} - sigma) per step; a region that
    would need more than REFACTOR_STEPS steps gets the new factor where its Cholesky succeeds.
    """
    theta, first, sw = ritz.theta, ritz.first, active.shift
    rate = ((theta[:, 0] - sw) / (theta[:, -1] - sw)).clamp(1e-300, 1 - 1e-12)
    need = torch.log(ritz.target / first) / torch.log(rate)
    slow = live & (need > REFACTOR_STEPS)
    if not slow.any():
        return
    shift = (theta[slow, 0] - first[slow].clamp_min(MIN_SHIFT_GAP)).clamp_min(0.0)
    low = active.chol.dtype
    new, better = factor(deflated(active.a[slow], active.valid[slow], low)[0], shift, linalg)
    rows = slow.nonzero()[better, 0]
    active.chol[rows], active.shift[rows] = new[better], shift[better]


def _next_basis(
    active: _Active, x: Tensor, resid: Tensor, mx: Tensor, linalg: Linalg
) -> tuple[Tensor, Tensor | None]:
    """Ritz vectors x, with the corrections P^-1 (M x - x theta) of the first CORRECTED ones -> (basis, M x or None).

    The corrections are made orthogonal to the Ritz vectors (twice, for full accuracy) and to q;
    with an exact P this span holds the inverse iteration step x - M^-1 (M x - x theta) =
    theta M^-1 x. Correcting all k converges no faster: the others only need float32 accuracy.
    When a correction falls inside span(x), any orthonormal basis of the span is taken and
    every product M v is computed anew (None).
    """
    low = active.chol.dtype
    solved = linalg.chol_solve(active.chol, resid[..., :CORRECTED].to(low))
    extra = _project_out(solved.to(active.a.dtype), active.q)
    for _ in range(2):
        extra = extra - x @ (x.transpose(-1, -2) @ extra)
    extra = torch.linalg.qr(extra).Q
    basis = torch.cat([x, extra], dim=-1)
    if (x.transpose(-1, -2) @ extra).abs().amax() > 1e-8:  # a correction inside span(x)
        return torch.linalg.qr(basis).Q, None
    return basis, mx


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
    linalg: Linalg | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """y = D^-1/2 u2 of (I - D^-1/2 A D^-1/2) for zero-padded (R, n, n) regions -> (y, d, leaf, block).

    With `start` (R, n, k) the iterative solver runs (direct solver where it does not converge),
    `leaf` marks regions proven to have lambda_2 > tau and `block` (R, n, k) holds the final Ritz
    vectors; without it every region uses the direct solver (block None). y (R, n) is sign-flipped
    so its largest |y| is positive; d (R, n) are the degrees. `workspace` lends the (R, n, n)
    temporaries; `linalg` gives the kernels (default: those of a's device).
    """
    workspace = NCutWorkspace() if workspace is None else workspace
    linalg = default_linalg(a.device) if linalg is None else linalg
    leaf, block = torch.zeros_like(valid[:, 0]), None
    if start is None:
        out = workspace.get("laplacian", a.shape, a.dtype, a.device)
        lap, d, s = normalized_laplacian(a, valid, out=out)
        u = linalg.eigenvector(lap, valid, 1)  # padded eigenvalues sit above, at 3
    else:
        u, converged, leaf, block, d, s = _inverse_iteration(
            a, valid, start, tau, first_steps, max_steps, rtol, atol, workspace, linalg
        )
        redo = (~converged & ~leaf).nonzero()[:, 0]
        if redo.numel():  # q's eigenvalue sits above, at 4: the smallest is lambda_2
            m = deflated(a[redo], valid[redo])[0]
            u[redo] = linalg.eigenvector(m, valid[redo], 0)
    return flip_sign(s * u, valid), d, leaf, block
