"""The demo end to end (tiny models, local Ray, local disk), and the paper path up to model loading."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from demo.run import (
    AFTER,
    BASE_WEIGHTS,
    BEFORE,
    SOURCES,
    DemoConfig,
    app,
    encoder_uri,
    eval_config,
    label_config,
    paths,
    run_demo,
    train_config,
)
from evaluation.config import EvalConfig
from labeling.config import LabelConfig
from labeling.importing import ImportConfig
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

    # every row comes from the evaluation's own results: the initial and each exported encoder
    results = storage.read_json(storage.join(p["eval"], "results.json"))["runs"]
    by_weights = {r["weights"]: r["value"] for r in results}
    assert list(report["post_training"]) == list(SOURCES)
    assert report["weights"] == {BEFORE: p["init"],
                                 **{s: encoder_uri(out, s) for s in SOURCES}}
    before = load_backbone("vits14", p["init"], tiny=True, device="cpu").model.state_dict()
    base = load_backbone("vits14", str(BASE_WEIGHTS["vits14"]), tiny=True, device="cpu")
    assert all(torch.equal(v, base.model.state_dict()[k]) for k, v in before.items())
    for source, row in report["post_training"].items():
        assert row[BEFORE] == round(100 * by_weights[p["init"]], 2)
        assert row[AFTER] == round(100 * by_weights[encoder_uri(out, source)], 2)
        assert row["gain"] == round(100 * (by_weights[encoder_uri(out, source)]
                                           - by_weights[p["init"]]), 2)
        # post-training changed the encoder it started from, in its blocks and final norm only
        after = load_backbone("vits14", encoder_uri(out, source), tiny=True,
                              device="cpu").model.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed and all(k.startswith(("blocks.", "norm.")) for k in changed), changed
        assert any(k.startswith("blocks.0.") for k in changed)  # every tiny block trains
        assert row["training"]["steps"] == row["training"]["total_steps"] >= 12
        labels = LabelSet(p["labels"] + "/" + source)
        assert row["labels"]["pairs"] == labels.pairs().num_rows > 0
        expected = None if source == "oracle" else labels.meta["counts"]["quality"]
        assert row["pseudo_label_quality"] == expected
    assert LabelSet(p["labels"] + "/classical").meta["config"]["segmenter"] == "felzenszwalb"
    oracle = LabelSet(p["labels"] + "/oracle")
    assert oracle.meta["source"]["kind"] == "ground_truth" and oracle.num_classes == 6

    md = storage.read_text(storage.join(out, "report.md"))
    for source, row in report["post_training"].items():
        assert f"| {source} | {row[BEFORE]:.2f} | {row[AFTER]:.2f} | {row['gain']:.2f} |" in md
    assert set(report["figures"]) == {"correlation", "segmentations_before", "pseudo_task",
                                      *(f"segmentations_{s}" for s in SOURCES)}
    for name, uri in report["figures"].items():
        assert storage.read_bytes(uri)[:8] == PNG_MAGIC, name
        assert f"(figures/{name}.png)" in md
    for stage in ("labeling (diffcut)", "labeling (oracle)", "training (classical)",
                  "evaluation"):
        assert report["timings"][stage] > 0 and f"| {stage} |" in md
    assert storage.read_json(storage.join(out, "report.json")) == report

    # the resolved configs reload into their models and are the ones that ran
    classes = {"demo": DemoConfig, "labeling-diffcut": LabelConfig, "labeling-oracle": ImportConfig,
               "training-oracle": TrainConfig, "evaluation": EvalConfig}
    loaded = {k: cls.model_validate(yaml.safe_load(storage.read_text(report["configs"][k])))
              for k, cls in classes.items()}
    assert loaded["demo"] == demo
    assert loaded["evaluation"].weights == [p["init"], *(encoder_uri(out, s) for s in SOURCES)]
    assert loaded["training-oracle"].weights == p["init"] and loaded["training-oracle"].tiny


def test_paper_configs_use_the_hub_models_and_the_papers_settings(tmp_path):
    demo = DemoConfig(models="paper", out=str(tmp_path))
    label, train = label_config(demo, "diffcut"), train_config(demo, "diffcut", num_pairs=2000)
    evaluation = eval_config(demo, ["hub", encoder_uri(demo.out, "diffcut")])
    assert (label.weights, label.tiny, label.backbone) == ("hub", False, "vits14")
    assert label.diffcut == LabelConfig().diffcut  # SSD-1B at 1024, t=50, tau 0.5, alpha 10
    assert label.diffcut.model == "segmind/SSD-1B" and label.feature_size == 448
    assert (label.neighbours, label.min_area) == (5, 0.05)
    defaults = TrainConfig()
    ours = {"labels", "out"}
    assert label_config(demo, "classical").segmenter == "felzenszwalb"
    oracle = label_config(demo, "oracle")
    assert (oracle.weights, oracle.tiny, oracle.masks) == ("hub", False,
                                                           paths(demo.out)["data"] + "/masks/train")
    assert {k: v for k, v in train.model_dump().items() if k not in ours} == \
        {k: v for k, v in defaults.model_dump().items() if k not in ours}
    assert evaluation.weights[0] == "hub" and not evaluation.tiny
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
    assert seen["label"] == label_config(cfg, "diffcut")
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
    train = train_config(demo, "oracle", num_pairs=100)  # 100 // 16 = 6 steps per epoch
    assert train.epochs == 50 and train.epochs * steps_per_epoch(100, train.batch_size) == 300
    assert train.lr == pytest.approx(1e-2) and train.weights == paths(demo.out)["init"]
    assert train.trainable_blocks == 4 and train.labels == paths(demo.out)["labels"] + "/oracle"
    train = train_config(demo.model_copy(update={"steps": 7}), "oracle", num_pairs=100)
    assert train.epochs == 2  # at least the asked steps: 2 epochs of 6


def test_a_demo_config_names_its_sources_and_base():
    with pytest.raises(ValueError, match="sources"):
        DemoConfig(sources=[])
    with pytest.raises(ValueError, match="each source once"):
        DemoConfig(sources=["oracle", "oracle"])
    with pytest.raises(ValueError, match="no tiny base is shipped for backbone 'vitb14'"):
        DemoConfig(backbone="vitb14")
    assert DemoConfig(backbone="vitb14", base="random").base == "random"


def test_verdict_states_each_change_without_rounding_it_away():
    from demo.report import verdict

    rows = {"oracle": {"before": 10.0, "after": 12.34, "gain": 2.34},
            "diffcut": {"before": 10.0, "after": 5.0, "gain": -5.0},
            "classical": {"before": 10.0, "after": 10.0, "gain": 0.0}}
    text = verdict(rows, "paper")
    assert ("Post-training on oracle labels (the scenes' ground truth) raised the in-context "
            "mIoU by 2.34 points (10.00 -> 12.34).") in text
    assert "DiffCut pseudo-labels lowered the in-context mIoU by 5.00 points" in text
    assert "(Felzenszwalb) pseudo-labels did not change the in-context mIoU (10.00 -> 10.00)" in text
    assert "tiny models" in verdict(rows, "tiny") and "tiny models" not in text
    assert "no mIoU" in verdict({"oracle": {"before": None, "after": 1.0, "gain": None}}, "paper")
