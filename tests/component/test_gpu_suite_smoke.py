"""benchmarks/gpu_suite.py: the smoke run (every part at tiny sizes on the CPU, through the code
paths of a GPU run) and the suite's own rules: a failing or overrunning part fails alone, parts
past the total budget are skipped, peaks and precisions are the data sheet's."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
PARTS = ["ncut_batched", "unet_to_hook", "vae_fp32", "vae_bf16", "encoder_vits14",
         "encoder_vitb14", "encoder_vitl14", "segment_actor", "train_vits14", "train_vitb14",
         "data_path", "search_torch_fp32", "search_auto", "search_faiss"]
FLOP_PARTS = ["unet_to_hook", "vae_fp32", "vae_bf16", "encoder_vits14", "encoder_vitb14",
              "encoder_vitl14", "segment_actor", "train_vits14", "train_vitb14",
              "search_torch_fp32", "search_auto", "search_faiss"]


def _suite():
    """benchmarks/gpu_suite.py as a module (benchmarks/ is not a package)."""
    if "gpu_suite" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_suite"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_suite"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run in a fresh process, as a user runs it: (json report, markdown)."""
    out = tmp_path_factory.mktemp("gpu-smoke")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert (out / "gpu_suite.json").is_file() and (out / "gpu_suite.md").is_file()
    return (json.loads((out / "gpu_suite.json").read_text()),
            (out / "gpu_suite.md").read_text())


@pytest.mark.slow
def test_the_smoke_run_writes_one_clean_row_per_part_in_both_files(smoke):
    report, markdown = smoke
    assert [row["part"] for row in report["parts"]] == PARTS
    for row in report["parts"]:
        assert "error" not in row and "skipped" not in row, row
        assert row["result"], row
    table = [line for line in markdown.splitlines() if line.startswith("| ")][1:]  # no header
    assert [line.split(" | ")[0].removeprefix("| ") for line in table] == PARTS
    assert "**error**" not in markdown and "skipped" not in markdown
    assert report["mode"] == "smoke" and report["environment"]["device"] == "cpu"
    assert any("random" in note for note in report["notes"])
    assert report["environment"]["torch"] == torch.__version__


@pytest.mark.slow
def test_the_smoke_rows_hold_real_measurements(smoke):
    rows = {row["part"]: row for row in smoke[0]["parts"]}
    for name in PARTS:
        rate = next(v for k, v in rows[name]["metrics"].items() if k.endswith("_per_s"))
        assert rate > 0, name
    for name in FLOP_PARTS:
        assert rows[name]["tflops"] > 0, name
        assert rows[name]["peak_ratio"] is None  # a CPU has no data-sheet peak here
    assert rows["vae_fp32"]["metrics"]["dtype"] == "torch.float32"
    assert rows["vae_bf16"]["metrics"]["dtype"] == "torch.bfloat16"
    assert rows["vae_bf16"]["metrics"]["finite"] and rows["vae_fp32"]["metrics"]["finite"]
    assert rows["unet_to_hook"]["metrics"]["dtype"] == "torch.float32"  # the CPU's choice
    assert rows["segment_actor"]["metrics"]["segments_per_image"] >= 1
    assert rows["ncut_batched"]["metrics"]["segments_per_image"] >= 1
    for name in ("train_vits14", "train_vitb14"):
        assert rows[name]["memory_gib"] > 0 and rows[name]["metrics"]["steps_timed"] >= 1
    # every backend is exact: the nearest patch is the same whoever finds it
    assert rows["search_auto"]["metrics"]["backend"] == "faiss flat (CPU)"
    for name in ("search_torch_fp32", "search_auto", "search_faiss"):
        assert rows[name]["metrics"]["top1_agreement_with_first"] == 1.0


def _context(suite, tmp_path, **sizes):
    return suite.Context(torch.device("cpu"), replace(suite.SMOKE, **sizes), str(tmp_path), 0.1)


def test_a_failing_or_overrunning_part_writes_its_error_and_the_next_part_runs(tmp_path):
    suite = _suite()

    def boom(ctx):
        raise ValueError("the bank is empty")

    def overrun(ctx):
        time.sleep(10)
        return {"result": "never"}

    parts = [suite.Part("boom", "a", "raises", boom),
             suite.Part("overrun", "a", "sleeps past its limit", overrun),
             suite.Part("fine", "b", "returns", lambda ctx: {"result": "done"})]
    rows = suite.run_suite(parts, _context(suite, tmp_path, part_limit_s=0.5),
                           log=lambda *a, **k: None)
    assert rows[1]["seconds"] < 5  # stopped at its limit, not after its 10 s
    assert rows[0]["error"].startswith("ValueError: the bank is empty")
    assert rows[1]["error"].startswith("PartTimeout: ran past its limit")
    assert rows[2]["result"] == "done" and "error" not in rows[2]
    markdown = suite.render_markdown({
        "mode": "smoke", "command": "x", "started": "now", "total_s": 1.0, "notes": [],
        "environment": suite.environment(torch.device("cpu")), "parts": rows})
    assert markdown.count("**error**") == 2 and "| fine | returns | done |" in markdown


def test_parts_past_the_total_budget_are_skipped_not_run(tmp_path):
    suite = _suite()
    ran = []
    parts = [suite.Part(n, "a", "records", lambda ctx, n=n: ran.append(n) or {"result": n})
             for n in ("first", "second")]
    rows = suite.run_suite(parts, _context(suite, tmp_path, total_s=0.0),
                           log=lambda *a, **k: None)
    assert ran == [] and [row["part"] for row in rows] == ["first", "second"]
    assert all("total budget" in row["skipped"] for row in rows)


def test_only_selects_known_parts_and_names_the_unknown():
    suite = _suite()
    every = suite.parts(suite.SMOKE)
    assert [p.name for p in every] == PARTS
    assert [p.name for p in suite.select(every, "vae_bf16,ncut_batched")] == [
        "ncut_batched", "vae_bf16"]
    with pytest.raises(SystemExit, match="unknown part.*vae_fp64"):
        suite.select(every, "vae_fp64")


def test_peaks_are_the_dense_data_sheet_figures_of_the_precision_used(monkeypatch):
    _suite()
    from gpu_measure import matmul_precision, peak_for_name, rate_fields

    assert peak_for_name("NVIDIA H200", "bf16") == 989.4
    assert peak_for_name("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_for_name("NVIDIA H100 PCIe", "fp32") == 51.2
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert peak_for_name("NVIDIA H200 NVL", "bf16") is None  # another clock: not guessed
    assert peak_for_name("NVIDIA GeForce RTX 4090", "bf16") is None
    assert matmul_precision(torch.bfloat16) == "bf16"
    assert matmul_precision(torch.float16) == "fp16"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert matmul_precision(torch.float32, "conv") == "tf32"
    assert matmul_precision(torch.float32, "matmul") == "fp32"
    fields = rate_fields(torch.device("cpu"), 2e12, 3.0, "fp32")
    assert fields["tflops"] == pytest.approx(6.0) and fields["peak_ratio"] is None


def test_faiss_is_skipped_only_on_a_gpu_it_cannot_use():
    _suite()
    from gpu_parts_train import faiss_skip

    assert "faiss-gpu" in faiss_skip(torch.device("cuda"), has_gpu=False)
    assert faiss_skip(torch.device("cuda"), has_gpu=True) is None
    assert faiss_skip(torch.device("cpu"), has_gpu=False) is None
