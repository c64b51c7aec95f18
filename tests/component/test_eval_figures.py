"""Figures: correlation maps of two encoders, segmentations next to ground truth, a pseudo-task."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from evaluation.figures import (
    colorize,
    correlation_map,
    palette,
    plot_correlation,
    plot_pseudo_task,
    plot_segmentations,
)
from shared import storage
from shared.backbones import load_backbone
from shared.images import decode_image, encode_jpeg
from shared.labelset import LabelSet, LabelSetWriter
from shared.synthetic import make_scene


def _png_size(uri: str) -> tuple[int, int]:
    data = storage.read_bytes(uri)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return decode_image(data, uri).shape[:2]


def test_correlation_map_peaks_at_the_same_feature():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 4, 8, generator=gen)
    corr = correlation_map(ref[1, 2] * 5, ref)
    assert corr.shape == (3, 4)
    assert corr[1, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert int(corr.argmax()) == 1 * 4 + 2


def test_correlation_figure_for_two_encoders(tmp_path):
    torch.manual_seed(0)
    a = load_backbone("vits14", None, tiny=True, device="cpu")
    torch.manual_seed(1)
    b = load_backbone("vits14", None, tiny=True, device="cpu")
    query, _ = make_scene(1, (56, 56))
    reference, _ = make_scene(2, (56, 56))
    uri = str(tmp_path / "corr.png")
    maps = plot_correlation(query, reference, (1, 2), [("A", a), ("B", b)], 56, uri)
    assert len(maps) == 2 and maps[0].shape == (4, 4)
    assert not np.allclose(maps[0], maps[1])  # two encoders, two different maps
    h, w = _png_size(uri)
    assert w > 2 * h  # three panels side by side


def test_segmentation_figure(tmp_path):
    image, mask = make_scene(3, (40, 40))
    uri = str(tmp_path / "seg.png")
    plot_segmentations([image, image], [mask, np.zeros_like(mask)], [mask, mask], 6, uri)
    h, w = _png_size(uri)
    assert h > w / 3  # two rows of three panels
    colours = palette(6)
    assert tuple(colorize(np.array([[255]]), colours)[0, 0]) == (255, 255, 255)


def test_pseudo_task_figure_from_a_label_set(tmp_path):
    root = str(tmp_path / "ls")
    ids, maps = ["q", "p"], {}
    for seed, image_id in enumerate(ids):
        image, mask = make_scene(seed, (32, 32))
        storage.write_bytes(str(tmp_path / f"{image_id}.jpg"), encode_jpeg(image))
        maps[image_id] = mask.astype(np.uint16)
    writer = LabelSetWriter(root, {"test": 1})
    images = pa.table({"image_id": ids, "uri": [str(tmp_path / f"{i}.jpg") for i in ids],
                       "width": [32, 32], "height": [32, 32], "status": ["ok", "ok"],
                       "error": [None, None]})
    with writer.shard("labels", 0) as out:
        out.write_table("images", images)
        out.write_maps("labels", maps)
    writer.write_table("pairs", pa.table({
        "query_id": ["q"], "positive_id": ["p"], "class_id": pa.array([1], pa.int32()),
        "query_area": pa.array([0.2], pa.float32()),
        "positive_area": pa.array([0.3], pa.float32())}))
    writer.finish({"num_classes": 6})
    uri = str(tmp_path / "task.png")
    assert plot_pseudo_task(LabelSet(root), "q", uri) == "p"
    assert min(_png_size(uri)) > 100
    with pytest.raises(ValueError, match="no pair"):
        plot_pseudo_task(LabelSet(root), "p", uri)


def test_retrieved_segmentations_from_a_bank(tmp_path):
    from evaluation.bank import encoder_identity
    from evaluation.config import MemoryConfig, SearchConfig
    from evaluation.datasets import open_dataset
    from evaluation.memory import BankSpec, DatasetRef, EncoderRef, build_memory_bank
    from evaluation.retrieval import predict_segmentation
    from shared.backbones import save_backbone
    from shared.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(str(tmp_path / "d"), num_train=3, num_val=2, size=(32, 32))
    torch.manual_seed(0)
    backbone = load_backbone("vits14", None, tiny=True, device="cpu")
    save_backbone(backbone, str(tmp_path / "e.safetensors"))
    cfg = MemoryConfig(size=100, executor="local")
    spec = BankSpec(EncoderRef("vits14", str(tmp_path / "e.safetensors"), True),
                    encoder_identity(backbone), DatasetRef("synthetic", data, "train"),
                    (0, 1, 2), 28, cfg.model_dump(mode="json"), 0, "segmentation", 6)
    bank = build_memory_bank(spec, str(tmp_path / "bank"), cfg, log=lambda m: None)
    val = open_dataset("synthetic", data, "val")
    samples = [val.load(i) for i in range(2)]
    preds = predict_segmentation(backbone, bank, [s[0] for s in samples], SearchConfig(k=5), 28,
                                 device="cpu")
    assert [p.shape for p in preds] == [(28, 28), (28, 28)]
    assert all(p.min() >= 0 and p.max() < 6 for p in preds)
    uri = str(tmp_path / "retrieved.png")
    plot_segmentations([s[0] for s in samples], preds, [s[1] for s in samples], 6, uri)
    assert _png_size(uri)[0] > 100
