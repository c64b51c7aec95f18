"""What a user gets when inputs are bad or the environment fails: each fault injected for real
(odd images on disk, an S3 endpoint that throttles or denies one object, a held output, a folder
that is not a label set), with the exit code, the message and a rerun that completes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from labeling.pipeline import LabelingRun, run_labeling
from labeling.run import app, root_cause
from labeling.stages import ShardEnvironmentError
from shared import storage
from shared.images import encode_jpeg, encode_png
from shared.labelset import LabelSet, LabelSetError, LabelSetWriter
from shared.lease import Lease, LeaseError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _odd_images(folder: Path) -> None:
    storage.write_bytes(str(folder / "thin.png"), encode_png(np.full((4000, 4), 7, np.uint8)))
    storage.write_bytes(str(folder / "dot.jpg"), encode_jpeg(np.zeros((1, 1, 3), np.uint8)))


def test_odd_sized_images_are_recorded_by_name_and_the_run_goes_on(tmp_path, ray_local,
                                                                    tiny_labeling):
    images = tiny_labeling.images(str(tmp_path / "data"), corrupt=False)
    _odd_images(Path(images))
    cfg = tiny_labeling.config(images, str(tmp_path / "labels"))
    summary = run_labeling(cfg, progress=False)
    assert summary["images_failed"] == 2
    rows = {r["image_id"]: r for r in LabelSet(cfg.out).images().to_pylist()}
    for name, file in (("thin", "thin.png"), ("dot", "dot.jpg")):
        assert rows[name]["status"] == "error"
        assert file in rows[name]["error"] and "too small" in rows[name]["error"]
    assert sum(r["status"] == "ok" for r in rows.values()) == tiny_labeling.num_images


@pytest.mark.parametrize("mode", ["503", "403"])
def test_an_object_the_environment_cannot_read_fails_its_shard_and_a_rerun_completes(
        mode, tmp_path, s3_bucket, s3_proxy, ray_local, monkeypatch, tiny_labeling):
    images = tiny_labeling.images(f"{s3_bucket}/data", corrupt=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint)  # the workers get it too
    monkeypatch.setenv("DIP_STORAGE_ATTEMPTS", "2")
    reference = tiny_labeling.config(images, str(tmp_path / "reference"))
    run_labeling(reference, progress=False)
    cfg = reference.model_copy(update={"out": str(tmp_path / "labels")})
    s3_proxy.fail(method="GET", key_contains="000005.jpg", mode=mode)
    with pytest.raises(Exception) as err:
        run_labeling(cfg, progress=False)
    cause = root_cause(err.value)
    assert isinstance(cause, ShardEnvironmentError), repr(err.value)
    assert "000005.jpg" in str(cause)
    assert s3_proxy.faulted >= 1
    writer = LabelSetWriter(cfg.out, {}, check=False)
    failed_shard = 5 // cfg.shard_size
    assert not writer.is_done("segments", failed_shard)  # the shard is retried, not recorded
    for _, table in writer.iter_shard_tables("images", ["status"]):
        assert set(table.column("status").to_pylist()) == {"ok"}
    with pytest.raises(LabelSetError):
        LabelSet(cfg.out)
    s3_proxy.clear()
    run_labeling(cfg, progress=False)
    assert tiny_labeling.table_bytes(cfg.out) == tiny_labeling.table_bytes(reference.out)


def test_a_failing_run_exits_promptly_with_one_line_naming_the_object(
        tmp_path, s3_bucket, s3_proxy, tiny_labeling):
    images = tiny_labeling.images(f"{s3_bucket}/data", corrupt=False)
    s3_proxy.fail(method="GET", key_contains="000002.jpg", mode="503")
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_proxy.endpoint, "DIP_STORAGE_ATTEMPTS": "2",
           "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "labeling.run", "--images", images, "--out",
           str(tmp_path / "labels"), "--tiny", "--classes", "4", "--shard-size", "4",
           "--batch-size", "4", "--quiet", "--address", "local",
           "--set", "feature_size=56", "--set", "diffcut.resolution=128"]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - start < 240
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "labeling.run: error:" in line]
    assert len(errors) == 1 and "000002.jpg" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_no_resume_never_removes_a_folder_that_is_not_a_label_set(tmp_path, tiny_labeling):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    images = tiny_labeling.images(str(tmp_path / "data"), corrupt=False)
    for source in (str(tmp_path / "missing"), images):
        result = _invoke("--images", source, "--out", str(thesis), "--no-resume", "--tiny")
        assert result.exit_code == 2, result.output
        assert (thesis / "chapter1.tex").read_text() == "years of work"
    assert "not a label set" in result.output


def test_no_resume_checks_the_inputs_before_removing_a_label_set(tmp_path):
    out = tmp_path / "labels"
    LabelSetWriter(str(out), {"v": 1})
    result = _invoke("--images", str(tmp_path / "missing"), "--out", str(out), "--no-resume")
    assert result.exit_code == 2 and "not found" in result.output
    assert (out / "_progress.json").exists()


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    result = _invoke("--set", "clases=4", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "clases" in result.output
    assert "Traceback" not in result.output
    result = _invoke("--images", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "missing" in result.output


def test_a_second_run_into_a_held_output_is_refused_naming_the_holder(tmp_path, tiny_labeling):
    images = tiny_labeling.images(str(tmp_path / "data"), corrupt=False)
    cfg = tiny_labeling.config(images, str(tmp_path / "labels"))
    with Lease(cfg.out, timeout=60, settle=0) as held:
        with pytest.raises(LeaseError, match=held.run_id):
            LabelingRun(cfg, progress=False)
        result = _invoke("--images", images, "--out", cfg.out, "--tiny")
        assert result.exit_code == 1
        assert "being written by another run" in result.output and "pid" in result.output
    assert not (Path(cfg.out) / "_progress.json").exists()  # refused before writing anything
