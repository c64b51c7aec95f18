"""What a training run leaves behind besides the trained encoder: the initial encoder, the peak
memory, and the distractor mode and compile flag taking effect (tiny model, synthetic labels)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import training.loop as loop
from shared import storage
from shared.backbones import save_backbone
from training.checkpoints import check_identity, latest_checkpoint, load_checkpoint
from training.config import TrainConfig
from training.loop import train


@pytest.fixture(scope="module")
def labels8(tmp_path_factory, synthetic_labelset):
    root = str(tmp_path_factory.mktemp("ls8"))
    return synthetic_labelset(root, 8, size=(64, 64), seed=500, prefix="s", pairing="shared")


def tiny_config(labels: str, out: str, **changes) -> TrainConfig:
    """A tiny model on 56x56 crops, one micro-batch of 8 per step, no loader processes."""
    base = dict(labels=labels, out=out, backbone="vits14", tiny=True, weights=None, head_dim=32,
                resize=64, crop=56, batch_size=8, micro_batch_size=8, base_lr=1e-3 * 256 / 8,
                loader_workers=0, epochs=2)
    return TrainConfig(**{**base, **changes})


def test_init_export_is_the_encoder_before_the_first_step(labels8, tmp_path, monkeypatch):
    built = {}

    def recording_build(*args, **kwargs):
        model = loop_build(*args, **kwargs)
        built["state"] = {k: v.clone() for k, v in model.encoder.model.state_dict().items()}
        built["model"] = model
        return model

    loop_build = loop.build_model
    monkeypatch.setattr(loop, "build_model", recording_build)
    out = str(tmp_path / "run")
    result = train(tiny_config(labels8, out))
    init_uri = storage.join(out, "init.safetensors")
    init = safetensors.torch.load_file(init_uri)
    assert set(init) == set(built["state"])
    for name, tensor in built["state"].items():
        assert torch.equal(init[name], tensor), name
    # the same deterministic writer as encoder.safetensors: equal weights give equal bytes
    model = built["model"]
    model.encoder.model.load_state_dict(built["state"])
    again = str(tmp_path / "again.safetensors")
    save_backbone(model.encoder, again)
    assert storage.read_bytes(again) == storage.read_bytes(init_uri)
    trained = safetensors.torch.load_file(result.encoder_uri)
    changed = [n for n in trained if not torch.equal(trained[n], init[n])]
    assert changed and all(n.startswith(("blocks.", "norm.")) for n in changed)


def test_peak_memory_is_reported_per_step_and_in_the_result(labels8, tmp_path):
    out = str(tmp_path / "run")
    result = train(tiny_config(labels8, out))
    rows = storage.read_parquet(storage.join(out, "metrics.parquet")).to_pylist()
    peaks = [row["peak_memory_mb"] for row in rows]
    assert len(peaks) == 2 and all(p > 10 for p in peaks)  # peak RSS of this process on a CPU
    assert peaks == sorted(peaks)  # a peak never goes down
    assert result.peak_memory_bytes >= peaks[-1] * 2**20 > 0


def test_released_distractors_reach_the_step_and_the_checkpoint(labels8, tmp_path, monkeypatch):
    seen = []
    real_loss = loop.task_loss

    def recording_loss(net, *args, **kwargs):
        seen.append(args[4].clone())  # the support index of the micro-batch
        return real_loss(net, *args, **kwargs)

    monkeypatch.setattr(loop, "task_loss", recording_loss)
    out = str(tmp_path / "run")
    train(tiny_config(labels8, out, distractors="released"))
    assert len(seen) == 2
    for support in seen:
        assert support.shape == (8, 8) and support.dtype == torch.long
        assert torch.equal(support[:, 1:] // 4, (torch.arange(8) // 4)[:, None].expand(8, 7))
    state = load_checkpoint(latest_checkpoint(out))
    assert state["identity"]["distractors"] == "released"
    with pytest.raises(ValueError, match="distractors"):
        train(tiny_config(labels8, out, epochs=2, distractors="distinct", max_steps=1))


def test_a_checkpoint_without_a_newer_identity_key_resumes_with_its_default(labels8, tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_config(labels8, out)
    train(cfg.model_copy(update={"max_steps": 1}))
    uri = latest_checkpoint(out)
    state = load_checkpoint(uri)
    del state["identity"]["distractors"]  # written before the key existed
    check_identity(cfg, state, uri, 8, 1)
    with pytest.raises(ValueError, match="distractors"):
        check_identity(cfg.model_copy(update={"distractors": "released"}), state, uri, 8, 1)


def test_compile_flag_compiles_the_forward_the_step_calls(labels8, tmp_path, monkeypatch):
    # inductor's code generation takes ~40 s on this CPU: dynamo's eager backend runs the same
    # flag path (tracing, guards, the compiled module in the loop) in a few seconds
    compiled = []
    real_compile = torch.compile

    def eager_compile(module, **kwargs):
        compiled.append(module)
        return real_compile(module, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    out = str(tmp_path / "run")
    plain = train(tiny_config(labels8, str(tmp_path / "plain"), max_steps=1))
    result = train(tiny_config(labels8, out, compile_model=True, max_steps=1))
    assert len(compiled) == 1 and isinstance(compiled[0], loop.DIPModel)
    assert result.last_loss == pytest.approx(plain.last_loss, abs=1e-5)
