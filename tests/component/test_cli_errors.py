"""Both command lines report bad input the same way: exit code 2, one ``<prog>: error:`` line on
stderr that says what is wrong and where, no traceback, and nothing written to the output."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from evaluation.run import app as eval_app
from shared import storage
from shared.backbones import load_backbone, save_backbone
from shared.labelset import LabelSetWriter
from shared.synthetic import write_synthetic_dataset
from training.run import app as train_app


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synthetic_labelset):
    """A label set, an evaluation dataset and a weight file of another architecture."""
    root = tmp_path_factory.mktemp("inputs")
    labels = synthetic_labelset(str(root / "ls"), 8, size=(64, 64), seed=7)
    data = write_synthetic_dataset(str(root / "scenes"), num_train=2, num_val=1, size=(28, 28))
    torch.manual_seed(0)
    clip = str(root / "clip.safetensors")
    save_backbone(load_backbone("clip_vitb16", None, tiny=True, device="cpu"), clip)
    incomplete = str(root / "incomplete")
    LabelSetWriter(incomplete, {"test": 1})  # started, never finished
    foreign = str(root / "foreign")
    storage.write_json(storage.join(foreign, "labelset.json"), {"format_version": 99})
    return {"labels": labels, "data": data, "clip": clip, "incomplete": incomplete,
            "foreign": foreign, "missing": str(root / "nothing-here")}


TRAIN_CASES = {  # name -> (extra arguments, what the message must say)
    "bad config": (["--set", "epochz=1"], "unknown key 'epochz'"),
    "missing folder": (["--labels", "{missing}"], "labelset.json"),
    "incomplete label set": (["--labels", "{incomplete}"], "is not a complete label set"),
    "foreign label set": (["--labels", "{foreign}"], "unsupported label set format version 99"),
    "missing weights file": (["--weights", "{missing}/w.safetensors"],
                             "backbone weight file not found: {missing}/w.safetensors"),
    "weights of another model": (["--weights", "{clip}"], "do not match the backbone"),
    "unknown backbone": (["--backbone", "vitx14"], "unknown backbone 'vitx14'"),
}
EVAL_CASES = {
    "bad config": (["--set", "memory.sise=3"], "memory.sise"),
    "missing folder": (["--data-root", "{missing}"], "classes.json"),
    "missing weights file": (["--weights", "{missing}/w.safetensors"],
                             "backbone weight file not found: {missing}/w.safetensors"),
    "weights of another model": (["--weights", "{clip}"], "do not match the backbone"),
    "unknown backbone": (["--backbone", "vitx14"], "unknown backbone 'vitx14'"),
}


def _check(result, prog: str, expected: str, out: str, written: tuple[str, ...] = ()) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{prog}: error: ") and expected in line, result.stderr
    assert [u.rsplit("/", 1)[-1] for u in storage.ls(out)] == list(written)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_training_cli_reports_bad_input_in_one_line(case, inputs, tmp_path):
    extra, expected = TRAIN_CASES[case]
    out = str(tmp_path / "out")
    args = ["--backbone", "vits14", "--tiny", "--labels", inputs["labels"], "--out", out,
            "--set", "batch_size=8", "--set", "micro_batch_size=8", "--set", "loader_workers=0",
            "--set", "resize=64", "--set", "crop=56", "--set", "head_dim=16"]
    result = CliRunner().invoke(train_app, [*args, *(a.format(**inputs) for a in extra)])
    _check(result, "training.run", expected.format(**inputs), out)


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_evaluation_cli_reports_bad_input_in_one_line(case, inputs, tmp_path):
    extra, expected = EVAL_CASES[case]
    out = str(tmp_path / "out")
    args = ["--tiny", "--backbone", "vits14", "--dataset", "synthetic", "--data-root",
            inputs["data"], "--out", out, "--set", "device=cpu", "--set", "input_size=28"]
    result = CliRunner().invoke(eval_app, [*args, *(a.format(**inputs) for a in extra)])
    # a weight file is only known to be wrong once loaded, after the resolved config is saved
    written = ("config.yaml",) if case == "weights of another model" else ()
    _check(result, "evaluation.run", expected.format(**inputs), out, written)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU that is missing")
def test_asking_for_a_missing_gpu_is_bad_input(inputs, tmp_path):
    out = str(tmp_path / "out")
    args = ["--tiny", "--labels", inputs["labels"], "--out", out, "--use-gpu",
            "--set", "batch_size=8", "--set", "micro_batch_size=8", "--set", "loader_workers=0",
            "--set", "resize=64", "--set", "crop=56", "--set", "head_dim=16"]
    result = CliRunner().invoke(train_app, args)
    _check(result, "training.run", "--use-gpu was given but torch sees no CUDA device", out)
