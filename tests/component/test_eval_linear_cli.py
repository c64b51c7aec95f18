"""The linear probe through ``evaluation.run``: its rows in results.json and results.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.datasets import open_dataset
from evaluation.linear import run_linear_probe
from evaluation.run import app
from shared import storage
from shared.backbones import load_backbone
from shared.images import encode_jpeg, encode_png
from shared.synthetic import write_synthetic_dataset

FAST = ["--set", "memory.executor=local", "--set", "input_size=28", "--set", "memory.size=400",
        "--set", "memory.images_per_shard=4", "--set", "device=cpu",
        "--set", 'lowshot.fractions=["1"]']
PROBE = ["--set", "linear.enabled=true", "--set", "linear.epochs=3", "--set", "linear.lr=0.05",
         "--set", "linear.batch_size=2", "--set", "linear.seed=7"]


def test_linear_probe_rows_are_the_probe_of_the_evaluated_encoder(tmp_path):
    data = write_synthetic_dataset(str(tmp_path / "data"), num_train=6, num_val=3, size=(32, 32))
    out = str(tmp_path / "out")
    result = CliRunner().invoke(app, ["--tiny", "--dataset", "synthetic", "--data-root", data,
                                      "--out", out, *FAST, *PROBE,
                                      "--set", "max_train_images=5"])
    assert result.exit_code == 0, result.output
    doc = json.loads(storage.read_text(storage.join(out, "results.json")))
    (probe,) = [r for r in doc["runs"] if r["method"] == "linear"]
    (incontext,) = [r for r in doc["runs"] if r["method"] == "in-context"]
    assert probe["train_images"] == 5 and probe["details"]["val_images"] == 3
    assert (probe["seed"], probe["matching"], probe["input_size"]) == (7, "identity", 28)

    # the same probe by hand, on the encoder the run saved and the same images
    encoder = load_backbone("vits14", incontext["weights"], tiny=True, device="cpu")
    train = open_dataset("synthetic", data, "train").subset(range(5))
    val = open_dataset("synthetic", data, "val")
    expected = run_linear_probe(encoder, train, val, 28, epochs=3, lr=0.05, batch_size=2,
                                seed=7, device="cpu")["miou"]
    assert probe["value"] == pytest.approx(expected, abs=1e-12)
    assert probe["weights_sha256"] == incontext["weights_sha256"]

    # summarised apart from the in-context row, and shown as its own line
    rows = {r["method"]: r for r in doc["summary"]}
    assert set(rows) == {"in-context", "linear"}
    assert rows["linear"]["mean"] == pytest.approx(expected, abs=1e-12)
    assert rows["linear"]["std"] == 0.0
    assert rows["in-context"]["mean"] == pytest.approx(incontext["value"], abs=1e-12)
    table = storage.read_text(storage.join(out, "results.md"))
    line = f"| identity | {100 * expected:.2f} | 0.00 | 1 | linear |"
    assert line in table and line in result.output


def _fake_nyu(root: str, n: int) -> None:
    """NYUv2's layout with ``n`` random images per split and a constant 2 m depth."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            base = storage.join(root, "official_splits", split, "kitchen")
            image = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)
            storage.write_bytes(storage.join(base, f"rgb_{i:05d}.jpg"), encode_jpeg(image))
            depth = np.full((28, 28), 2000, dtype=np.uint16)
            storage.write_bytes(storage.join(base, f"sync_depth_{i:05d}.png"), encode_png(depth))


def test_depth_datasets_are_skipped_by_the_probe(tmp_path):
    data = str(tmp_path / "nyu")
    _fake_nyu(data, 3)
    out = str(tmp_path / "out")
    result = CliRunner().invoke(app, ["--tiny", "--dataset", "nyu", "--data-root", data,
                                      "--out", out, *FAST, *PROBE])
    assert result.exit_code == 0, result.output
    doc = json.loads(storage.read_text(storage.join(out, "results.json")))
    assert [(r["method"], r["metric"]) for r in doc["runs"]] == [("in-context", "rmse")]
    assert "linear probe: nyu is a depth dataset, skipped" in result.output


def test_the_probe_is_off_by_default_and_its_settings_are_checked(tmp_path):
    data = write_synthetic_dataset(str(tmp_path / "data"), num_train=4, num_val=2, size=(32, 32))
    out = str(tmp_path / "out")
    result = CliRunner().invoke(app, ["--tiny", "--dataset", "synthetic", "--data-root", data,
                                      "--out", out, *FAST])
    assert result.exit_code == 0, result.output
    doc = json.loads(storage.read_text(storage.join(out, "results.json")))
    assert [r["method"] for r in doc["runs"]] == ["in-context"]
    bad = CliRunner().invoke(app, ["--tiny", "--dataset", "synthetic", "--data-root", data,
                                   "--out", out, *FAST, "--set", "linear.epoch=3"])
    assert bad.exit_code == 2 and "linear.epoch" in bad.output
