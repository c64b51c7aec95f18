"""The evaluation command line: flags and overrides, low-shot tables, depth, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.benchmark import encoder_pairs
from evaluation.config import EvalConfig
from evaluation.run import app
from shared import storage
from shared.images import encode_jpeg, encode_png
from shared.synthetic import write_synthetic_dataset

FAST = ["--set", "memory.executor=local", "--set", "input_size=28", "--set", "memory.size=400",
        "--set", "memory.images_per_shard=4", "--set", "device=cpu"]


def _invoke(args):
    result = CliRunner().invoke(app, args)
    return result


def test_lowshot_run_writes_mean_and_std_over_seeds(tmp_path):
    data = write_synthetic_dataset(str(tmp_path / "data"), num_train=16, num_val=3, size=(32, 32))
    out = str(tmp_path / "out")
    result = _invoke(["--tiny", "--backbone", "vits14", "--dataset", "synthetic", "--data-root",
                      data, "--out", out, *FAST, "--set", 'lowshot.fractions=["1", "1/8"]',
                      "--set", "lowshot.seeds=[42, 400, 783]"])
    assert result.exit_code == 0, result.output
    doc = json.loads(storage.read_text(storage.join(out, "results.json")))
    runs = [r for r in doc["runs"] if r["fraction"] == "1/8"]
    assert [r["seed"] for r in runs] == [42, 400, 783]
    assert all(r["memory_images"] == 2 for r in runs)  # floor(16 / 8)
    values = np.array([r["value"] for r in runs])
    row = next(r for r in doc["summary"] if r["fraction"] == "1/8")
    assert row["mean"] == pytest.approx(values.mean()) and row["std"] == pytest.approx(values.std())
    full = [r for r in doc["runs"] if r["fraction"] == "1"]
    assert len(full) == 1 and full[0]["memory_images"] == 16
    assert "vits14-tiny:random" in result.output and "| 1/8 |" in result.output
    assert "memory:" in storage.read_text(storage.join(out, "config.yaml"))
    # a second run reuses every bank
    again = _invoke(["--tiny", "--dataset", "synthetic", "--data-root", data, "--out", out, *FAST,
                     "--set", 'lowshot.fractions=["1", "1/8"]', "--set",
                     "lowshot.seeds=[42, 400, 783]"])
    assert again.exit_code == 0 and "shards built" not in again.output


def _fake_nyu(root: str, n: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            image = rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)
            depth = np.full((28, 28), 2000, dtype=np.uint16)
            depth[:3] = 0  # no measurement
            base = storage.join(root, "official_splits", split, "kitchen")
            storage.write_bytes(storage.join(base, f"rgb_{i:05d}.jpg"), encode_jpeg(image))
            storage.write_bytes(storage.join(base, f"sync_depth_{i:05d}.png"), encode_png(depth))


def test_depth_with_a_constant_scene_has_zero_rmse(tmp_path):
    data = str(tmp_path / "nyu")
    _fake_nyu(data, 3)
    out = str(tmp_path / "out")
    result = _invoke(["--tiny", "--dataset", "nyu", "--data-root", data, "--out", out, *FAST,
                      "--set", 'lowshot.fractions=["1"]'])
    assert result.exit_code == 0, result.output
    doc = json.loads(storage.read_text(storage.join(out, "results.json")))
    assert doc["runs"][0]["metric"] == "rmse"
    assert doc["runs"][0]["value"] == pytest.approx(0.0, abs=1e-6)  # every bank value is 2.0 m


def test_bad_input_is_reported(tmp_path):
    bad = _invoke(["--tiny", "--dataset", "synthetic", "--data-root", str(tmp_path), "--set",
                   "memory.sise=3"])
    assert bad.exit_code == 2 and "memory.sise" in bad.output
    two = _invoke(["--dataset", "voc", "--dataset", "ade20k", "--data-root", str(tmp_path)])
    assert two.exit_code == 2 and "data_roots" in two.output
    wrong = _invoke(["--tiny", "--dataset", "voc", "--data-root", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "o"), *FAST])
    assert wrong.exit_code == 2 and "JPEGImages" in wrong.output
    no_root = _invoke(["--tiny", "--dataset", "ade20k", "--out", str(tmp_path / "o2")])
    assert no_root.exit_code == 2 and "data_roots.ade20k" in no_root.output
    unknown = _invoke(["--tiny", "--dataset", "imagenet", "--out", str(tmp_path / "o3")])
    assert unknown.exit_code == 2 and "known datasets" in unknown.output


def test_a_missing_mask_exits_2_with_one_line_before_any_work(tmp_path):
    data = write_synthetic_dataset(str(tmp_path / "data"), num_train=4, num_val=2, size=(32, 32))
    gone = storage.join(data, "masks", "train", "000002.png")
    storage.remove(gone)
    out = str(tmp_path / "out")
    done = subprocess.run(
        [sys.executable, "-m", "evaluation.run", "--tiny", "--dataset", "synthetic",
         "--data-root", data, "--out", out, *FAST], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"evaluation.run: error: synthetic: 1 of 4 train images have "
                                   f"no mask file: {gone}")
    assert done.stdout == ""
    assert not storage.exists(out)  # nothing loaded, nothing written


def test_encoder_pairs():
    cfg = EvalConfig(backbones=["vits14"], weights=["hub", "a.safetensors"])
    assert encoder_pairs(cfg) == [("vits14", "hub"), ("vits14", "a.safetensors")]
    cfg = EvalConfig(backbones=["vits14", "vitb14"], weights=["hub"])
    assert encoder_pairs(cfg) == [("vits14", "hub"), ("vitb14", "hub")]
    with pytest.raises(ValueError, match="weights"):
        encoder_pairs(EvalConfig(backbones=["a", "b"], weights=["x", "y", "z"]))


def test_several_encoders_in_one_call(tmp_path):
    import torch

    from shared.backbones import load_backbone, save_backbone

    data = write_synthetic_dataset(str(tmp_path / "data"), num_train=4, num_val=2, size=(32, 32))
    torch.manual_seed(5)
    export = str(tmp_path / "dip-export.safetensors")
    save_backbone(load_backbone("vits14", None, tiny=True, device="cpu"), export)
    out = str(tmp_path / "out")
    result = _invoke(["--tiny", "--backbone", "vits14", "--weights", "random", "--weights", export,
                      "--dataset", "synthetic", "--data-root", data, "--out", out, *FAST,
                      "--set", 'lowshot.fractions=["1"]'])
    assert result.exit_code == 0, result.output
    doc = json.loads(storage.read_text(storage.join(out, "results.json")))
    assert [r["encoder"] for r in doc["runs"]] == ["vits14-tiny:random",
                                                   "vits14-tiny:dip-export.safetensors"]
    banks = {r["bank"] for r in doc["runs"]}
    assert len(banks) == 2  # one bank per encoder


def test_the_hummingbird_protocol_is_applied_and_recorded(tmp_path):
    from evaluation.bank import MemoryBank

    data = write_synthetic_dataset(str(tmp_path / "data"), num_train=4, num_val=2, size=(32, 32))
    out = str(tmp_path / "out")
    fast = ["--set", "memory.executor=local", "--set", "memory.images_per_shard=4", "--set",
            "device=cpu", "--set", 'lowshot.fractions=["1"]', "--set", "input_size=28"]
    result = _invoke(["--tiny", "--set", "protocol=hummingbird", "--dataset", "synthetic",
                      "--data-root", data, "--out", out, *fast])
    assert result.exit_code == 0, result.output
    assert "Protocol `hummingbird`: hungarian matching, input 28 px" in result.output
    assert "| hummingbird | mIoU (%) | hungarian |" in result.output
    doc = json.loads(storage.read_text(storage.join(out, "results.json")))
    assert doc["protocol"]["name"] == "hummingbird" and doc["protocol"]["temperature"] == 0.02
    assert doc["protocol"]["overridden"] == ["input_size"]
    run = doc["runs"][0]
    assert (run["protocol"], run["matching"], run["input_size"]) == ("hummingbird", "hungarian",
                                                                     28)
    assert run["value"] == pytest.approx(run["details"]["miou_by_matching"]["hungarian"])
    assert doc["summary"][0]["matching"] == "hungarian"
    bank = MemoryBank(run["bank"])
    # unbounded memory, one epoch: every patch (2 x 2 at 28 px) of every memory image
    assert bank.size == 4 * 1 * 4 and bank.manifest["patches_per_image"] is None
    assert bank.manifest["options"]["augmentation"] == "hummingbird"
    assert "protocol: hummingbird" in storage.read_text(storage.join(out, "config.yaml"))


def _memory_is_the_queries_with_classes_renamed(root: str) -> None:
    """Train split = the val split with every class id c written as c + 1 (mod C)."""
    from shared.images import decode_png
    from shared.synthetic import CLASS_NAMES

    write_synthetic_dataset(root, num_train=0, num_val=4, size=(42, 42))
    for uri in storage.glob(storage.join(root, "images", "val", "*.jpg")):
        name = uri.rsplit("/", 1)[-1][:-4]
        storage.write_bytes(storage.join(root, "images", "train", f"{name}.jpg"),
                            storage.read_bytes(uri))
        mask = decode_png(storage.read_bytes(storage.join(root, "masks", "val", f"{name}.png")))
        renamed = np.where(mask == 255, 255, (mask.astype(np.int64) + 1) % len(CLASS_NAMES))
        storage.write_bytes(storage.join(root, "masks", "train", f"{name}.png"),
                            encode_png(renamed.astype(np.uint8)))


def test_the_configured_matching_scores_the_run(tmp_path):
    # every query patch retrieves itself (k = 1, no augmentation) with a renamed class: identity
    # matching scores the renaming as errors, Hungarian matching undoes it
    data = str(tmp_path / "data")
    _memory_is_the_queries_with_classes_renamed(data)
    out = str(tmp_path / "out")
    plain = ["--set", "memory.jitter_p=0", "--set", "memory.crop_scale=[1, 1]", "--set",
             "memory.crop_ratio=[1, 1]", "--set", "search.k=1", "--set", "input_size=42"]
    result = _invoke(["--tiny", "--set", "protocol=hummingbird", "--dataset", "synthetic",
                      "--data-root", data, "--out", out, "--set", "memory.executor=local",
                      "--set", "device=cpu", "--set", 'lowshot.fractions=["1"]', *plain])
    assert result.exit_code == 0, result.output
    run = json.loads(storage.read_text(storage.join(out, "results.json")))["runs"][0]
    by_matching = run["details"]["miou_by_matching"]
    # Hungarian undoes the renaming: the mIoU of predicting each pixel from its own patch
    assert by_matching["hungarian"] == pytest.approx(_own_patch_miou(data, 42), abs=1e-12)
    assert by_matching["hungarian"] > 0.3 and by_matching["identity"] < 0.1
    assert run["matching"] == "hungarian" and run["value"] == by_matching["hungarian"]


def _own_patch_miou(root: str, size: int) -> float:
    """Identity mIoU of the val split when each pixel takes its own patch's class histogram."""
    import torch

    from evaluation.datasets import open_dataset
    from evaluation.transfer import ConfusionAccumulator, patch_histograms, upsample_scores
    from shared.images import eval_geometry, to_tensor

    val = open_dataset("synthetic", root, "val")
    acc = ConfusionAccumulator(val.num_classes, val.ignore_index)
    for i in range(len(val)):
        image, mask = val.load(i)
        _, labels = eval_geometry(to_tensor(image), torch.from_numpy(mask), size)
        hist = patch_histograms(labels[None], val.num_classes, 14).half().float()
        acc.update(upsample_scores(hist, (size, size)).argmax(dim=1), labels[None])
    return acc.miou("identity")
