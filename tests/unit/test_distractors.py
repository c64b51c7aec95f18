"""The two distractor modes: their structure and the statistics each one implies."""

from __future__ import annotations

import pytest
import torch

from training.episodes import EpisodeError, check_task_batch, sample_support

BATCHES = 200  # micro-batches of 32 tasks x 7 distractors: 44,800 distractor slots per mode


def _draws(mode: str, batch: int = 32, distractors: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    return torch.stack([sample_support(batch, distractors, gen, mode) for _ in range(BATCHES)])


def test_distinct_never_repeats_and_never_shows_the_own_positive():
    support = _draws("distinct")  # (R,B,1+n)
    own = torch.arange(32)[None, :, None]
    assert torch.equal(support[..., :1], own.expand(BATCHES, 32, 1))
    assert not (support[..., 1:] == own).any()
    ordered = support[..., 1:].sort(dim=-1).values
    assert (ordered[..., 1:] != ordered[..., :-1]).all()  # 7 different positives per task
    # every other positive is equally likely: 7 of the 31 others
    counts = torch.zeros(32, 32)
    for r in range(BATCHES):
        counts.index_put_((torch.arange(32)[:, None].expand(-1, 7), support[r, :, 1:]),
                          torch.ones(32, 7), accumulate=True)
    off_diagonal = counts[~torch.eye(32, dtype=torch.bool)] / BATCHES
    assert off_diagonal.mean() == pytest.approx(7 / 31, abs=1e-6)
    assert (off_diagonal - 7 / 31).abs().max() < 0.12


def test_released_permutes_groups_of_four_with_their_repeats():
    support = _draws("released")  # (R,B,1+n)
    own = torch.arange(32)[None, :, None]
    distractors = support[..., 1:]  # (R,B,7)
    assert torch.equal(support[..., :1], own.expand(BATCHES, 32, 1))
    assert torch.equal(distractors // 4, (own // 4).expand_as(distractors))  # within the group
    # each distractor column is a permutation of the group of 4
    grouped = distractors.reshape(BATCHES, 8, 4, 7).sort(dim=2).values
    assert torch.equal(grouped, (torch.arange(4)[None, None, :, None] + 4 * torch.arange(8)[
        None, :, None, None]).expand_as(grouped))
    # a slot is the own positive with probability 1/4 (std 0.002 over 44,800 slots)
    assert (distractors == own).float().mean() == pytest.approx(1 / 4, abs=0.01)
    # 7 draws from 4 values: some positive always repeats; the own positive appears among the
    # distractors of a task with probability 1 - (3/4)^7, and a task sees 4 (1 - (3/4)^7)
    # different positives on average
    ordered = distractors.sort(dim=-1).values
    assert ((ordered[..., 1:] == ordered[..., :-1]).any(-1)).all()
    shows_own = (distractors == own).any(-1).float().mean()
    assert shows_own == pytest.approx(1 - 0.75**7, abs=0.01)
    different = (ordered[..., 1:] != ordered[..., :-1]).sum(-1) + 1
    assert different.float().mean() == pytest.approx(4 * (1 - 0.75**7), abs=0.02)


def test_modes_are_reproducible_and_differ():
    a = sample_support(8, 7, torch.Generator().manual_seed(3), "released")
    b = sample_support(8, 7, torch.Generator().manual_seed(3), "released")
    c = sample_support(8, 7, torch.Generator().manual_seed(3), "distinct")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batch_requirements_of_each_mode():
    check_task_batch(4, 7, "released")  # 4 tasks suffice: repeats are allowed
    with pytest.raises(EpisodeError, match="multiple of 4"):
        check_task_batch(6, 7, "released")
    with pytest.raises(EpisodeError, match="at least 8"):
        check_task_batch(4, 7, "distinct")
    with pytest.raises(EpisodeError, match="unknown distractors mode"):
        check_task_batch(8, 7, "shuffled")
