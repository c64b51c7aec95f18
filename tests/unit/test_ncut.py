"""Recursive normalized cut: hand examples, known groups, and batched == reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import labeling.ncut as ncut_module
import labeling.ncut_lapack as ncut_lapack
import labeling.ncut_solver as ncut_solver
from labeling.ncut import (
    NCutOptions,
    NCutWorkspace,
    ScipyLinalg,
    TorchLinalg,
    affinity_matrix,
    batched_recursive_ncut,
    best_split,
    fiedler_vectors,
    flip_sign,
    recursive_ncut,
    reference_best_split,
    reference_recursive_ncut,
    thresholds,
)
from labeling.ncut_solver import apply_deflated, deflated, factor

LINALGS = {"scipy-lapack": ScipyLinalg(), "torch-linalg": TorchLinalg()}


def clustered(
    sizes: list[int], channels: int = 48, noise: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of len(sizes) groups around orthogonal directions, shuffled -> (features (N, C), group (N,))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(
        torch.randn(channels, len(sizes), generator=g)
    ).Q.T  # orthonormal rows
    group = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    feats = centres[group] + noise * torch.randn(len(group), channels, generator=g) / math.sqrt(
        channels
    )
    perm = torch.randperm(len(group), generator=g)
    return feats[perm], group[perm]


def structured(batch: int, grid: int = 16, channels: int = 64, seed: int = 0) -> torch.Tensor:
    """Token maps with objects, two-part objects, smooth variation and noise (like DiffCut's, smaller)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, grid), torch.linspace(-1, 1, grid), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1)
    common = F.normalize(torch.randn(channels, generator=g), dim=0)
    out = []
    for _ in range(batch):
        k = int(torch.randint(2, 5, (1,), generator=g))
        seeds = torch.rand(k, 2, generator=g) * 2 - 1
        region = torch.cdist(pos, seeds).argmin(dim=-1)
        cent = F.normalize(
            0.8 * common + F.normalize(torch.randn(k, channels, generator=g), dim=-1), dim=-1
        )
        side = pos[:, 0] > seeds[region, 0]
        part = F.normalize(torch.randn(k, channels, generator=g), dim=-1) * (
            0.2 + 0.5 * torch.rand(k, 1, generator=g)
        )
        feats = cent[region] + side[:, None] * part[region]
        waves = torch.cos(pos @ (2.5 * torch.randn(2, 4, generator=g)))  # (N, 4) smooth fields
        feats = feats + 0.35 * waves @ torch.randn(4, channels, generator=g) / math.sqrt(channels)
        out.append(
            feats + 0.45 * torch.randn(grid * grid, channels, generator=g) / math.sqrt(channels)
        )
    return torch.stack(out)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if the two label vectors group the tokens identically (ids may differ)."""
    pairs = torch.unique(torch.stack([a, b]), dim=1)
    return pairs.shape[1] == len(torch.unique(a)) == len(torch.unique(b))


def test_hand_example_best_split():
    a = torch.tensor(
        [[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.0, 0.1], [0.1, 0.0, 1.0, 0.9], [0.0, 0.1, 0.9, 1.0]],
        dtype=torch.float64,
    )
    y = torch.tensor([[0.5, 0.4, -0.4, -0.5]], dtype=torch.float64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    best, positive = best_split(y, a[None], a.sum(1)[None], valid)
    # {0,1} | {2,3}: cut = 0.1 + 0.1, assoc = 2.0 + 2.0 on each side -> 0.2/4 + 0.2/4
    assert best.item() == pytest.approx(0.1, abs=1e-12)
    assert positive.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("n", [120, 300], ids=["rows-summed", "rows-binned"])
@pytest.mark.parametrize("spread", [1.0, 1e-15], ids=["wide", "tiny"])
def test_best_split_equals_the_threshold_loop(spread, n):
    assert (n > ncut_module.ROW_BIN_MIN_SIZE) == (n == 300)
    g = torch.Generator().manual_seed(4)
    a = torch.rand(n, n, generator=g, dtype=torch.float64) ** 4
    a = (a + a.T) / 2
    y = spread * torch.randn(3, n, generator=g, dtype=torch.float64)
    t = thresholds(0.99 * y.amin(dim=1), 0.99 * y.amax(dim=1))
    assert (t[:, 1:] >= t[:, :-1]).all()  # bins are found by binary search
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[2, n - 20 :] = False
    batch = torch.stack([a, a, a])
    batch[2, n - 20 :], batch[2, :, n - 20 :] = 0.0, 0.0
    best, positive = best_split(y, batch, batch.sum(dim=2), valid)
    for r in range(3):
        m = int(valid[r].sum())
        region = batch[r, :m, :m]
        ref_best, ref_x = reference_best_split(y[r, :m], region, region.sum(dim=1))
        assert best[r].item() == pytest.approx(ref_best, rel=1e-12)
        assert torch.equal(positive[r, :m], ref_x) and not positive[r, m:].any()


def test_thresholds_are_sorted_even_a_few_ulps_apart():
    centre = torch.tensor([1.0, -3.0, 1e-300, 7.5], dtype=torch.float64)
    for ulps in range(0, 200, 7):
        lo = centre - ulps * torch.finfo(torch.float64).eps * centre.abs()
        hi = centre + ulps * torch.finfo(torch.float64).eps * centre.abs() * 0.37
        t = thresholds(lo, hi)
        assert (t[:, 1:] >= t[:, :-1]).all(), ulps


def test_thresholds_match_linspace():
    lo = torch.tensor([-0.3, -1.7, 0.0], dtype=torch.float64)
    hi = torch.tensor([0.8, 2.2, 1e-3], dtype=torch.float64)
    for row, t in enumerate(thresholds(lo, hi)):
        expected = torch.linspace(lo[row].item(), hi[row].item(), 100, dtype=torch.float64)
        assert (
            torch.allclose(t, expected, rtol=0, atol=1e-15) and t[0] == lo[row] and t[-1] == hi[row]
        )


def test_flip_sign_largest_magnitude_positive_first_on_ties():
    assert flip_sign(torch.tensor([0.2, -0.5, 0.3])).tolist() == pytest.approx([-0.2, 0.5, -0.3])
    assert flip_sign(torch.tensor([-0.5, 0.5])).tolist() == [0.5, -0.5]


def test_affinity_is_minmax_power():
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    # cosines: 1, 0.6, 0 (off-diagonal 0.6, 0, 0.8) -> minmax over [0, 1] is the identity map
    expected = (
        torch.tensor([[1.0, 0.6, 0.0], [0.6, 1.0, 0.8], [0.0, 0.8, 1.0]], dtype=torch.float64) ** 10
    )
    assert torch.allclose(affinity_matrix(f, 10.0), expected, atol=1e-6)


@pytest.mark.parametrize("linalg", LINALGS.values(), ids=["scipy-syrk", "torch-blocks"])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 7.0, 10.0, 2.5])
def test_affinity_matches_the_formula_and_fills_a_given_buffer(linalg, alpha):
    f = torch.randn(300, 40, generator=torch.Generator().manual_seed(3))  # > 2 row blocks
    unit = F.normalize(f.double(), dim=-1)
    sim = unit @ unit.T
    expected = ((sim - sim.min()) / (sim.max() - sim.min())) ** alpha
    w = affinity_matrix(f, alpha, linalg=linalg)
    assert torch.equal(w, w.T)  # exactly symmetric
    assert torch.allclose(w, expected, atol=2e-5)
    out = torch.full((300, 300), float("nan"), dtype=torch.float64)
    assert affinity_matrix(f, alpha, out=out, linalg=linalg) is out
    assert torch.equal(out, w)
    assert torch.equal(affinity_matrix(torch.ones(4, 3)), torch.ones(4, 4, dtype=torch.float64))


def test_scipy_blas_runs_one_thread_inside_the_solver(monkeypatch):
    # idle OpenBLAS threads spin and take the cores from torch's: the solver pins the BLAS
    # libraries it calls (SciPy's and NumPy's, loaded with it) to one thread, then restores them
    from threadpoolctl import threadpool_limits

    controlled = ncut_lapack.blas_controller().select(user_api="blas")
    assert controlled.lib_controllers  # SciPy's BLAS at least

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in controlled.info()}

    seen, in_grams = [], []
    original_solve, original_gram = ScipyLinalg.chol_solve, ScipyLinalg.lower_gram

    def spy(self, chol, v):
        seen.append(blas_threads())
        return original_solve(self, chol, v)

    def gram_spy(self, feats, out=None):  # the Gram products come first, on BLAS's own threads
        in_grams.append(blas_threads())
        return original_gram(self, feats, out)

    monkeypatch.setattr(ScipyLinalg, "chol_solve", spy)
    monkeypatch.setattr(ScipyLinalg, "lower_gram", gram_spy)
    with threadpool_limits(2, user_api="blas"):  # OpenBLAS caps this at the cores it has
        before = blas_threads()
        labels = batched_recursive_ncut(structured(2, grid=24))
        assert blas_threads() == before  # restored afterwards
    assert seen and all(s == {1} for s in seen)
    assert len(in_grams) == 2 and all(s == before for s in in_grams)
    assert torch.equal(
        labels, torch.stack([reference_recursive_ncut(f) for f in structured(2, grid=24)])
    )


def test_known_groups_are_recovered():
    feats, group = clustered([70, 40, 90, 25])
    labels = recursive_ncut(feats)
    assert same_partition(labels, group)
    assert sorted(torch.unique(labels).tolist()) == [0, 1, 2, 3]


def test_depth_first_numbering_positive_side_first():
    # the small group is the positive side of the first cut (largest |y|), then 40 before 60 likewise
    feats, group = clustered([60, 40, 12], noise=0.02, seed=3)
    feats[group == 1] = F.normalize(
        feats[group == 1] + 0.8 * feats[group == 0][:1], dim=-1
    )  # 1 is near 0
    labels = recursive_ncut(feats)
    assert [int(labels[group == g][0]) for g in (2, 1, 0)] == [0, 1, 2]
    assert torch.equal(labels, reference_recursive_ncut(feats))


def test_constant_features_are_one_segment():
    assert recursive_ncut(torch.ones(50, 8)).tolist() == [0] * 50
    assert batched_recursive_ncut(torch.ones(2, 30, 4)).unique().tolist() == [0]


def test_two_distinct_tokens_split_and_one_token_is_one_segment():
    assert sorted(recursive_ncut(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist()) == [0, 1]
    assert recursive_ncut(torch.randn(1, 5)).tolist() == [0]


def test_zero_feature_row_gives_valid_labels():
    feats, _ = clustered([30, 30])
    feats[5] = 0.0
    labels = recursive_ncut(feats)
    assert labels.min() == 0 and not torch.isnan(labels.float()).any()
    assert torch.equal(torch.unique(labels), torch.arange(int(labels.max()) + 1))


def test_batched_equals_per_image_and_reference():
    feats = structured(4)
    batched = batched_recursive_ncut(feats)
    for i, f in enumerate(feats):
        assert torch.equal(batched[i], recursive_ncut(f))
        assert torch.equal(batched[i], reference_recursive_ncut(f))
        assert torch.equal(torch.unique(batched[i]), torch.arange(int(batched[i].max()) + 1))


@pytest.mark.parametrize("cpu_linalg", ["scipy", "torch"], ids=["scipy-lapack", "torch-linalg"])
def test_large_regions_equal_reference_with_either_linear_algebra(cpu_linalg):
    # 576 tokens: the top levels run the float32-factor iteration, the small regions the direct
    # solver; torch.linalg is what other devices use
    options = NCutOptions(cpu_linalg=cpu_linalg)
    feats = structured(2, grid=24, seed=0)
    assert feats.shape[1] > ncut_module.DIRECT_MAX_SIZE
    batched = batched_recursive_ncut(feats, tau=0.7, options=options)
    for i, f in enumerate(feats):
        assert torch.equal(batched[i], reference_recursive_ncut(f, tau=0.7, options=options))
        assert int(batched[i].max()) >= 7  # a real tree, not one cut


KERNELS = ("lower_gram", "symmetric_product", "cholesky_", "chol_solve", "eigenvector")


@pytest.mark.parametrize("cpu_linalg", ["scipy", "torch"])
def test_options_choose_the_kernels_of_every_step(monkeypatch, cpu_linalg):
    calls: dict[str, set[str]] = {"scipy": set(), "torch": set()}
    for kind, cls in (("scipy", ScipyLinalg), ("torch", TorchLinalg)):
        for name in KERNELS:

            def counted(self, *args, _kind=kind, _name=name, _original=getattr(cls, name), **kw):
                calls[_kind].add(_name)
                return _original(self, *args, **kw)

            monkeypatch.setattr(cls, name, counted)
    options = NCutOptions(cpu_linalg=cpu_linalg)
    feats = structured(1, grid=24, seed=0)  # 576 tokens: the iterative and the direct solver
    labels = batched_recursive_ncut(feats, tau=0.7, options=options)
    assert torch.equal(labels[0], reference_recursive_ncut(feats[0], tau=0.7, options=options))
    other = "torch" if cpu_linalg == "scipy" else "scipy"
    assert calls[cpu_linalg] == set(KERNELS) and not calls[other]


def test_options_resolve_per_device_and_refuse_unknown_values():
    assert NCutOptions().linalg_for("cpu") == ScipyLinalg(ncut_module.DIRECT_MAX_SIZE)
    assert NCutOptions(cpu_linalg="torch").linalg_for("cpu") == TorchLinalg(
        ncut_module.EIGH_MAX_SIZE
    )
    # other devices always take torch's kernels; a cut-off given applies to either
    assert NCutOptions().linalg_for(torch.device("cuda", 0)) == TorchLinalg(
        ncut_module.EIGH_MAX_SIZE
    )
    assert NCutOptions(direct_max_size=5).linalg_for("cpu") == ScipyLinalg(5)
    assert NCutOptions(direct_max_size=5).linalg_for("cuda") == TorchLinalg(5)
    with pytest.raises(ValueError, match="cpu_linalg.*'mkl'"):
        NCutOptions(cpu_linalg="mkl")
    with pytest.raises(ValueError, match="direct_max_size.*0"):
        NCutOptions(direct_max_size=0)


def test_iterative_fiedler_vector_matches_full_eigh():
    feats = structured(3, seed=1)
    a = torch.stack([affinity_matrix(f) for f in feats])[
        :, :150, :150
    ]  # regions larger than the eigh cut-off
    valid = torch.ones(3, 150, dtype=torch.bool)
    valid[2, 120:] = False  # a zero-padded region
    a = a * (valid[:, :, None] & valid[:, None, :])
    start = torch.randn(150, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact, _, _, _ = fiedler_vectors(a, valid)
    fast, _, leaf, _ = fiedler_vectors(a, valid, start.expand(3, -1, -1) * valid[:, :, None])
    assert not leaf.any()
    assert torch.allclose(fast, exact, atol=1e-8) and (fast[2, 120:] == 0).all()


@pytest.mark.parametrize("linalg", LINALGS.values(), ids=LINALGS.keys())
def test_deflated_product_without_the_matrix_equals_explicit_product(linalg):
    feats = structured(2, seed=2)
    a = torch.stack([affinity_matrix(f) for f in feats])[:, :90, :90]
    valid = torch.ones(2, 90, dtype=torch.bool)
    valid[1, 70:] = False  # a zero-padded region: M there is 3 I
    a = a * (valid[:, :, None] & valid[:, None, :])
    m, d, s, q = deflated(a, valid)
    v = torch.randn(2, 90, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(apply_deflated(a, s, q, v, linalg), m @ v, rtol=0, atol=1e-12)
    assert torch.equal(m[1, 70:, 70:], 3 * torch.eye(20, dtype=torch.float64))
    assert torch.allclose(m[0] @ q[0], 4 * q[0], atol=1e-12)  # the null vector moved to 4


@pytest.mark.parametrize("linalg", LINALGS.values(), ids=LINALGS.keys())
def test_in_place_factor_is_cholesky_of_shifted_matrix(linalg):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 40, dtype=torch.float64, generator=g)
    m = x @ x.mT / 40 + 0.5 * torch.eye(40, dtype=torch.float64)
    lowest = torch.linalg.eigvalsh(m)[:, 0]
    sigma = torch.stack([lowest[0] - 0.1, lowest[1] + 0.1, torch.zeros((), dtype=torch.float64)])
    chol, ok = factor(m.clone(), sigma, linalg)
    assert ok.tolist() == [True, False, True]
    shifted = m - sigma[:, None, None] * torch.eye(40, dtype=torch.float64)
    for i in (0, 2):  # the factor is the lower triangle; solves never read the rest
        lower = chol[i].tril()
        assert torch.allclose(lower @ lower.mT, shifted[i], atol=1e-12)
        assert torch.allclose(
            linalg.chol_solve(chol[i : i + 1], shifted[i : i + 1]),
            torch.eye(40, dtype=torch.float64),
            atol=1e-9,
        )


def test_leaf_proof_only_when_lambda2_exceeds_tau():
    feats, _ = clustered([100], noise=0.5)  # one noisy group: no good cut
    a = affinity_matrix(feats)[None]
    valid = torch.ones(1, 100, dtype=torch.bool)
    lap = (
        torch.eye(100, dtype=torch.float64)
        - a[0] / a[0].sum(1).sqrt()[:, None] / a[0].sum(1).sqrt()[None]
    )
    lam2 = torch.linalg.eigvalsh(lap)[1].item()
    start = torch.randn(1, 100, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, _, leaf_below, _ = fiedler_vectors(a, valid, start, tau=lam2 * 0.9)
    _, _, leaf_above, _ = fiedler_vectors(a, valid, start, tau=lam2 * 1.1)
    assert leaf_below.item() and not leaf_above.item()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="N, C"):
        recursive_ncut(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="B, N, C"):
        batched_recursive_ncut(torch.randn(3, 4))


def test_a_kept_workspace_gives_the_same_labels_batch_after_batch():
    feats = structured(3, grid=24, seed=1)
    workspace = NCutWorkspace()
    first = batched_recursive_ncut(feats, workspace=workspace)
    one = batched_recursive_ncut(feats[1:2], workspace=workspace)  # smaller: buffers reused
    again = batched_recursive_ncut(feats, workspace=workspace)
    expected = torch.stack([reference_recursive_ncut(f) for f in feats])
    assert torch.equal(first, expected)
    assert torch.equal(again, expected)
    assert torch.equal(one[0], expected[1])
    big = workspace.get("role", (4, 5), torch.float64, torch.device("cpu"))
    small = workspace.get("role", (2, 3), torch.float64, torch.device("cpu"))
    assert small.data_ptr() == big.data_ptr() and small.shape == (2, 3)
    assert workspace.get("role", (2, 3), torch.float32, torch.device("cpu")).dtype == torch.float32


def test_corrections_inside_the_ritz_span_still_give_the_reference(monkeypatch):
    # zero corrections: their QR is not orthogonal to the Ritz vectors, so the basis is rebuilt
    # (Rayleigh-Ritz always gets orthonormal columns); the iteration then stalls and the full
    # eigh takes over, with the reference's partitions
    original_solve, original_ritz = ScipyLinalg.chol_solve, ncut_solver._rayleigh_ritz
    gram_errors = []

    def solve(self, chol, v):
        out = original_solve(self, chol, v)
        return torch.zeros_like(out) if v.shape[-1] == ncut_module.CORRECTED else out

    def ritz(mv, v, k):
        eye = torch.eye(v.shape[-1], dtype=v.dtype)
        gram_errors.append(float((v.transpose(-1, -2) @ v - eye).abs().max()))
        return original_ritz(mv, v, k)

    monkeypatch.setattr(ScipyLinalg, "chol_solve", solve)
    monkeypatch.setattr(ncut_solver, "_rayleigh_ritz", ritz)
    feats = structured(2, grid=16, seed=3)  # 256 tokens: iterative only below the default cut-off
    expected = torch.stack([reference_recursive_ncut(f) for f in feats])
    assert torch.equal(
        batched_recursive_ncut(feats, options=NCutOptions(direct_max_size=64)), expected
    )
    assert len(gram_errors) > 4 and max(gram_errors) < 1e-10


class HostWaits(TorchDispatchMode):
    """Counts the operations that make the host wait for a device: reading values (item, bool,
    tolist), copies to the host, and results whose size depends on the values (nonzero, masks)."""

    WAITING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        for name in ("tolist", "cpu", "item", "numpy"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put_)
        if func in self.WAITING or (
            masks and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_host_waits_do_not_grow_with_the_images_or_regions(monkeypatch):
    # copies of one image split alike, round by round, in the same batches of regions: only
    # waits per region or per image would make four copies wait more often than one
    options = NCutOptions(cpu_linalg="torch")  # the path a GPU takes
    feats = structured(1, grid=16, seed=0)
    counter, waits, labels = HostWaits(monkeypatch), [], []
    for copies in (1, 4):
        counter.count = 0
        with counter:
            tokens = feats.expand(copies, -1, -1).contiguous()
            labels.append(batched_recursive_ncut(tokens, options=options))
        waits.append(counter.count)
    assert int(labels[0].max()) >= 4  # several rounds of splits
    assert (labels[1] == labels[0]).all()
    assert waits[0] == waits[1] > 0
