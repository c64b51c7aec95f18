"""Contract tests over every registered backbone: tiny random-init variants on CPU, no network."""

from __future__ import annotations

import functools
import re
import uuid

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from shared import backbones
from shared.backbones import (
    BACKBONES,
    Backbone,
    WeightsError,
    create_timm_model,
    get_spec,
    list_backbones,
    load_backbone,
    save_backbone,
)

NAMES = list_backbones()
# Two input sizes per patch size; the second is not square, so a row/column mix-up shows.
SIZES = {14: [(28, 28), (42, 28)], 16: [(32, 32), (48, 32)]}
EXPECTED_TIMM_IDS = {
    "vits14": "vit_small_patch14_reg4_dinov2.lvd142m",
    "vitb14": "vit_base_patch14_reg4_dinov2.lvd142m",
    "vitl14": "vit_large_patch14_reg4_dinov2.lvd142m",
    "clip_vitb16": "vit_base_patch16_clip_quickgelu_224.openai",
    "mae_vitb16": "vit_base_patch16_224.mae",
    "dinov3_vits16": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_vitl16": "vit_large_patch16_dinov3.lvd1689m",
}
DINOV3 = [n for n in EXPECTED_TIMM_IDS if n.startswith("dinov3_")]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def expected_prefix(name: str) -> int:
    """CLS, plus 4 register tokens for DINOv2R and DINOv3."""
    return 1 if name in ("clip_vitb16", "mae_vitb16") else 5


@functools.cache
def tiny(name: str) -> Backbone:
    """A shared tiny backbone per name; tests must not modify it."""
    torch.manual_seed(0)
    return load_backbone(name, weights=None, tiny=True, device="cpu")


def fresh(name: str, seed: int) -> Backbone:
    torch.manual_seed(seed)
    return load_backbone(name, weights=None, tiny=True, device="cpu")


