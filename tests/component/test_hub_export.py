"""The model hub folder of an encoder: timm loads it offline, with the same weights and outputs."""

from __future__ import annotations

import json
import re
import socket

import pytest
import timm
import torch
import yaml

from shared import storage
from shared.backbones import get_spec, list_backbones, load_backbone, save_backbone
from shared.hub_export import WEIGHTS_NAME, save_hub_export

TRAIN = {"backbone": "x", "crop": 112, "resize": 128, "epochs": 5, "base_lr": 1.5e-07}
TABLE = "| encoder | dataset | mean |\n|---|---|---:|\n| x | voc | 81.0 |\n"


@pytest.fixture
def offline(monkeypatch):
    """No connection leaves this process while a test loads a hub folder."""
    def refuse(self, address):
        raise OSError(f"offline test: no connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def export(name: str, folder, **kwargs):
    torch.manual_seed(0)
    backbone = load_backbone(name, None, tiny=True, device="cpu")
    save_hub_export(backbone, str(folder), **kwargs)
    return backbone, json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("name", list_backbones())
def test_timm_loads_the_folder_offline_with_the_same_outputs(name, tmp_path, offline):
    folder = tmp_path / "encoder-hub"
    backbone, config = export(name, folder, train_config=TRAIN)
    spec = get_spec(name)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", WEIGHTS_NAME]
    assert config["architecture"] == spec.arch and config["num_classes"] == 0
    pcfg = config["pretrained_cfg"]
    assert pcfg["architecture"] == spec.arch and pcfg["num_classes"] == 0
    assert pcfg["input_size"] == [3, 112, 112] and pcfg["crop_pct"] == 112 / 128
    assert pcfg["mean"] == list(spec.mean) and pcfg["std"] == list(spec.std)
    native = list(timm.models.get_pretrained_cfg(spec.timm_id).input_size[1:])
    assert config["model_args"] == {"num_classes": 0, "global_pool": "token",
                                    "dynamic_img_size": True, "img_size": native,
                                    "embed_dim": 32, "depth": 4, "num_heads": 2}
    assert config["dip"]["tiny"] is True and config["dip"]["backbone"] == name
    again = tmp_path / "again.safetensors"
    save_backbone(backbone, again)  # the hub weights are the encoder export, byte for byte
    assert (folder / WEIGHTS_NAME).read_bytes() == again.read_bytes()

    by_file = timm.create_model(config["architecture"], pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(folder / WEIGHTS_NAME)),
                                **config["model_args"])
    by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True)
    x = torch.rand(2, 3, 2 * spec.patch_size, 3 * spec.patch_size,
                   generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, normalised = backbone.tokens(x), backbone.normalize(x)
        for model in (by_file, by_folder):
            assert torch.equal(model.eval().forward_features(normalised), tokens)
            assert torch.allclose(model(normalised), backbone.global_features(x))  # CLS pooling
    assert by_folder.pretrained_cfg["mean"] == list(spec.mean)


def test_the_model_card_holds_the_load_call_the_config_and_the_evaluation(tmp_path):
    _, config = export("dinov3_vits16", tmp_path / "a", train_config=TRAIN, evaluation=TABLE)
    card = (tmp_path / "a" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and front["license"] == "other"
    assert front["license_name"] == "dinov3-license"
    assert 'timm.create_model(\n    "vit_small_patch16_dinov3", pretrained=True' in card
    assert "embed_dim=32" in card  # the tiny sizes are part of the call
    block = re.search(r"## Training config\n\n```yaml\n(.*?)```", card, re.S).group(1)
    assert yaml.safe_load(block) == TRAIN
    assert "## Evaluation" in card and TABLE.strip() in card
    export("dinov3_vits16", tmp_path / "b", train_config=TRAIN)
    assert "## Evaluation" not in (tmp_path / "b" / "README.md").read_text()
    export("dinov3_vits16", tmp_path / "c", train_config=TRAIN, evaluation=TABLE)
    for name in ("README.md", "config.json", WEIGHTS_NAME):  # equal inputs, equal bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_a_full_size_export_loads_with_the_plain_timm_call(tmp_path, offline):
    torch.manual_seed(2)
    backbone = load_backbone("dinov3_vits16", None, device="cpu")
    folder = storage.join(str(tmp_path), "encoder-hub")
    save_hub_export(backbone, folder)
    config = json.loads((tmp_path / "encoder-hub" / "config.json").read_text())
    assert config["model_args"] == {"num_classes": 0, "global_pool": "token",
                                    "dynamic_img_size": True, "img_size": [256, 256]}
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert "base_model: timm/vit_small_patch16_dinov3.lvd1689m" in (
        tmp_path / "encoder-hub" / "README.md").read_text()
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=True,
                              pretrained_cfg_overlay=dict(file=f"{folder}/{WEIGHTS_NAME}"))
    expected = backbone.model.state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
