"""The lean step's plumbing: narrow label dtypes checked on the host, the move to the device,
TF32 and fused AdamW on CUDA, peak memory; the head's LayerNorm eps; fp16 with a loss scaler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import training.loop as loop
from shared import storage
from training.checkpoints import (
    check_identity,
    latest_checkpoint,
    load_checkpoint,
    run_identity,
)
from training.config import TrainConfig
from training.loop import Runtime, make_optimizer, train
from training.model import (
    HEAD_NORM_EPS,
    autocast,
    batch_to_device,
    build_model,
    check_label_values,
    fast_matmul,
    grad_scaler,
    label_dtype,
    make_head,
    optimizer_step,
    peak_memory_bytes,
)


@pytest.mark.parametrize(("classes", "ignore", "dtype"), [
    (256, None, torch.uint8), (255, 255, torch.uint8), (256, 255, torch.uint8),
    (1000, None, torch.int16), (200, 300, torch.int16), (150, -1, torch.int16),
    (40000, None, torch.int32), (1000, 65535, torch.int32),
])
def test_label_dtype_is_the_smallest_that_holds_classes_and_ignore_index(classes, ignore, dtype):
    assert label_dtype(classes, ignore) == dtype


def test_label_check_names_the_bad_value():
    check_label_values(torch.tensor([0, 4, 255]), 5, 255)
    with pytest.raises(ValueError, match="batch query_labels hold 5"):
        check_label_values(torch.tensor([0, 5]), 5, 255, name="batch query_labels")
    with pytest.raises(ValueError, match="hold -1"):
        check_label_values(torch.tensor([-1, 0]), 5, None)


def test_batch_to_device_narrows_labels_and_keeps_the_rest():
    labels = torch.tensor([[[0, 999], [3, 7]]])  # int64, as the loader collates them
    batch = {"query": torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "query_labels": labels,
             "positive_labels": labels.to(torch.int32), "support": torch.tensor([[0]])}
    moved = batch_to_device(batch, torch.device("cpu"), 1000)
    assert moved["query_labels"].dtype == moved["positive_labels"].dtype == torch.int16
    assert torch.equal(moved["query_labels"].long(), labels)
    assert moved["query"].dtype == torch.uint8 and moved["support"].dtype == torch.long
    packed = batch_to_device({"query_labels": torch.from_numpy(labels.numpy().astype("uint16"))},
                             torch.device("cpu"), 1000)  # packed label maps are uint16
    assert packed["query_labels"].dtype == torch.int16
    assert torch.equal(packed["query_labels"].long(), labels)
    with pytest.raises(ValueError, match="batch query_labels hold 999"):
        batch_to_device(batch, torch.device("cpu"), 256)  # would wrap around in uint8


def test_fast_matmul_is_a_no_op_on_cpu_and_peak_memory_is_positive():
    before = torch.backends.cuda.matmul.allow_tf32
    with fast_matmul(torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32 == before
    assert peak_memory_bytes(torch.device("cpu")) > 50 * 2**20  # torch alone is larger


def test_optimizer_on_cpu_is_not_fused():
    optimizer, _ = make_optimizer(nn.Linear(2, 2), TrainConfig(), 4)
    assert not optimizer.defaults.get("fused")


@pytest.mark.gpu
def test_cuda_gets_fused_adamw_tf32_and_its_own_peak_memory():
    device = torch.device("cuda")
    optimizer, _ = make_optimizer(nn.Linear(2, 2).to(device), TrainConfig(), 4)
    assert optimizer.defaults["fused"] is True
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with fast_matmul(device):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    torch.cuda.reset_peak_memory_stats(device)
    block = torch.empty(2**26, dtype=torch.uint8, device=device)
    assert peak_memory_bytes(device) >= block.numel()
    moved = batch_to_device({"query_labels": torch.ones(1, 2, 2, dtype=torch.long)}, device, 10)
    assert moved["query_labels"].dtype == torch.uint8 and moved["query_labels"].is_cuda


# --------------------------------------------------------------------------- head eps, precision


def test_the_head_norm_eps_is_the_released_one_and_not_a_weight():
    assert make_head(384)[-1].eps == 1e-6 == HEAD_NORM_EPS == TrainConfig().head_norm_eps
    new = build_model("vits14", weights=None, tiny=True, head_dim=16, device="cpu")
    old = build_model("vits14", weights=None, tiny=True, head_dim=16, device="cpu",
                      head_norm_eps=1e-5)  # the eps of heads built before it was set
    assert new.head[-1].eps == 1e-6 and old.head[-1].eps == 1e-5
    assert old.head.state_dict().keys() == new.head.state_dict().keys()
    new.load_trainable_state(old.trainable_state())  # a checkpoint of either loads into the other
    for name, value in old.trainable_state().items():
        assert torch.equal(new.trainable_state()[name], value), name


def test_a_checkpoint_from_before_the_eps_was_recorded_resumes_only_with_its_eps():
    cfg = TrainConfig(labels="x", out="y", weights=None)
    recorded = run_identity(cfg, 8, 1)
    state = {"identity": {k: v for k, v in recorded.items() if k != "head_norm_eps"}}
    with pytest.raises(ValueError, match="head_norm_eps: checkpoint 1e-05 != now 1e-06"):
        check_identity(cfg, state, "step_00000001.pt", 8, 1)
    check_identity(cfg.model_copy(update={"head_norm_eps": 1e-5}), state, "step_00000001.pt", 8, 1)
    now = {"identity": recorded}
    check_identity(cfg, now, "step_00000001.pt", 8, 1)  # a checkpoint that records it: as recorded


def test_only_fp16_gets_a_loss_scaler_and_a_cpu_gets_no_autocast():
    cpu = torch.device("cpu")
    assert grad_scaler("bf16", cpu) is None and grad_scaler("fp32", cpu) is None
    assert isinstance(grad_scaler("fp16", cpu), torch.amp.GradScaler)
    for precision in ("bf16", "fp16", "fp32"):
        with autocast(precision, cpu):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_the_scaler_step_scales_and_skips_a_step_with_inf_gradients():
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scaler = grad_scaler("fp16", torch.device("cpu"))
    x = torch.ones(4, 3)
    scaler.scale(layer(x).sum()).backward()
    assert torch.allclose(layer.bias.grad, torch.full((2,), 4.0 * 65536))  # scaled gradients
    before = layer.weight.detach().clone()
    assert optimizer_step(optimizer, scaler) == 65536.0
    assert not torch.equal(layer.weight, before)  # unscaled and applied
    optimizer.zero_grad()
    scaler.scale(layer(x).sum() * float("inf")).backward()
    before = layer.weight.detach().clone()
    assert optimizer_step(optimizer, scaler) == 65536.0
    assert torch.equal(layer.weight, before) and scaler.get_scale() == 32768.0  # skipped, halved
    plain = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer.weight.grad = torch.ones_like(layer.weight)
    assert optimizer_step(plain, None) == 1.0 and not torch.equal(layer.weight, before)


@pytest.fixture(scope="module")
def labels8(tmp_path_factory, synthetic_labelset):
    root = str(tmp_path_factory.mktemp("ls8"))
    return synthetic_labelset(root, 8, size=(64, 64), seed=700, prefix="p", pairing="shared")


def tiny_run(labels: str, out: str, **changes) -> TrainConfig:
    """A tiny model on 56 x 56 crops, 8 pairs, one optimizer step per epoch."""
    base = dict(labels=labels, out=out, backbone="vits14", tiny=True, weights=None, head_dim=32,
                resize=64, crop=56, batch_size=8, micro_batch_size=8, base_lr=1e-3 * 256 / 8,
                loader_workers=0, epochs=2, checkpoint_every=1)
    return TrainConfig(**{**base, **changes})


def poison_first_step(monkeypatch, seen: dict):
    """Make the first backward pass's head gradient inf (an fp16 overflow), once."""
    real = loop.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        weight = model.head[0].weight
        calls = []

        def overflow_once(grad):
            calls.append(1)
            return grad * float("inf") if len(calls) == 1 else grad

        weight.register_hook(overflow_once)
        seen["before"] = weight.detach().clone()
        return model

    monkeypatch.setattr(loop, "build_model", build)


