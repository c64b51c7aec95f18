"""What a finished training run writes beside its encoder: the model hub folder and loss.png."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import yaml

from shared import storage
from shared.backbones import load_backbone
from training.config import TrainConfig
from training.loop import train
from training.plots import figure_png, loss_figure


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_labelset):
    """One tiny DINOv3 run of 4 steps: its output folder."""
    root = tmp_path_factory.mktemp("exports")
    labels = synthetic_labelset(str(root / "ls"), 8, size=(64, 64), seed=900, prefix="e",
                                pairing="shared")
    out = str(root / "run")
    cfg = TrainConfig(labels=labels, out=out, backbone="dinov3_vits16", tiny=True, weights=None,
                      head_dim=32, resize=64, crop=48, batch_size=8, micro_batch_size=8,
                      base_lr=1e-3 * 256 / 8, loader_workers=0, epochs=4)
    train(cfg)
    return out


def test_the_hub_folder_holds_the_trained_encoder_and_its_config(run):
    hub = storage.join(run, "encoder-hub")
    weights = storage.join(hub, "model.safetensors")
    assert storage.read_bytes(weights) == storage.read_bytes(storage.join(run, "encoder.safetensors"))
    config = json.loads(storage.read_text(storage.join(hub, "config.json")))
    assert config["architecture"] == "vit_small_patch16_dinov3"
    assert config["pretrained_cfg"]["input_size"] == [3, 48, 48]  # the run's crop
    assert config["pretrained_cfg"]["crop_pct"] == 48 / 64
    model = timm.create_model(config["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=weights), **config["model_args"])
    encoder = load_backbone("dinov3_vits16", storage.join(run, "encoder.safetensors"), tiny=True,
                            device="cpu")
    x = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(encoder.normalize(x)), encoder.tokens(x))
    card = storage.read_text(storage.join(hub, "README.md"))
    block = card.split("## Training config\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == yaml.safe_load(storage.read_text(storage.join(run,
                                                                                  "config.yaml")))


def test_loss_png_is_the_curve_of_the_metrics(run):
    metrics = storage.read_parquet(storage.join(run, "metrics.parquet"))
    assert metrics.num_rows == 4
    fig = loss_figure(metrics)
    loss_ax = fig.axes[0]
    [line] = loss_ax.get_lines()
    assert np.array_equal(line.get_xdata(), metrics.column("step").to_numpy())
    assert np.allclose(line.get_ydata(), metrics.column("loss").to_numpy())
    [lr_line] = fig.axes[1].get_lines()
    assert np.allclose(lr_line.get_ydata(), metrics.column("lr").to_numpy())
    assert loss_ax.get_xlabel() == "optimizer step"
    # the file the run wrote is this very figure
    assert storage.read_bytes(storage.join(run, "loss.png")) == figure_png(loss_figure(metrics))


def test_metrics_without_a_loss_column_are_refused():
    import pyarrow as pa

    with pytest.raises(ValueError, match=r"lack columns \['loss'\]"):
        loss_figure(pa.table({"step": [1, 2]}))
