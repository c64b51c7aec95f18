"""An exported weight file says what it is: its backbone and tiny flag in the safetensors
metadata, enough for ``--weights file.safetensors`` alone; an explicit backbone still wins."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from shared.backbones import (
    WeightsError,
    backbone_from_weights,
    backbone_override,
    backbones_for_weights,
    load_backbone,
    read_metadata,
    save_backbone,
)
from training.config import TrainConfig
from training.run import resolve_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny exports of two backbones, a full-size-marked file, and a file without metadata."""
    root = tmp_path_factory.mktemp("exports")
    files = {}
    for name in ("dinov3_vits16", "clip_vitb16"):
        torch.manual_seed(0)
        files[name] = str(root / f"{name}.safetensors")
        save_backbone(load_backbone(name, None, tiny=True, device="cpu"), files[name])
    backbone = load_backbone("vits14", None, tiny=True, device="cpu")
    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    files["plain"] = str(root / "plain.safetensors")
    safetensors.torch.save_file(state, files["plain"])
    files["full"] = str(root / "full.safetensors")
    safetensors.torch.save_file(state, files["full"], metadata={"backbone": "vits14",
                                                                "tiny": "false"})
    files["alien"] = str(root / "alien.safetensors")
    safetensors.torch.save_file(state, files["alien"], metadata={"backbone": "vitz99"})
    files["torch"] = str(root / "enc.pt")
    torch.save(state, files["torch"])
    return files


def test_an_export_records_its_backbone_and_tiny_flag(exported):
    meta = read_metadata(exported["dinov3_vits16"])
    assert meta["backbone"] == "dinov3_vits16" and meta["tiny"] == "true"
    assert meta["timm_id"] == "vit_small_patch16_dinov3.lvd1689m"
    assert backbone_from_weights(exported["dinov3_vits16"]) == "dinov3_vits16"
    for weights in ("hub", "random", None, exported["plain"], exported["torch"],
                    exported["plain"] + ".missing.safetensors"):
        assert backbone_from_weights(weights) is None, weights
    with pytest.raises(WeightsError, match=r"alien\.safetensors records backbone 'vitz99'"):
        backbone_from_weights(exported["alien"])


def test_a_tiny_file_loaded_as_full_size_and_a_wrong_backbone_say_what_the_file_is(exported):
    with pytest.raises(WeightsError, match=r"full\.safetensors holds the weights of a full-size "
                                           r"vits14: load it with tiny=False"):
        load_backbone("vits14", exported["full"], tiny=True, device="cpu")
    with pytest.raises(WeightsError, match=r"tiny dinov3_vits16: load it with tiny=True"):
        load_backbone("dinov3_vits16", exported["dinov3_vits16"], tiny=False, device="cpu")
    with pytest.raises(WeightsError, match=r"records backbone 'dinov3_vits16', not 'vits14'"):
        load_backbone("vits14", exported["dinov3_vits16"], tiny=True, device="cpu")


def test_backbones_for_a_list_of_weights(exported):
    dino, clip = exported["dinov3_vits16"], exported["clip_vitb16"]
    assert backbones_for_weights(["hub", dino]) == ["dinov3_vits16"]  # one name serves all
    assert backbones_for_weights([dino, clip]) == ["dinov3_vits16", "clip_vitb16"]  # zipped
    assert backbones_for_weights(["hub", exported["plain"]]) is None
    with pytest.raises(WeightsError, match="different backbones"):
        backbones_for_weights(["hub", dino, clip])


def test_the_file_names_the_backbone_unless_one_is_given(exported):
    dino = exported["dinov3_vits16"]
    inferred = resolve_config(flags={"weights": dino, "tiny": True})
    assert inferred.backbone == "dinov3_vits16"
    explicit = resolve_config(flags={"weights": dino, "tiny": True, "backbone": "vitb14"})
    assert explicit.backbone == "vitb14"
    assert resolve_config(overrides=["backbone=vitl14", f"weights={dino}"]).backbone == "vitl14"
    assert resolve_config(flags={"weights": "hub"}).backbone == "vits14"
    assert backbone_override(TrainConfig(weights=dino)) == {"backbone": "dinov3_vits16"}
    assert backbone_override(TrainConfig(weights=dino, backbone="vits14")) == {}


def test_labeling_and_evaluation_commands_take_the_backbone_from_the_file(exported, tmp_path,
                                                                          monkeypatch):
    import evaluation.benchmark
    import labeling.pipeline
    from evaluation.run import app as eval_app
    from labeling.run import app as label_app

    seen = {}
    monkeypatch.setattr(labeling.pipeline, "run_labeling",
                        lambda cfg, **kw: seen.setdefault("labeling", cfg) and {})
    monkeypatch.setattr(evaluation.benchmark, "run_benchmark",
                        lambda cfg, **kw: seen.setdefault("evaluation", cfg) and [])
    dino, clip = exported["dinov3_vits16"], exported["clip_vitb16"]
    runner = CliRunner()
    result = runner.invoke(label_app, ["--images", "synthetic", "--out", str(tmp_path / "ls"),
                                       "--weights", dino, "--tiny"])
    assert result.exit_code == 0, result.output
    assert seen["labeling"].backbone == "dinov3_vits16"
    assert seen["labeling"].feature_size == 512  # the /16 grid of the file's backbone
    result = runner.invoke(eval_app, ["--weights", "hub", "--weights", clip, "--tiny",
                                      "--dataset", "synthetic", "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["evaluation"].backbones == ["clip_vitb16"]
    seen.clear()
    result = runner.invoke(eval_app, ["--backbone", "vits14", "--weights", clip, "--tiny",
                                      "--dataset", "synthetic", "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["evaluation"].backbones == ["vits14"]  # explicit wins