def test_fp16_training_skips_an_overflowing_step_and_resumes_its_loss_scale(
        labels8, tmp_path, monkeypatch):
    out, seen, heads = str(tmp_path / "run"), {}, []
    poison_first_step(monkeypatch, seen)
    train(tiny_run(labels8, out, precision="fp16", max_steps=1),
          on_step=lambda step, model: heads.append(model.head[0].weight.detach().clone()))
    assert torch.equal(heads[0], seen["before"])  # the inf step changed nothing
    state = load_checkpoint(latest_checkpoint(out))
    assert state["scaler"]["scale"] == 32768.0  # halved after the skipped step
    monkeypatch.undo()
    train(tiny_run(labels8, out, precision="fp16"),  # resumes at step 1
          on_step=lambda step, model: heads.append(model.head[0].weight.detach().clone()))
    assert not torch.equal(heads[1], heads[0])  # a finite step applies
    rows = storage.read_parquet(storage.join(out, "metrics.parquet")).to_pylist()
    assert [r["loss_scale"] for r in rows] == [65536.0, 32768.0]  # the scale came back


def test_bf16_training_has_no_loss_scale_and_the_head_takes_the_configured_eps(labels8, tmp_path):
    out, eps = str(tmp_path / "run"), []
    train(tiny_run(labels8, out, max_steps=1, head_norm_eps=1e-4),
          on_step=lambda step, model: eps.append(model.head[-1].eps))
    assert eps == [1e-4]
    assert "scaler" not in load_checkpoint(latest_checkpoint(out))
    rows = storage.read_parquet(storage.join(out, "metrics.parquet")).to_pylist()
    assert "loss_scale" not in rows[0]


@pytest.mark.gpu
def test_fp16_on_cuda_autocasts_to_half_and_trains(labels8, tmp_path):
    device = torch.device("cuda")
    for precision, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", None)]:
        with autocast(precision, device):
            out = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        assert out.dtype == (dtype or torch.float32)
    out = str(tmp_path / "run")
    result = train(tiny_run(labels8, out, precision="fp16"), Runtime(device=device))
    rows = storage.read_parquet(storage.join(out, "metrics.parquet")).to_pylist()
    assert torch.isfinite(torch.tensor(result.last_loss)) and rows[-1]["loss_scale"] > 0
