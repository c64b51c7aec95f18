"""DiffCut presets (project | released): how they resolve in configs and segmenter settings, the
noise each draws, the VAE arithmetic; and the training precision settings."""

from __future__ import annotations

import pytest
import torch
import yaml

from labeling.config import DIFFCUT_PRESETS, DiffCutConfig, LabelConfig, stage_identities
from labeling.diffcut import make_noise, vae_compute_dtype
from labeling.segmenter import SEGMENTER_DEFAULTS, _settings
from shared.config import ConfigError, load_config
from training.config import TrainConfig

RESOLVED = ("seed", "noise_device", "antialias", "vae_dtype")

WEIGHTS = {"backbone": {"source": "file", "sha256": "a" * 64}, "segmenter": None}


def test_project_is_the_default_and_keeps_todays_behaviour():
    cfg = DiffCutConfig()
    assert cfg.preset == "project"
    assert (cfg.seed, cfg.noise_device, cfg.antialias, cfg.vae_dtype) == (0, "cpu", True, "float32")


def test_released_fills_every_setting_the_config_leaves_out():
    cfg = DiffCutConfig(preset="released")
    assert (cfg.seed, cfg.noise_device, cfg.antialias, cfg.vae_dtype) == (42, "cuda", False, "float16")
    assert {k: getattr(cfg, k) for k in RESOLVED} == DIFFCUT_PRESETS["released"]


def test_an_explicit_setting_overrides_its_preset():
    cfg = DiffCutConfig(preset="released", noise_device="cpu", seed=7)
    assert (cfg.seed, cfg.noise_device, cfg.antialias, cfg.vae_dtype) == (7, "cpu", False, "float16")
    back = DiffCutConfig(preset="project", antialias=False)
    assert (back.seed, back.antialias) == (0, False)


def test_the_saved_config_records_the_resolved_values_and_reads_back_the_same(tmp_path):
    cfg = load_config(LabelConfig, overrides=["diffcut.preset=released", "diffcut.seed=5"])
    dumped = cfg.model_dump(mode="json")["diffcut"]  # what labelset.json and config.yaml hold
    assert dumped["preset"] == "released" and dumped["seed"] == 5
    assert (dumped["noise_device"], dumped["antialias"], dumped["vae_dtype"]) == ("cuda", False,
                                                                                  "float16")
    path = tmp_path / "labels.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(LabelConfig, str(path)) == cfg


def test_the_preset_changes_the_segments_identity():
    project = stage_identities(LabelConfig(), "sha", 10, WEIGHTS)
    released = stage_identities(LabelConfig(diffcut={"preset": "released"}), "sha", 10,
                                WEIGHTS)
    assert project["segments"] != released["segments"]
    assert released["segments"]["config"]["diffcut"]["noise_device"] == "cuda"


def test_an_unknown_preset_or_value_names_the_field():
    with pytest.raises(ConfigError, match="diffcut.preset"):
        load_config(LabelConfig, overrides=["diffcut.preset=paper"])
    with pytest.raises(ConfigError, match="diffcut.noise_device"):
        load_config(LabelConfig, overrides=["diffcut.noise_device=mps"])


def test_segmenter_settings_resolve_the_preset_the_same_way():
    assert SEGMENTER_DEFAULTS["preset"] == "project"
    project = _settings(None, {})
    assert (project["seed"], project["noise_device"], project["antialias"]) == (0, "cpu", True)
    assert project["vae_dtype"] == torch.float32
    released = _settings(None, {"preset": "released", "seed": 3})
    assert (released["seed"], released["noise_device"], released["antialias"]) == (3, "cuda", False)
    assert released["vae_dtype"] == torch.float16
    from_config = _settings(DiffCutConfig(preset="released", noise_device="cpu"), {})
    assert (from_config["seed"], from_config["noise_device"]) == (42, "cpu")
    with pytest.raises(ValueError, match="unknown preset 'paper'"):
        _settings(None, {"preset": "paper"})


def test_project_noise_is_the_cpu_generator_of_the_seed():
    noise = make_noise((1, 4, 8, 8), 0, "cpu", torch.device("cpu"))
    assert torch.equal(noise, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(noise, make_noise((1, 4, 8, 8), 42, "cpu", torch.device("cpu")))


def test_released_noise_off_a_gpu_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="diffcut.noise_device: cpu") as info:
        make_noise((1, 4, 8, 8), 42, "cuda", torch.device("cpu"))
    assert "CUDA generator" in str(info.value) and "runs on cpu" in str(info.value)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        make_noise((1, 4, 8, 8), 42, "mps", torch.device("cpu"))


@pytest.mark.gpu
def test_released_noise_is_the_cuda_generator_of_seed_42():
    device = torch.device("cuda")
    noise = make_noise((1, 4, 128, 128), 42, "cuda", device)
    gen = torch.Generator(device=device).manual_seed(42)
    assert noise.is_cuda and torch.equal(noise, torch.randn(1, 4, 128, 128, generator=gen,
                                                            device=device))
    assert not torch.equal(noise.cpu(), make_noise((1, 4, 128, 128), 42, "cpu", device).cpu())


def test_a_float16_vae_computes_in_float32():
    assert vae_compute_dtype(torch.float16) == torch.float32
    assert vae_compute_dtype(torch.float32) == torch.float32
    assert vae_compute_dtype(torch.bfloat16) == torch.bfloat16


def test_training_precision_and_head_eps_defaults():
    cfg = TrainConfig()
    assert cfg.precision == "bf16" and cfg.head_norm_eps == 1e-6
    assert TrainConfig(precision="fp16").precision == "fp16"
    with pytest.raises(ConfigError, match="precision"):
        load_config(TrainConfig, overrides=["precision=fp8"])
