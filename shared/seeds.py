"""Seeds derived from keys: one derivation for every stream of randomness in the project.

A stream is named by integer keys (the configured seed, then what it is for: a split, an epoch,
an image index, a step, a rank). NumPy's SeedSequence hashes the keys, so streams of nearby keys
are independent, and the same keys give the same stream on every machine and in every worker.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 64-bit seed that depends on every key: the first word of SeedSequence(keys)'s state."""
    if not keys:
        raise ValueError("derive_seed needs at least one key")
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative, got {keys}")
    sequence = np.random.SeedSequence([int(k) for k in keys])
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def derive_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))
