"""The training model (tiny, random init): freezing, head, gradients, optimizer, schedule, export."""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from shared.backbones import (
    TINY_ARGS,
    Backbone,
    get_spec,
    list_backbones,
    load_backbone,
    save_backbone,
)
from training.config import TrainConfig
from training.episodes import sample_support
from training.incontext import incontext_loss, patchify_labels, soft_nn_predict
from training.loop import cosine_factor, make_optimizer, param_groups
from training.model import DIPModel, build_model, freeze_encoder, make_head, task_loss


def _tasks(model: DIPModel, batch: int = 8, classes: int = 5, seed: int = 0):
    p = model.patch_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2 * batch, 3, 4 * p, 4 * p, generator=gen)
    labels = torch.randint(0, classes, (2 * batch, 4 * p, 4 * p), generator=gen)
    support = sample_support(batch, 7, gen)
    return images[:batch], labels[:batch], images[batch:], labels[batch:], support, classes


@pytest.mark.parametrize("name", list_backbones())
def test_gradients_reach_exactly_the_unfrozen_parameters(name):
    torch.manual_seed(0)
    model = build_model(name, weights=None, tiny=True, head_dim=48, device="cpu")
    depth = len(model.encoder.blocks)
    q, ql, s, sl, support, classes = _tasks(model)
    loss = task_loss(model, q, ql, s, sl, support, classes, model.patch_size)
    assert torch.isfinite(loss)
    loss.backward()
    live = {f"encoder.model.blocks.{depth - k}." for k in (1, 2, 3)} | {"encoder.model.norm.", "head."}
    for pname, param in model.named_parameters():
        should_train = any(pname.startswith(prefix) for prefix in live)
        assert param.requires_grad == should_train, pname
        if should_train:
            assert param.grad is not None and param.grad.abs().sum() > 0, pname
        else:
            assert param.grad is None, pname


@pytest.mark.parametrize("depth", [4, 12, 24])
def test_last_three_blocks_of_any_depth(depth):
    spec = get_spec("vitl14")
    timm_model = timm.create_model(spec.arch, num_classes=0, dynamic_img_size=True,
                                   **{**TINY_ARGS, "depth": depth, "embed_dim": 16})
    encoder = Backbone(spec, timm_model)
    names = freeze_encoder(encoder, 3)
    blocks = {n.split(".")[2] for n in names if n.startswith("model.blocks.")}
    assert blocks == {str(depth - 3), str(depth - 2), str(depth - 1)}
    assert {"model.norm.weight", "model.norm.bias"} <= set(names)
    assert all(n.startswith(("model.blocks.", "model.norm.")) for n in names)
    with pytest.raises(ValueError, match="has 4"):
        freeze_encoder(Backbone(spec, timm.create_model(spec.arch, num_classes=0, **TINY_ARGS)), 5)


def test_head_is_the_released_mlp():
    head = make_head(384)
    assert [type(m) for m in head] == [nn.Linear, nn.GELU, nn.Linear, nn.LayerNorm]
    assert (head[0].in_features, head[0].out_features) == (384, 7 * 384)
    assert (head[2].in_features, head[2].out_features) == (7 * 384, 6144)
    assert head[3].normalized_shape == (6144,)


def test_query_and_support_pass_through_the_same_encoder_and_head():
    torch.manual_seed(0)
    model = build_model("vits14", weights=None, tiny=True, head_dim=24, device="cpu")
    q, ql, s, sl, support, classes = _tasks(model)
    q.requires_grad_(True)
    s.requires_grad_(True)
    batches = []
    embed = model.encoder.model.patch_embed  # the encoder's first module
    embed.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    model.head.register_forward_hook(lambda mod, args, out: batches.append(out.shape))
    task_loss(model, q, ql, s, sl, support, classes, model.patch_size).backward()
    assert batches == [16, (16, 16, 24)]  # one pass of the 8 queries and 8 positives together
    assert q.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