def images(name: str, index: int = 0, batch: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = SIZES[get_spec(name).patch_size][index]
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def hand_normalise(name: str, x: torch.Tensor) -> torch.Tensor:
    mean, std = IMAGENET if name != "clip_vitb16" else OPENAI_CLIP
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def full_on_meta(name: str) -> torch.nn.Module:
    """The full-size architecture without allocating memory."""
    with torch.device("meta"):
        return create_timm_model(name)


def block_agnostic_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys with block indices dropped (a tiny model has fewer blocks)."""
    return {re.sub(r"^blocks\.\d+\.", "blocks.*.", k) for k in model.state_dict()}


# ---- registry -------------------------------------------------------------------------------


def test_registry_holds_the_designed_backbones():
    assert set(NAMES) == set(EXPECTED_TIMM_IDS)
    assert {n: BACKBONES[n].timm_id for n in NAMES} == EXPECTED_TIMM_IDS


def test_unknown_backbone_lists_known_names():
    with pytest.raises(KeyError) as err:
        get_spec("vitz99")
    for name in NAMES:
        assert name in str(err.value)
    with pytest.raises(KeyError, match="vitz99"):
        load_backbone("vitz99", weights=None, tiny=True, device="cpu")


@pytest.mark.parametrize("name", NAMES)
def test_spec_matches_timm(name):
    spec = get_spec(name)
    assert spec.timm_id in timm.list_pretrained()
    cfg = timm.models.get_pretrained_cfg(spec.timm_id)
    assert spec.mean == pytest.approx(cfg.mean) and spec.std == pytest.approx(cfg.std)
    assert spec.hub_id == cfg.hf_hub_id
    model = full_on_meta(name)
    assert model.patch_embed.patch_size == (spec.patch_size, spec.patch_size)
    assert model.num_prefix_tokens == expected_prefix(name)


@pytest.mark.parametrize("name", NAMES)
def test_spec_input_sizes_follow_the_design(name):
    from labeling.config import LabelConfig

    spec = get_spec(name)
    assert spec.label_input_size == 32 * spec.patch_size  # the 32 x 32 grid of DiffCut's tokens
    assert spec.label_input_size == {14: 448, 16: 512}[spec.patch_size]
    # labeling feeds the encoder at the spec's size unless the config says otherwise
    assert LabelConfig(backbone=name).feature_size == spec.label_input_size
    assert LabelConfig(backbone=name, feature_size=None).feature_size == spec.label_input_size
    assert LabelConfig(backbone=name, feature_size=4 * spec.patch_size).feature_size == \
        4 * spec.patch_size
    assert spec.eval_input_size == {14: 504, 16: 512}[spec.patch_size]
    mean, std = OPENAI_CLIP if name == "clip_vitb16" else IMAGENET
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)


@pytest.mark.parametrize("name", NAMES)
def test_tiny_is_the_same_family(name):
    small, full = tiny(name).model, full_on_meta(name)
    assert type(small) is type(full)
    assert block_agnostic_keys(small) == block_agnostic_keys(full)
    assert (small.embed_dim, len(small.blocks), small.blocks[0].attn.num_heads) == (32, 4, 2)
    assert small.num_prefix_tokens == full.num_prefix_tokens
    assert type(small.norm_pre) is type(full.norm_pre)  # CLIP's pre-norm
    assert type(small.blocks[0].mlp.act) is type(full.blocks[0].mlp.act)  # CLIP's QuickGELU
    if hasattr(full.blocks[0], "ls1"):  # DINOv2's layer scale (DINOv3's gammas are in the keys)
        assert type(small.blocks[0].ls1) is type(full.blocks[0].ls1)


def layer_scale_gammas(model: torch.nn.Module) -> list[str]:
    """State-dict keys of LayerScale gammas: timm's ViT ``ls1.gamma``, Eva's ``gamma_1``."""
    return [k for k in model.state_dict() if k.endswith(("ls1.gamma", "ls2.gamma", "gamma_1",
                                                         "gamma_2"))]


@pytest.mark.parametrize("name", NAMES)
def test_layer_scale_flag_matches_the_architecture(name):
    full, small = full_on_meta(name), tiny(name).model
    assert bool(layer_scale_gammas(full)) == get_spec(name).layer_scale
    for key in layer_scale_gammas(small):  # a tiny variant's blocks are live from the start
        assert torch.all(small.state_dict()[key] == backbones.TINY_LAYER_SCALE), key


@pytest.mark.parametrize("name", DINOV3)
def test_dinov3_is_timms_rotary_vit_with_four_registers_at_patch_16(name):
    spec, full = get_spec(name), full_on_meta(name)
    assert type(full).__name__ == "Eva" and full.pos_embed is None  # rotary positions only
    assert full.num_prefix_tokens == 5 and full.reg_token.shape[1] == 4
    assert spec.patch_size == 16 and spec.layer_scale
    assert (spec.mean, spec.std) == (IMAGENET[0], IMAGENET[1])
    size = name.removeprefix("dinov3_vit")[0]
    assert (full.embed_dim, len(full.blocks)) == {"s": (384, 12), "b": (768, 12),
                                                  "l": (1024, 24)}[size]


# ---- features -------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_feature_shapes_and_values(name, index):
    backbone, x = tiny(name), images(name, index)
    p = get_spec(name).patch_size
    with torch.no_grad():
        dense, glob = backbone.features(x)
    assert dense.shape == (2, x.shape[2] // p, x.shape[3] // p, 32)
    assert glob.shape == (2, 32)
    assert torch.isfinite(dense).all() and torch.isfinite(glob).all()


@pytest.mark.parametrize("name", NAMES)
def test_features_are_normalised_timm_tokens_without_prefix(name):
    backbone, x = tiny(name), images(name, 1)
    h, w = x.shape[2] // backbone.patch_size, x.shape[3] // backbone.patch_size
    prefix = expected_prefix(name)
    with torch.no_grad():
        dense, glob = backbone.features(x)
        ref = backbone.model.forward_features(hand_normalise(name, x))  # (B, prefix + h*w, D)
        raw = backbone.model.forward_features(x)
        assert torch.allclose(backbone.dense_features(x), dense)
        assert torch.allclose(backbone.global_features(x), glob)
        assert torch.allclose(backbone(x), dense)
    assert ref.shape[1] == prefix + h * w
    assert torch.allclose(glob, ref[:, 0], atol=1e-6)
    for i, j in [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (1, 0)]:
        assert torch.allclose(dense[:, i, j], ref[:, prefix + i * w + j], atol=1e-6)
    # Without the mean/std step the features would be clearly different.
    assert (dense - raw[:, prefix:].reshape(dense.shape)).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_dense_features_come_after_the_final_norm(name):
    backbone, x = tiny(name), images(name)
    norm = backbone.norm
    # At init the final LayerNorm is affine-free, so its output is standardised per token.
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    seen = []
    hook = backbone.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            dense, glob = backbone.features(x)
    finally:
        hook.remove()
    assert len(seen) == 1  # one forward pass for both outputs
    tokens = F.layer_norm(seen[0], (32,), norm.weight, norm.bias, norm.eps)  # (B, P + h*w, D)
    prefix = expected_prefix(name)
    assert torch.allclose(dense.flatten(1, 2), tokens[:, prefix:], atol=1e-5)
    assert torch.allclose(glob, tokens[:, 0], atol=1e-5)
    assert torch.allclose(dense.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(dense.var(-1, unbiased=False), torch.ones(()), atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_normalize_uses_the_spec_statistics(name):
    backbone = tiny(name)
    stats = OPENAI_CLIP if name == "clip_vitb16" else IMAGENET
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    p = backbone.patch_size
    at_mean = mean.expand(1, 3, p, p).clone()
    assert torch.allclose(backbone.normalize(at_mean), torch.zeros(()), atol=1e-6)
    assert torch.allclose(backbone.normalize(at_mean + std), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    backbone, x = fresh(name, seed=1), images(name)
    dense, glob = backbone.features(x)
    weights = torch.randn(dense.shape, generator=torch.Generator().manual_seed(2))
    ((dense * weights).sum() + (glob * weights[:, 0, 0]).sum()).backward()
    for key, param in backbone.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, key


@pytest.mark.parametrize("name", NAMES)
def test_wrong_inputs_fail_clearly(name):
    backbone = tiny(name)
    p = backbone.patch_size
    with pytest.raises(ValueError, match=f"patch size {p}.*{p + 2}x{2 * p}"):
        backbone.dense_features(torch.rand(1, 3, p + 2, 2 * p))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone.dense_features(torch.rand(1, 2 * p, 2 * p, 3))
    with pytest.raises(TypeError, match="float"):
        backbone.global_features(torch.zeros(1, 3, p, p, dtype=torch.uint8))


# ---- weights ----------------------------------------------------------------------------------


def assert_same_outputs(a: Backbone, b: Backbone, name: str) -> None:
    x = images(name, 1, seed=3)
    with torch.no_grad():
        da, ga = a.features(x)
        db, gb = b.features(x)
    assert torch.equal(da, db) and torch.equal(ga, gb)


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_roundtrip(name, tmp_path):
    original, path = fresh(name, seed=4), tmp_path / "new_folder" / "enc.safetensors"
    save_backbone(original, path)
    reloaded = fresh(name, seed=5)  # a different random init, replaced by the file's weights
    torch.manual_seed(5)
    loaded = load_backbone(name, weights=path, tiny=True, device="cpu")
    assert_same_outputs(original, loaded, name)
    x = images(name)
    with torch.no_grad():
        assert not torch.allclose(reloaded.dense_features(x), loaded.dense_features(x))


@pytest.mark.parametrize("name", NAMES)
def test_saved_file_loads_into_plain_timm(name, tmp_path):
    original, path = fresh(name, seed=6), tmp_path / "enc.safetensors"
    save_backbone(original, path)
    spec = get_spec(name)
    model = timm.create_model(
        spec.arch, pretrained=False, num_classes=0, dynamic_img_size=True,
        embed_dim=32, depth=4, num_heads=2,
    )
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)
    x = images(name)
    with torch.no_grad():
        assert torch.equal(model.forward_features(hand_normalise(name, x)), original.tokens(x))


WRAPPERS = {
    "raw": lambda sd, bb: sd,
    "state_dict+module.": lambda sd, bb: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "model+backbone_state": lambda sd, bb: {"model": bb.state_dict(), "epoch": 3},
    "encoder+backbone.": lambda sd, bb: {"encoder": {f"backbone.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize(
    "name, wrapper",
    [(name, "raw") for name in NAMES] + [("vits14", w) for w in WRAPPERS if w != "raw"],
)
def test_torch_state_dict_files_load(name, wrapper, tmp_path):
    original, path = fresh(name, seed=7), tmp_path / "enc.pt"
    torch.save(WRAPPERS[wrapper](original.model.state_dict(), original), path)
    torch.manual_seed(8)
    loaded = load_backbone(name, weights=str(path), tiny=True, device="cpu")
    assert_same_outputs(original, loaded, name)


def test_original_dinov2_checkpoint_layout_is_converted(tmp_path):
    original, path = fresh("vits14", seed=9), tmp_path / "dinov2_original.pth"
    sd = dict(original.model.state_dict())
    pos0 = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(0))
    # DINOv2's own layout: a position for CLS inside pos_embed, "register_tokens", a mask token.
    sd["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
    sd["cls_token"] = sd["cls_token"] - pos0
    sd["register_tokens"] = sd.pop("reg_token")
    sd["mask_token"] = torch.zeros(1, 32)
    torch.save(sd, path)
    loaded = load_backbone("vits14", weights=path, tiny=True, device="cpu")
    x = images("vits14")
    with torch.no_grad():
        assert torch.allclose(loaded.dense_features(x), original.dense_features(x), atol=1e-5)


@pytest.mark.parametrize("name", DINOV3)
def test_original_dinov3_checkpoint_layout_is_converted(name, tmp_path):
    original, path = fresh(name, seed=11), tmp_path / "dinov3_original.pth"
    sd = {}
    for key, value in original.model.state_dict().items():
        # DINOv3's own names: storage tokens, ls1/ls2 gammas; plus its pretraining extras
        key = key.replace("reg_token", "storage_tokens")
        key = key.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        sd[key] = value
    sd["mask_token"] = torch.zeros(1, 32)
    sd["rope_embed.periods"] = torch.ones(4)
    torch.save(sd, path)
    loaded = load_backbone(name, weights=path, tiny=True, device="cpu")
    assert_same_outputs(original, loaded, name)


@pytest.mark.parametrize("name", NAMES)
def test_missing_file_names_the_path(name, tmp_path):
    path = tmp_path / "nowhere" / "enc.safetensors"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_backbone(name, weights=path, tiny=True, device="cpu")


def test_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=str(path)):
        load_backbone("vits14", weights=path, tiny=True, device="cpu")
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match=str(bad)):
        load_backbone("vits14", weights=bad, tiny=True, device="cpu")


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_state_dict_names_the_keys(name, tmp_path):
    sd = dict(tiny(name).model.state_dict())
    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in sd.items() if k != "norm.weight"}, missing)
    with pytest.raises(WeightsError, match=r"(?s)missing\.pt.*missing keys: norm\.weight"):
        load_backbone(name, weights=missing, tiny=True, device="cpu")
    extra = tmp_path / "extra.safetensors"
    safetensors.torch.save_file({**sd, "head.weight": torch.zeros(3, 32)}, extra)
    with pytest.raises(WeightsError, match=r"(?s)extra\.safetensors.*unexpected keys: head\.w"):
        load_backbone(name, weights=extra, tiny=True, device="cpu")
    shaped = tmp_path / "shaped.pt"
    torch.save({**sd, "cls_token": torch.zeros(1, 1, 16)}, shaped)
    with pytest.raises(WeightsError, match=r"cls_token \(file \(1, 1, 16\), model \(1, 1, 32\)\)"):
        load_backbone(name, weights=shaped, tiny=True, device="cpu")


def test_save_needs_the_safetensors_suffix(tmp_path):
    with pytest.raises(ValueError, match="enc.pt"):
        save_backbone(tiny("vits14"), tmp_path / "enc.pt")


def test_roundtrip_through_a_storage_uri():
    original = fresh("mae_vitb16", seed=10)
    uri = f"memory://backbones-{uuid.uuid4().hex[:8]}/enc.safetensors"
    save_backbone(original, uri)
    loaded = load_backbone("mae_vitb16", weights=uri, tiny=True, device="cpu")
    assert_same_outputs(original, loaded, "mae_vitb16")
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_backbone("mae_vitb16", weights=uri.replace("enc", "nothing"), tiny=True, device="cpu")


@pytest.mark.parametrize("name", NAMES)
def test_hub_weights_come_from_the_pretrained_timm_id(name, monkeypatch):
    calls = []

    def fake_create_model(model_id, **kwargs):
        calls.append((model_id, kwargs))
        return timm.models.create_model(
            get_spec(name).arch, num_classes=0, dynamic_img_size=True, **backbones.TINY_ARGS
        )

    monkeypatch.setattr(backbones.timm, "create_model", fake_create_model)
    backbone = load_backbone(name, weights="hub", device="cpu")
    expected_kwargs = {"pretrained": True, "num_classes": 0, "dynamic_img_size": True}
    assert calls == [(EXPECTED_TIMM_IDS[name], expected_kwargs)]
    assert isinstance(backbone, Backbone) and not backbone.training


def test_hub_failure_says_what_it_tried(monkeypatch):
    def offline(model_id, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(backbones.timm, "create_model", offline)
    hub = "timm/vit_small_patch14_reg4_dinov2.lvd142m"
    with pytest.raises(RuntimeError, match=f"{hub}.*local weight file"):
        load_backbone("vits14", device="cpu")
