"""Training checkpoints on resume: a file that does not load is named and passed over for the
one before it; none loading is one error naming them all; later unloadable files are removed."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from shared import storage
from training.checkpoints import (
    CheckpointError,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)


def _state(step: int) -> dict:
    return {"step": step, "epoch": step // 2, "model": {"head.0.weight": torch.full((2, 2), step)},
            "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": step},
            "rng": torch.get_rng_state(), "identity": {"seed": 0}}


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class Opaque:
    """Not loadable with weights_only=True."""


FAULTS = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "garbage": lambda good: b"not a checkpoint at all" * 10,
    "pickled object": lambda good: _saved({**_state(4), "extra": Opaque()}),
    "not a dict": lambda good: _saved([1, 2, 3]),
    "missing entries": lambda good: _saved({"step": 4, "model": {}}),
    "model not tensors": lambda good: _saved({**_state(4), "model": {"w": [1.0]}}),
    "other step": lambda good: _saved(_state(2)),
}
CAUSES = {"truncated": "cannot be loaded: RuntimeError: PytorchStreamReader failed",
          "empty": "(0 bytes) cannot be loaded: it is not the zip archive torch.save writes",
          "garbage": "cannot be loaded: it is not the zip archive torch.save writes",
          "pickled object": f"Unsupported global: GLOBAL {Opaque.__module__}.Opaque was not",
          "not a dict": "holds a list", "missing entries": "lacks epoch, optimizer",
          "model not tensors": "model entry w is not a tensor",
          "other step": "holds step 2 but its name says step 4"}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_an_unloadable_newest_checkpoint_falls_back_to_the_one_before(fault, tmp_path, caplog):
    out = str(tmp_path / "run")
    save_checkpoint(out, _state(2), keep=2)
    newest = save_checkpoint(out, _state(4), keep=2)
    storage.write_bytes(newest, FAULTS[fault](storage.read_bytes(newest)))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(newest)
    assert newest in str(err.value) and CAUSES[fault] in str(err.value)
    with caplog.at_level(logging.WARNING, logger="training.checkpoints"):
        uri, state = resume_point(out)
    assert uri.endswith("step_00000002.pt") and state["step"] == 2
    assert torch.equal(state["model"]["head.0.weight"], torch.full((2, 2), 2))
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert newest in warning and CAUSES[fault] in warning


def test_no_checkpoint_is_no_resume_and_none_loading_is_one_error(tmp_path):
    out = str(tmp_path / "run")
    assert resume_point(out) is None
    for step in (3, 6):
        storage.write_bytes(storage.join(checkpoint_dir(out), f"step_{step:08d}.pt"), b"\x00" * 9)
    storage.write_bytes(storage.join(checkpoint_dir(out), "notes.txt"), b"not a checkpoint name")
    with pytest.raises(CheckpointError) as err:
        resume_point(out)
    message = str(err.value)
    assert "\n" not in message and "no checkpoint loads" in message
    assert "step_00000003.pt" in message and "step_00000006.pt" in message
    assert "notes.txt" not in message


def test_saving_removes_later_unloadable_files_and_keeps_the_newest_good_ones(tmp_path, caplog):
    out = str(tmp_path / "run")
    for step in (2, 4):
        save_checkpoint(out, _state(step), keep=3)
    for step in (8, 9):  # left behind by a run that resumed from step 4 because these failed
        storage.write_bytes(storage.join(checkpoint_dir(out), f"step_{step:08d}.pt"), b"cut")
    with caplog.at_level(logging.WARNING, logger="training.checkpoints"):
        written = save_checkpoint(out, _state(6), keep=2)
    steps = [load_checkpoint(u)["step"] for u in list_checkpoints(out)]
    assert steps == [4, 6] and written == list_checkpoints(out)[-1]
    removed = " ".join(r.getMessage() for r in caplog.records)
    assert "step_00000008.pt" in removed and "step_00000009.pt" in removed


def test_checkpoints_are_listed_by_step_number(tmp_path):
    out = str(tmp_path / "run")
    for step in (5, 99999999, 100000000):  # the last one outgrows the zero padding
        save_checkpoint(out, _state(step), keep=5)
    assert [load_checkpoint(u)["step"] for u in list_checkpoints(out)] == [5, 99999999, 100000000]
