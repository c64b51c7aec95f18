"""Typed configs: defaults, YAML, overrides, and loud errors for wrong keys or types."""

import pytest
from pydantic import Field

from shared.config import Config, ConfigError, load_config, parse_overrides, save_config


class Inner(Config):
    temperature: float = 0.07
    layers: list[int] = Field(default_factory=lambda: [1, 2])


class Outer(Config):
    name: str = "dip"
    epochs: int = 5
    inner: Inner = Field(default_factory=Inner)


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\ninner:\n  temperature: 0.1\n")
    cfg = load_config(Outer, str(path), ["inner.layers=[4, 5]", "name=x"])
    assert cfg.epochs == 3
    assert cfg.inner.temperature == 0.1
    assert cfg.inner.layers == [4, 5]
    assert cfg.name == "x"
    assert load_config(Outer) == Outer()


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  temperture: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'inner.temperture'"):
        load_config(Outer, str(path))


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"epochs"):
        load_config(Outer, overrides=["epochs=many"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, str(bad))


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(Outer, overrides={"epochs": 7, "inner": {"temperature": 0.5}})
    out = tmp_path / "out" / "config.yaml"
    save_config(cfg, str(out))
    assert load_config(Outer, str(out)) == cfg


def test_labeling_feature_size_follows_the_backbone_and_is_checked():
    from labeling.config import LabelConfig

    assert LabelConfig().feature_size == 448  # DINOv2R /14: a 32 x 32 grid
    assert LabelConfig(backbone="clip_vitb16").feature_size == 512  # /16: the same grid
    cfg = load_config(LabelConfig, overrides=["backbone=mae_vitb16"])
    assert cfg.feature_size == 512 and cfg.model_dump()["feature_size"] == 512  # as saved
    with pytest.raises(ConfigError, match="backbone: unknown backbone 'vitz99'"):
        load_config(LabelConfig, overrides=["backbone=vitz99"])
    with pytest.raises(ConfigError, match="feature_size: 500 is not a multiple of .* 16"):
        load_config(LabelConfig, overrides=["backbone=clip_vitb16", "feature_size=500"])