def test_trainable_state_round_trip():
    torch.manual_seed(0)
    a = build_model("vits14", weights=None, tiny=True, head_dim=16, device="cpu")
    torch.manual_seed(1)
    b = build_model("vits14", weights=None, tiny=True, head_dim=16, device="cpu")
    state = a.trainable_state()
    assert set(state) == {n for n, p in a.named_parameters() if p.requires_grad}
    b.load_trainable_state(state)
    for name, tensor in state.items():
        assert torch.equal(b.get_parameter(name), tensor)
    with pytest.raises(ValueError, match="missing"):
        b.load_trainable_state({})


def test_weight_decay_spares_biases_and_one_dimensional_parameters():
    torch.manual_seed(0)
    model = build_model("vits14", weights=None, tiny=True, head_dim=16, device="cpu")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | spared == trainable and not decayed & spared
    assert "head.0.weight" in decayed and "head.0.bias" in spared and "head.3.weight" in spared
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_released_learning_rate_and_cosine_schedule():
    cfg = TrainConfig()
    assert cfg.lr == pytest.approx(1.5e-7 * 384 / 256)
    assert cfg.betas == (0.9, 0.95) and cfg.epochs == 5 and cfg.accumulation_steps(1) == 12
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0)
    assert cosine_factor(3, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    model = nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, TrainConfig(base_lr=256.0, batch_size=8,
                                                             micro_batch_size=8), 4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([8.0 * cosine_factor(t, 4) for t in range(4)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_exported_encoder_loads_in_the_registry_and_in_plain_timm(tmp_path):
    torch.manual_seed(0)
    model = build_model("vits14", weights=None, tiny=True, head_dim=16, device="cpu")
    with torch.no_grad():
        model.encoder.blocks[-1].mlp.fc1.weight.add_(1.0)  # as if trained
    path = str(tmp_path / "encoder.safetensors")
    save_backbone(model.encoder, path)
    images = torch.rand(2, 3, 28, 28)
    expected = model.encoder.dense_features(images)
    loaded = load_backbone("vits14", weights=path, tiny=True, device="cpu")
    assert torch.allclose(loaded.dense_features(images), expected, atol=1e-6)
    plain = timm.create_model(get_spec("vits14").arch, num_classes=0, dynamic_img_size=True,
                              **TINY_ARGS)
    plain.load_state_dict(safetensors.torch.load_file(path), strict=True)
    assert torch.equal(plain.blocks[-1].mlp.fc1.weight, model.encoder.blocks[-1].mlp.fc1.weight)


def _gathered_task_loss(model, q, ql, s, sl, support, classes, patch):
    """The step as first written: each task gathers its support keys, then normalises them."""
    b, n_support = support.shape
    feats = model(torch.cat([q, s]))  # (2B,N,E)
    query, keys = feats[:b], feats[b:]
    values = patchify_labels(sl, classes, patch)  # (B,N,C)
    n = keys.shape[1]
    pred = soft_nn_predict(query, keys[support].reshape(b, n_support * n, -1),
                           values[support].reshape(b, n_support * n, -1), 0.07)
    return incontext_loss(pred, ql, patch)


def _loss_and_grads(model, loss_fn, *args):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, *args)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_lean_step_gives_the_loss_and_gradients_of_the_gathered_step():
    torch.manual_seed(0)
    model = build_model("vits14", weights=None, tiny=True, head_dim=48, device="cpu")
    q, ql, s, sl, support, classes = _tasks(model)
    p = model.patch_size
    old_loss, old = _loss_and_grads(model, _gathered_task_loss, q, ql, s, sl, support, classes, p)
    small = dict(ql=ql.to(torch.uint8), sl=sl.to(torch.int16))  # the loop's label dtypes

    def lean(m, *args):
        return task_loss(m, q, small["ql"], s, small["sl"], support, classes, p,
                         check_labels=False)

    new_loss, new = _loss_and_grads(model, lean)
    assert torch.allclose(new_loss, old_loss, atol=1e-6, rtol=0)
    assert set(new) == set(old) and len(new) > 4
    for name, grad in old.items():
        assert torch.allclose(new[name], grad, atol=1e-6, rtol=0), name
    own_only = support[:, :1].repeat(1, 8)  # every task sees only its own positive
    other_loss = task_loss(model, q, ql, s, sl, own_only, classes, p)
    # the support index matters: far more than the 1e-6 the two paths may differ by
    assert (other_loss - old_loss).abs() > 1e-5
