"""labeling.diffcut.add_noise: z_t = sqrt(abar) z0 + sqrt(1 - abar) eps with exact coefficients."""

from __future__ import annotations

from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from labeling.diffcut import add_noise


def _sdxl_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         timestep_spacing="trailing")


def _rounded_sqrt(value: Decimal) -> np.float32:
    """The float32 nearest to sqrt(value), worked out in 40-digit decimals."""
    getcontext().prec = 40
    return np.float32(float(value.sqrt()))


@pytest.mark.parametrize("t", [1, 50, 500, 999])
def test_coefficients_are_the_correctly_rounded_square_roots(t):
    scheduler = _sdxl_scheduler()
    abar = float(scheduler.alphas_cumprod[t])  # the schedule's float32 value, exactly
    generator = torch.Generator().manual_seed(t)
    z0, eps = 7 * torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16)
    a, b = _rounded_sqrt(Decimal(abar)), _rounded_sqrt(1 - Decimal(abar))
    expected = torch.from_numpy(a * z0.numpy() + b * eps.numpy())  # float32 throughout
    ours = add_noise(z0, eps, abar)
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)
    # the scheduler's add_noise takes the roots in torch float32, which may be one ulp off:
    # the same z_t but for a few float32 ulps (coefficients, products and sum rounded apart)
    reference = scheduler.add_noise(z0, eps, torch.tensor([t]))
    assert ((ours - reference).abs() <= 4 * 2.0**-23 * (z0.abs() + eps.abs())).all()
