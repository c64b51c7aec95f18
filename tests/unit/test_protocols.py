"""Evaluation protocols: each preset resolved into the config, explicit settings winning, and
the protocol recorded in the result files."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from evaluation.config import EvalConfig, MemoryConfig, SearchConfig
from evaluation.protocols import PROTOCOLS, describe, resolved_settings
from evaluation.report import markdown_table, summarize, write_results
from shared import storage
from shared.config import ConfigError, load_config, save_config


def _preset_values(cfg: EvalConfig) -> tuple:
    return (cfg.input_size, cfg.search.temperature, cfg.search.matching, cfg.memory.size,
            cfg.memory.epochs, cfg.memory.augmentation)


def test_the_dip_preset_is_the_default():
    assert _preset_values(EvalConfig()) == (None, 0.07, "identity", 10_240_000, 2, "dip")
    assert _preset_values(load_config(EvalConfig, overrides=["protocol=dip"])) == \
        _preset_values(EvalConfig())
    # the field defaults are the dip values, so a section built alone agrees with the preset
    dip = PROTOCOLS["dip"]
    assert (SearchConfig().temperature, SearchConfig().matching) == (dip.temperature, dip.matching)
    assert (MemoryConfig().size, MemoryConfig().epochs, MemoryConfig().augmentation) == \
        (dip.memory_size, dip.epochs, dip.augmentation)


def test_the_hummingbird_preset_is_resolved_into_the_config():
    cfg = load_config(EvalConfig, overrides=["protocol=hummingbird"])
    assert _preset_values(cfg) == (224, 0.02, "hungarian", None, 1, "hummingbird")
    # settings outside the preset keep their defaults
    assert (cfg.search.k, cfg.memory.jitter, cfg.memory.jitter_p) == (30, 0.1, 0.5)
    assert tuple(cfg.memory.crop_scale) == (0.5, 2.0)
    same = EvalConfig(protocol="hummingbird")
    assert _preset_values(same) == _preset_values(cfg)


def test_explicit_settings_win_over_the_preset(tmp_path):
    yaml = tmp_path / "eval.yaml"
    yaml.write_text("protocol: hummingbird\nsearch:\n  temperature: 0.05\n")
    cfg = load_config(EvalConfig, str(yaml), ["input_size=448", "memory.size=5000"])
    assert _preset_values(cfg) == (448, 0.05, "hungarian", 5000, 1, "hummingbird")
    cfg = load_config(EvalConfig, overrides=["protocol=hummingbird", "search.matching=identity",
                                             "memory.epochs=2", "memory.augmentation=dip",
                                             "input_size=null"])
    assert _preset_values(cfg) == (None, 0.02, "identity", None, 2, "dip")
    # an explicit value equal to the other preset's is still explicit
    cfg = load_config(EvalConfig, overrides=["protocol=hummingbird", "search.temperature=0.07"])
    assert cfg.search.temperature == 0.07
    # config models passed in: their explicitly set fields win, the rest follow the preset
    cfg = EvalConfig(protocol="hummingbird", search=SearchConfig(k=5),
                     memory=MemoryConfig(size=1000))
    assert (cfg.search.k, cfg.search.temperature, cfg.search.matching) == (5, 0.02, "hungarian")
    assert (cfg.memory.size, cfg.memory.epochs) == (1000, 1)
    cfg = EvalConfig(protocol="dip", search=SearchConfig(temperature=0.02))
    assert (cfg.search.temperature, cfg.search.matching) == (0.02, "identity")


def test_the_resolved_config_reloads_to_the_same_values(tmp_path):
    cfg = load_config(EvalConfig, overrides=["protocol=hummingbird", "input_size=112"])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))  # what every run writes next to its outputs
    again = load_config(EvalConfig, str(path))
    assert again == cfg and again.protocol == "hummingbird"


def test_bad_protocols_are_named():
    with pytest.raises(ConfigError, match="protocol"):
        load_config(EvalConfig, overrides=["protocol=hbird"])
    with pytest.raises(ConfigError, match="search.matching"):
        load_config(EvalConfig, overrides=["search.matching=greedy"])
    with pytest.raises(ValidationError, match="frozen"):  # chosen once, when the config is built
        EvalConfig().protocol = "hummingbird"


def test_resolved_settings_record_the_values_and_what_was_set_explicitly():
    cfg = load_config(EvalConfig, overrides=["protocol=hummingbird", "search.temperature=0.05"])
    settings = resolved_settings(cfg)
    assert settings == {"name": "hummingbird", "input_size": 224, "temperature": 0.05,
                        "matching": "hungarian", "memory_size": None, "epochs": 1,
                        "augmentation": "hummingbird", "overridden": ["temperature"]}
    line = describe(settings)
    assert line.startswith("Protocol `hummingbird`: hungarian matching, input 224 px")
    assert "temperature 0.05" in line and "every patch" in line and "temperature" in \
        line.split("changed from the preset:")[1]
    assert resolved_settings(EvalConfig())["overridden"] == []
    assert "10,240,000 patches" in describe(resolved_settings(EvalConfig()))


def _record(protocol, matching, seed, value, metric="miou"):
    return {"encoder": "e", "dataset": "voc", "fraction": "1", "protocol": protocol,
            "metric": metric, "matching": matching, "seed": seed, "value": value}


def test_reports_name_protocol_and_matching_and_never_pool_them(tmp_path):
    records = [_record("dip", "identity", 42, 0.5), _record("dip", "identity", 400, 0.7),
               _record("hummingbird", "hungarian", 42, 0.9), _record("dip", None, 42, 0.3, "rmse")]
    rows = summarize(records)
    assert [(r["protocol"], r["matching"], r["mean"]) for r in rows] == [
        ("dip", "identity", pytest.approx(0.6)), ("hummingbird", "hungarian", 0.9),
        ("dip", None, 0.3)]
    table = markdown_table(rows)
    assert "| e | voc | 1 | dip | mIoU (%) | identity | 60.00 |" in table
    assert "| e | voc | 1 | hummingbird | mIoU (%) | hungarian | 90.00 |" in table
    assert "| e | voc | 1 | dip | RMSE (m) | - | 0.300 |" in table
    settings = resolved_settings(EvalConfig(protocol="hummingbird"))
    out = str(tmp_path / "out")
    write_results(out, records, settings)
    doc = storage.read_json(storage.join(out, "results.json"))
    assert doc["protocol"] == settings and len(doc["runs"]) == 4
    text = storage.read_text(storage.join(out, "results.md"))
    assert text.startswith(describe(settings)) and "| hungarian |" in text
