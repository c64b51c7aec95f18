"""Exact ties of the normalized cut: a token lying on a threshold stays on the low side (x = y > t),
and a region whose best NCut equals tau is a leaf (it splits only when NCut < tau). Both in the
batched solver and in the reference, on inputs whose arithmetic is exact."""

from __future__ import annotations

import math

import pytest
import torch

from labeling.ncut import (
    affinity_matrix,
    batched_recursive_ncut,
    best_split,
    recursive_ncut,
    reference_best_split,
    reference_recursive_ncut,
    thresholds,
)

# Block weights: {0, 1} and {2, 3} belong together (hand example: NCut 0.2/4 + 0.2/4 = 0.1)
A = torch.tensor([[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.0, 0.1],
                  [0.1, 0.0, 1.0, 0.9], [0.0, 0.1, 0.9, 1.0]], dtype=torch.float64)
J = 50  # the threshold token 1 sits on


def _tied(t: torch.Tensor) -> torch.Tensor:
    """y with token 1 exactly on threshold J and token 2 just above it: only threshold J cuts
    {0, 1} | {2, 3}, and only if a token on a threshold stays below it."""
    return torch.tensor([-1.0, t[J].item(), (t[J] + t[J + 1]).item() / 2, 1.0],
                        dtype=torch.float64)


def test_a_token_on_the_threshold_stays_on_the_low_side_batched():
    t = thresholds(torch.tensor([-0.99], dtype=torch.float64),
                   torch.tensor([0.99], dtype=torch.float64))[0]  # 0.99 x (min y, max y)
    y = _tied(t)
    assert y[1] == t[J] and t[J] < y[2] < t[J + 1]
    best, positive = best_split(y[None], A[None], A.sum(1)[None], torch.ones(1, 4, dtype=bool))
    assert positive.tolist() == [[False, False, True, True]]
    assert best.item() == pytest.approx(0.1, abs=1e-12)  # with y >= t this cut never appears


def test_a_token_on_the_threshold_stays_on_the_low_side_reference():
    t = torch.linspace(0.99 * -1.0, 0.99 * 1.0, 100, dtype=torch.float64)  # the reference's
    y = _tied(t)
    assert y[1] == t[J]
    best, x = reference_best_split(y, A, A.sum(1))
    assert x.tolist() == [False, False, True, True] and best == pytest.approx(0.1, abs=1e-12)


# Six unit tokens with cosines in {-1, -1/2, 0, 1/2, 1}: W = (cos + 1) / 2 holds exact quarters, so
# every cut and degree is exact and the NCut of {2, 3} | rest is 9/23 + 9/59 in any summation order.
TOKENS = 0.5 * torch.tensor([[1, -1, 1, 1], [1, -1, -1, 1], [1, 1, 1, -1], [-1, 1, 1, -1],
                             [1, 1, -1, 1], [0, 0, 0, 2]], dtype=torch.float32)
SPLIT = [1, 1, 0, 0, 1, 1]  # {2, 3} (the positive side, numbered first) | {0, 1, 4, 5}


def _best_ncut() -> float:
    f = TOKENS.double()
    w = (f @ f.T + 1) / 2  # min-max of cosines spanning [-1, 1], alpha = 1
    assert torch.equal(affinity_matrix(TOKENS, alpha=1.0), w)
    side = torch.tensor([False, False, True, True, False, False])
    cut = w[side][:, ~side].sum().item()
    assert (cut, w[side].sum().item(), w[~side].sum().item()) == (9 / 4, 23 / 4, 59 / 4)
    # the normalized Laplacian's lambda_2 lies well below: the cut, not its bound, decides
    d = w.sum(1).rsqrt()
    lam2 = torch.linalg.eigvalsh(torch.eye(6, dtype=w.dtype) - d[:, None] * w * d[None])[1]
    assert lam2.item() < 9 / 23 + 9 / 59 - 0.03
    return cut / (23 / 4) + cut / (59 / 4)


@pytest.mark.parametrize("ncut", [recursive_ncut, reference_recursive_ncut],
                         ids=["batched", "reference"])
def test_a_best_ncut_equal_to_tau_is_a_leaf_and_one_ulp_more_splits(ncut):
    best = _best_ncut()
    assert best == 9 / 23 + 9 / 59
    assert ncut(TOKENS, tau=best, alpha=1.0).tolist() == [0] * 6  # NCut < tau is false
    above = math.nextafter(best, math.inf)
    assert ncut(TOKENS, tau=above, alpha=1.0).tolist() == SPLIT  # and nothing below splits
    assert batched_recursive_ncut(TOKENS[None], tau=above, alpha=1.0)[0].tolist() == SPLIT
