"""The demo end to end (tiny models, local Ray, local disk), and the paper path up to model loading."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from demo.run import AFTER, BEFORE, DemoConfig, app, paths, run_demo, stage_configs
from evaluation.config import EvalConfig
from labeling.config import LabelConfig
from shared import storage
from shared.backbones import load_backbone
from shared.labelset import LabelSet
from training.config import TrainConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Reached(Exception):
    """Raised by a stand-in for a hub loader: the code path got as far as loading weights."""


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_demo_end_to_end(ray_local, tmp_path):
    out = str(tmp_path / "demo")
    demo = DemoConfig(out=out, train_images=16, val_images=4, image_size=64, classes=4, steps=12)
    report = run_demo(demo, log=lambda m: None)
    p = paths(out)

    # both mIoUs come from the evaluation's own results, for the initial and the exported encoder
    results = storage.read_json(storage.join(p["eval"], "results.json"))["runs"]
    by_weights = {r["weights"]: r["value"] for r in results}
    encoder_uri = storage.join(p["train"], "encoder.safetensors")
    assert report["weights"] == {BEFORE: p["init"], AFTER: encoder_uri}
    miou = report["in_context_miou"]
    assert miou[BEFORE] == by_weights[p["init"]] and miou[AFTER] == by_weights[encoder_uri]
    assert all(0.0 <= miou[k] <= 1.0 for k in (BEFORE, AFTER))
    assert miou["delta"] == pytest.approx(miou[AFTER] - miou[BEFORE])

    # post-training changed the encoder it started from (the head is not part of the export)
    before = load_backbone("vits14", p["init"], tiny=True, device="cpu").model.state_dict()
    after = load_backbone("vits14", encoder_uri, tiny=True, device="cpu").model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith(("blocks.1.", "blocks.2.", "blocks.3.", "norm."))
                           for k in changed), changed

    # pseudo-label quality is the label set's own
    quality = LabelSet(p["labels"]).meta["counts"]["quality"]
    assert report["pseudo_labels"]["quality"] == quality
    assert report["pseudo_labels"]["num_classes"] == 4
    assert report["training"]["steps"] == report["training"]["total_steps"] >= 12

    md = storage.read_text(storage.join(out, "report.md"))
    for value in (miou[BEFORE], miou[AFTER], quality["hungarian_miou"], quality["majority_miou"]):
        assert f"{100 * value:.2f}" in md
    for name, uri in report["figures"].items():
        assert storage.read_bytes(uri)[:8] == PNG_MAGIC, name
        assert f"(figures/{name}.png)" in md
    for stage in ("labeling", "training", "evaluation"):
        assert report["timings"][stage] > 0 and f"| {stage} |" in md
    assert storage.read_json(storage.join(out, "report.json")) == report

    # the resolved configs reload into their models and are the ones that ran
    classes = {"demo": DemoConfig, "labeling": LabelConfig, "training": TrainConfig,
               "evaluation": EvalConfig}
    loaded = {k: cls.model_validate(yaml.safe_load(storage.read_text(report["configs"][k])))
              for k, cls in classes.items()}
    assert loaded["demo"] == demo
    assert loaded["evaluation"].weights == [p["init"], encoder_uri]
    assert loaded["training"].weights == p["init"] and loaded["training"].tiny


def test_paper_configs_use_the_hub_models_and_the_papers_settings(tmp_path):
    demo = DemoConfig(models="paper", out=str(tmp_path))
    label, train, evaluation = stage_configs(demo, num_pairs=2000)
    assert (label.weights, label.tiny, label.backbone) == ("hub", False, "vits14")
    assert label.diffcut == LabelConfig().diffcut  # SSD-1B at 1024, t=50, tau 0.5, alpha 10
    assert label.diffcut.model == "segmind/SSD-1B" and label.feature_size == 448
    assert (label.neighbours, label.min_area) == (5, 0.05)
    defaults = TrainConfig()
    ours = {"labels", "out"}
    assert {k: v for k, v in train.model_dump().items() if k not in ours} == \
        {k: v for k, v in defaults.model_dump().items() if k not in ours}
    assert evaluation.weights == ["hub"] and not evaluation.tiny
    assert evaluation.input_size is None  # the backbone's evaluation size, 504 at /14
    assert (evaluation.search.k, evaluation.search.temperature) == (30, 0.07)
    assert (evaluation.memory.epochs, evaluation.memory.crop_scale) == (2, (0.5, 2.0))


def test_paper_path_reaches_the_hub_loaders(tmp_path, monkeypatch):
    import timm

    import demo.run
    import labeling.pipeline
    from labeling.diffcut import DiffCutFeatureExtractor
    from labeling.stages import build_segmenter

    seen = {}

    def fake_labeling(cfg, address=None, progress=True):
        seen["label"] = cfg
        raise Reached("labeling")

    monkeypatch.setattr(demo.run, "ensure_ray", lambda address: None)
    monkeypatch.setattr(labeling.pipeline, "run_labeling", fake_labeling)
    cfg = DemoConfig(models="paper", out=str(tmp_path / "d"), train_images=8, val_images=2,
                     image_size=32)
    with pytest.raises(Reached):
        run_demo(cfg, log=lambda m: None)
    assert seen["label"] == stage_configs(cfg)[0]
    assert storage.exists(storage.join(paths(cfg.out)["data"], "classes.json"))
    assert not storage.exists(paths(cfg.out)["init"])  # no random encoder in the paper path

    def fake_pretrained(source, variant=None, **kwargs):
        seen["diffcut"] = (source, kwargs["resolution"], kwargs["timestep"])
        raise Reached("diffcut")

    monkeypatch.setattr(DiffCutFeatureExtractor, "from_pretrained", staticmethod(fake_pretrained))
    with pytest.raises(Reached):
        build_segmenter(seen["label"], torch.device("cpu"))
    assert seen["diffcut"] == ("segmind/SSD-1B", 1024, 50)

    def fake_create_model(name, pretrained=False, **kwargs):
        seen["timm"] = (name, pretrained)
        raise Reached("timm")

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    with pytest.raises(RuntimeError, match="from the hub"):
        load_backbone(seen["label"].backbone, seen["label"].weights, seen["label"].tiny)
    assert seen["timm"] == ("vit_small_patch14_reg4_dinov2.lvd142m", True)


def test_cli_help_and_a_bad_model_size():
    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "--models" in result.output and "--out" in result.output
    result = runner.invoke(app, ["--models", "huge"])
    assert result.exit_code == 2 and "models" in result.output


def test_tiny_schedule_reaches_the_asked_steps_from_the_pair_count(tmp_path):
    from training.episodes import steps_per_epoch

    demo = DemoConfig(out=str(tmp_path), steps=300)
    _, train, _ = stage_configs(demo, num_pairs=100)  # 100 // 16 = 6 steps per epoch
    assert train.epochs == 50 and train.epochs * steps_per_epoch(100, train.batch_size) == 300
    assert train.lr == pytest.approx(3e-3) and train.weights == paths(demo.out)["init"]
    _, train, _ = stage_configs(demo.model_copy(update={"steps": 7}), num_pairs=100)
    assert train.epochs == 2  # at least the asked steps: 2 epochs of 6


def test_verdict_states_the_change_without_rounding_it_away():
    from demo.report import verdict

    assert verdict(0.1, 0.1234, "paper", 10, 8) == \
        "Post-training raised the in-context mIoU by 2.34 points (10.00 -> 12.34)."
    lowered = verdict(0.5, 0.45, "tiny", 12, 16)
    assert lowered.startswith("Post-training lowered the in-context mIoU by 5.00 points")
    assert "12 steps" in lowered and "16 scenes" in lowered
    assert "did not change" in verdict(0.2, 0.2, "paper", 1, 1)
    assert "no mIoU" in verdict(None, 0.2, "paper", 1, 1)
