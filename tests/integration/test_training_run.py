"""Training runs on a tiny model and a small synthetic label set: the loss goes down, a crashed run
resumes to the same weights (also past a truncated checkpoint), bad input fails before training,
the CLI, and Ray Train on 2 workers."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from shared import storage
from shared.backbones import load_backbone
from shared.labelset import LabelSetError, LabelSetWriter
from training.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from training.config import TrainConfig
from training.episodes import EpisodeError
from training.loop import train
from training.run import app, run_training


def build_labelset(builder, root: str, num_images: int, ghost: bool = False) -> str:
    """64x64 scenes paired with the next image sharing a class; ``ghost`` adds a missing image."""
    extra = [("s000", "missing-image")] if ghost else []
    return builder(root, num_images, size=(64, 64), seed=500, prefix="s", pairing="shared",
                   extra_pairs=extra)


def tiny_config(labels: str, out: str, **changes) -> TrainConfig:
    """A tiny model on 56x56 crops (4x4 patches of 14), lr 1e-3, no loader processes."""
    base = dict(labels=labels, out=out, backbone="vits14", tiny=True, weights=None, head_dim=32,
                resize=64, crop=56, batch_size=8, micro_batch_size=8, base_lr=1e-3 * 256 / 8,
                loader_workers=0, checkpoint_every=1000)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def labels8(tmp_path_factory, synthetic_labelset):
    return build_labelset(synthetic_labelset, str(tmp_path_factory.mktemp("ls8")), 8)


def test_a_few_steps_lower_the_loss(labels8, tmp_path):
    # 8 pairs in a batch of 8: every step sees the same 8 tasks, each with all 8 positives as its
    # support (soft-NN is permutation invariant), so the loss is comparable step to step
    out = str(tmp_path / "run")
    cfg = tiny_config(labels8, out, epochs=6)
    result = train(cfg)
    assert result.step == result.total_steps == 6
    metrics = storage.read_parquet(storage.join(out, "metrics.parquet")).to_pylist()
    losses = [row["loss"] for row in metrics]
    assert [row["step"] for row in metrics] == list(range(1, 7))
    assert losses[-1] < losses[0] - 0.01, losses
    lrs = [row["lr"] for row in metrics]
    assert lrs[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(row["images_per_s"] > 0 for row in metrics)
    assert storage.exists(storage.join(out, "metrics.csv"))
    saved = yaml.safe_load(storage.read_text(storage.join(out, "config.yaml")))
    assert TrainConfig.model_validate(saved) == cfg
    encoder = load_backbone("vits14", weights=result.encoder_uri, tiny=True, device="cpu")
    assert encoder.dense_features(torch.rand(1, 3, 56, 56)).shape == (1, 4, 4, 32)


class Crash(RuntimeError):
    pass


@pytest.mark.slow
def test_resume_after_a_crash_reaches_the_same_weights(tmp_path, synthetic_labelset):
    labels = build_labelset(synthetic_labelset, str(tmp_path / "data"), 32)
    # 32 pairs, effective batch 16 = 2 micro-batches of 8: 2 steps per epoch, 6 steps in all;
    # checkpoints at the end of each epoch (steps 2, 4, 6)
    # (deterministic kernels: without them, CPU scatter-adds differ run to run in the last bit)
    changes = dict(batch_size=16, epochs=3, cache_prepared=True, deterministic=True)
    whole = str(tmp_path / "whole")
    train(tiny_config(labels, whole, **changes))

    def crash_at_3(step, model):
        if step == 3:
            raise Crash("killed after step 3, before the next checkpoint")

    broken = str(tmp_path / "broken")
    with pytest.raises(Crash):
        train(tiny_config(labels, broken, **changes), on_step=crash_at_3)
    assert latest_checkpoint(broken).endswith("step_00000002.pt")
    ran = []
    resumed = train(tiny_config(labels, broken, **changes), on_step=lambda step, _: ran.append(step))
    assert resumed.step == 6 and ran == [3, 4, 5, 6]  # it picked up after the checkpoint
    a = load_checkpoint(latest_checkpoint(whole))
    b = load_checkpoint(latest_checkpoint(broken))
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    loss_a = storage.read_parquet(storage.join(whole, "metrics.parquet")).column("loss").to_pylist()
    loss_b = storage.read_parquet(storage.join(broken, "metrics.parquet")).column("loss").to_pylist()
    assert loss_a == loss_b and len(loss_a) == 6
    # a checkpoint from another configuration is refused by name
    with pytest.raises(ValueError, match="seed"):
        train(tiny_config(labels, broken, **changes, seed=1))


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(tmp_path, synthetic_labelset,
                                                                  caplog):
    labels = build_labelset(synthetic_labelset, str(tmp_path / "data"), 32)
    # 2 steps per epoch, 3 epochs: checkpoints at steps 2, 4, 6, the last 2 kept
    changes = dict(batch_size=16, epochs=3, cache_prepared=True, deterministic=True)
    whole = str(tmp_path / "whole")
    train(tiny_config(labels, whole, **changes))

    def crash_at_5(step, model):
        if step == 5:
            raise Crash("killed after step 5")

    broken = str(tmp_path / "broken")
    with pytest.raises(Crash):
        train(tiny_config(labels, broken, **changes), on_step=crash_at_5)
    names = [u.rsplit("/", 1)[-1] for u in list_checkpoints(broken)]
    assert names == ["step_00000002.pt", "step_00000004.pt"]
    newest = list_checkpoints(broken)[-1]
    data = storage.read_bytes(newest)
    storage.write_bytes(newest, data[: len(data) // 2])  # a write cut short by the crash

    ran = []
    with caplog.at_level(logging.WARNING, logger="training.checkpoints"):
        resumed = train(tiny_config(labels, broken, **changes),
                        on_step=lambda step, _: ran.append(step))
    assert resumed.step == 6 and ran == [3, 4, 5, 6]  # from step 2, the one before the bad file
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "step_00000004.pt" in warning and "cannot be loaded" in warning, warning
    a = load_checkpoint(latest_checkpoint(whole))
    b = load_checkpoint(latest_checkpoint(broken))
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [load_checkpoint(u)["step"] for u in list_checkpoints(broken)] == [4, 6]  # rewritten
    loss_a = storage.read_parquet(storage.join(whole, "metrics.parquet")).column("loss").to_pylist()
    loss_b = storage.read_parquet(storage.join(broken, "metrics.parquet")).column("loss").to_pylist()
    assert loss_a == loss_b and len(loss_a) == 6
    # the same weights export to the same bytes
    assert storage.read_bytes(storage.join(whole, "encoder.safetensors")) == \
        storage.read_bytes(storage.join(broken, "encoder.safetensors"))


@pytest.mark.parametrize("where", ["in process", "on Ray"])
def test_no_loadable_checkpoint_fails_in_one_line_naming_the_files(where, tmp_path, monkeypatch,
                                                                  synthetic_labelset):
    import ray
    import ray.train.torch

    started = []  # whatever Ray the session holds, this run must start nothing on it
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append("ray.init"))
    monkeypatch.setattr(ray.train.torch, "TorchTrainer",
                        lambda *a, **k: started.append("TorchTrainer"))
    labels = build_labelset(synthetic_labelset, str(tmp_path / "data"), 16)
    out = str(tmp_path / "run")
    for step in (1, 2):
        storage.write_bytes(storage.join(out, "checkpoints", f"step_{step:08d}.pt"), b"PK\x03\x04")
    args = ["--backbone", "vits14", "--tiny", "--labels", labels, "--out", out,
            "--set", "batch_size=16", "--set", "micro_batch_size=8", "--set", "loader_workers=0",
            "--set", "resize=64", "--set", "crop=56", "--set", "head_dim=16"]
    if where == "on Ray":  # the driver checks before Ray (or any worker) starts
        args += ["--workers", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    error = [line for line in lines if line.startswith("training.run: error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "step_00000001.pt" in error[0] and "step_00000002.pt" in error[0]
    assert "no checkpoint loads" in error[0]
    assert [u.rsplit("/", 1)[-1] for u in list_checkpoints(out)] == ["step_00000001.pt",
                                                                     "step_00000002.pt"]
    assert started == []


@pytest.mark.parametrize("case", ["missing", "incomplete", "ghost image", "small batch"])
def test_bad_input_fails_before_training(case, tmp_path, labels8, synthetic_labelset):
    out = str(tmp_path / "out")
    labels, changes, error = labels8, {}, EpisodeError
    if case == "missing":
        labels, error = str(tmp_path / "no-such-labelset"), LabelSetError
    elif case == "incomplete":
        labels, error = str(tmp_path / "incomplete"), LabelSetError
        LabelSetWriter(labels, {"test": 1})  # started, never finished: no labelset.json
    elif case == "ghost image":
        labels = build_labelset(synthetic_labelset, str(tmp_path / "ghost"), 8, ghost=True)
    else:
        changes = {"micro_batch_size": 4, "batch_size": 8}
    with pytest.raises(error) as info:
        run_training(tiny_config(labels, out, **changes))
    expected = {"missing": "labelset.json", "incomplete": "labelset.json",
                "ghost image": "missing-image", "small batch": "at least 8"}[case]
    assert expected in str(info.value)
    assert not storage.exists(out)  # nothing was written: training never started


def test_cli_help_and_a_tiny_run_of_another_encoder_on_the_same_labels(labels8, tmp_path):
    done = subprocess.run([sys.executable, "-m", "training.run", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--labels" in done.stdout and "--workers" in done.stdout
    out = str(tmp_path / "clip")
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 1\nresize: 64\ncrop: 64\nhead_dim: 16\n")
    args = ["--backbone", "clip_vitb16", "--tiny", "--labels", labels8, "--out", out,
            "--config", str(config), "--set", "batch_size=8", "--set", "micro_batch_size=8",
            "--set", "loader_workers=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    encoder = load_backbone("clip_vitb16", weights=storage.join(out, "encoder.safetensors"),
                            tiny=True, device="cpu")
    assert encoder.dense_features(torch.rand(1, 3, 64, 64)).shape == (1, 4, 4, 32)
    bad = CliRunner().invoke(app, [*args, "--set", "epochz=1"])
    assert bad.exit_code == 2 and "unknown key 'epochz'" in bad.output
    missing = CliRunner().invoke(app, [*args, "--labels", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "labelset.json" in missing.output


@pytest.mark.integration
@pytest.mark.slow
def test_ray_train_two_workers_with_checkpoints_in_s3(ray_local, s3_bucket, synthetic_labelset):
    labels = build_labelset(synthetic_labelset, f"{s3_bucket}/data", 16)
    out = f"{s3_bucket}/runs/ray"
    # 16 pairs = one effective batch of 16 = 8 per worker: 1 step per epoch, 2 steps
    cfg = tiny_config(labels, out, batch_size=16, epochs=2, workers=2)
    result = run_training(cfg)
    assert result.error is None
    names = [u.rsplit("/", 1)[-1] for u in storage.ls(storage.join(out, "checkpoints"))]
    assert names == ["step_00000001.pt", "step_00000002.pt"]
    state = load_checkpoint(storage.join(out, "checkpoints", "step_00000002.pt"))
    assert state["step"] == 2 and state["identity"]["batch_size"] == 16
    metrics = storage.read_parquet(storage.join(out, "metrics.parquet")).to_pylist()
    assert [row["step"] for row in metrics] == [1, 2]
    assert all(np.isfinite(row["loss"]) for row in metrics)
    encoder = load_backbone("vits14", weights=storage.join(out, "encoder.safetensors"), tiny=True,
                            device="cpu")
    assert torch.equal(encoder.model.norm.weight, state["model"]["encoder.model.norm.weight"])
