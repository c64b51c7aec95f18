"""A checkpoint resumes only the run that wrote it: every setting but the operational ones, the
content of the initial weights, the data size and the world size must agree."""

from __future__ import annotations

import pytest

from training.checkpoints import (
    OPERATIONAL_FIELDS,
    RUN_ENTRIES,
    check_identity,
    run_identity,
)
from training.config import TrainConfig

BASE = dict(labels="/sets/coco", out="/runs/a", weights=None, tiny=True)
URI = "/runs/a/checkpoints/step_00000004.pt"

# settings that change what a run computes, each with another valid value
RESULT_CHANGES = {
    "weights": {"weights": "hub"},
    "labels": {"labels": "/sets/other"},
    "loss": {"loss": "nll"},
    "temperature": {"temperature": 0.1},
    "num_distractors": {"num_distractors": 3},
    "ignore_index": {"ignore_index": 255},
    "betas": {"betas": (0.9, 0.999)},
    "micro_batch_size": {"micro_batch_size": 16},  # it groups the support sets
    "precision": {"precision": "fp16"},
    "backbone": {"backbone": "vitb14"},
    "seed": {"seed": 1},
    "epochs": {"epochs": 6},
    "crop": {"crop": 196},
    "distractors": {"distractors": "released"},
}
OPERATIONAL_CHANGES = {
    "out": {"out": "/runs/moved"}, "max_steps": {"max_steps": 7},
    "loader_workers": {"loader_workers": 0}, "checkpoint_every": {"checkpoint_every": 5},
    "keep_checkpoints": {"keep_checkpoints": 9}, "write_csv": {"write_csv": False},
    "compile_model": {"compile_model": True}, "deterministic": {"deterministic": True},
    "use_gpu": {"use_gpu": True}, "workers": {"workers": 2}, "address": {"address": "ray://x"},
    "max_failures": {"max_failures": 0}, "packed_root": {"packed_root": "/packs"},
    "packed_ray": {"packed_ray": True}, "cache_prepared": {"cache_prepared": True},
}


def checkpoint_of(cfg: TrainConfig, num_pairs: int = 40, world_size: int = 1) -> dict:
    return {"identity": run_identity(cfg, num_pairs, world_size)}


@pytest.mark.parametrize("field", list(RESULT_CHANGES))
def test_changing_a_setting_that_changes_the_result_refuses_the_resume(field):
    cfg = TrainConfig(**BASE)
    state = checkpoint_of(cfg)
    other = TrainConfig(**{**BASE, **RESULT_CHANGES[field]})
    with pytest.raises(ValueError, match=rf"cannot resume from {URI}: .*\b{field}: checkpoint "):
        check_identity(other, state, URI, 40, 1)
    check_identity(cfg, state, URI, 40, 1)  # the same run resumes


@pytest.mark.parametrize("field", list(OPERATIONAL_CHANGES))
def test_changing_an_operational_setting_resumes(field):
    state = checkpoint_of(TrainConfig(**BASE))
    check_identity(TrainConfig(**{**BASE, **OPERATIONAL_CHANGES[field]}), state, URI, 40, 1)


def test_the_lists_above_cover_every_setting_and_the_identity_is_derived():
    fields = set(TrainConfig.model_fields)
    assert set(OPERATIONAL_CHANGES) == set(OPERATIONAL_FIELDS) <= fields
    identity = run_identity(TrainConfig(**BASE), 40, 1)
    # every setting that is not operational is in the identity, with nobody listing it
    assert set(identity) == (fields - OPERATIONAL_FIELDS) | set(RUN_ENTRIES)
    assert set(RESULT_CHANGES) <= set(identity)


def test_new_weights_under_the_same_name_refuse_the_resume(tmp_path):
    path = tmp_path / "init.safetensors"
    path.write_bytes(b"first weights")
    cfg = TrainConfig(**{**BASE, "weights": str(path)})
    state = checkpoint_of(cfg)
    assert state["identity"]["weights_content"]["source"] == "file"
    check_identity(cfg, state, URI, 40, 1)
    path.write_bytes(b"other weights")
    with pytest.raises(ValueError, match="weights_content: checkpoint"):
        check_identity(cfg, state, URI, 40, 1)


def test_the_data_size_and_the_world_size_are_part_of_the_identity():
    cfg = TrainConfig(**BASE)
    state = checkpoint_of(cfg, num_pairs=40, world_size=2)
    with pytest.raises(ValueError, match="num_pairs: checkpoint 40 != now 41"):
        check_identity(cfg, state, URI, 41, 2)
    with pytest.raises(ValueError, match="world_size: checkpoint 2 != now 4"):
        check_identity(cfg, state, URI, 40, 4)


def test_a_checkpoint_from_before_an_entry_was_recorded():
    cfg = TrainConfig(**BASE)
    state = checkpoint_of(cfg)
    for key in ("weights_content", "world_size", "loss"):
        del state["identity"][key]
    # a missing run entry cannot be known and is not compared; a missing setting had its default
    check_identity(cfg, state, URI, 40, 8)
    with pytest.raises(ValueError, match="loss: checkpoint 'released' != now 'nll'"):
        check_identity(cfg.model_copy(update={"loss": "nll"}), state, URI, 40, 1)
