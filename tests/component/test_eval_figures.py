"""Figures: correlation maps of two encoders, segmentations next to ground truth, a pseudo-task."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from evaluation.figures import (
    colorize,
    correlation_figure,
    correlation_map,
    palette,
    plot_correlation,
    plot_pseudo_task,
    plot_segmentations,
)
from shared import storage
from shared.backbones import load_backbone
from shared.images import decode_image, encode_jpeg, eval_geometry, to_tensor
from shared.labelset import LabelSet, LabelSetWriter
from shared.synthetic import make_scene


def _pixels(uri: str) -> np.ndarray:
    """The figure as (H, W, 3) uint8 RGB; it must be a PNG."""
    data = storage.read_bytes(uri)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return decode_image(data, uri)


def _box(pixels: np.ndarray, colour) -> tuple[float, float, float, float, float]:
    """(x centre / W, y centre / H, width, height, filled fraction of the box) of the pixels of
    exactly ``colour``."""
    ys, xs = np.nonzero((pixels == np.asarray(colour, np.uint8)).all(-1))
    assert len(xs), f"no pixel of colour {colour}"
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    return (xs.mean() / pixels.shape[1], ys.mean() / pixels.shape[0], width, height,
            len(xs) / (width * height))


def _class_fractions(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Share of each palette colour among the pixels drawn in palette colours."""
    counts = np.array([(pixels == c).all(-1).sum() for c in colours], np.float64)
    return counts / counts.sum()


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
    green = (10, 200, 30)
    query = np.full((56, 56, 3), green, np.uint8)  # a plain query: its panel is easy to find
    reference, _ = make_scene(2, (56, 56))
    uri = str(tmp_path / "corr.png")
    maps = plot_correlation(query, reference, (1, 2), [("A", a), ("B", b)], 56, uri)
    assert len(maps) == 2 and maps[0].shape == (4, 4)
    assert not np.allclose(maps[0], maps[1])  # two encoders, two different maps
    pixels = _pixels(uri)
    height, width = pixels.shape[:2]
    ys, xs = np.nonzero((pixels == green).all(-1))
    x0, y0, scale = xs.min(), ys.min(), (xs.max() - xs.min() + 1) / 56  # the query panel
    assert xs.max() < width / 3  # the first of three panels side by side
    # the red box frames patch (row 1, col 2): image pixels 28..42 across, 14..28 down
    ry, rx = np.nonzero((pixels == (255, 0, 0)).all(-1))
    for got, expected in ((rx.min(), x0 + 28 * scale), (rx.max(), x0 + 42 * scale),
                          (ry.min(), y0 + 14 * scale), (ry.max(), y0 + 28 * scale)):
        assert abs(got - expected) <= 4
    # the heat-map panels: the wide runs of drawn columns right of the query (not the bar)
    drawn = (pixels[(y0 + ys.max()) // 2] != 255).any(-1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], drawn.astype(int), [0]])))
    runs = [(lo, hi) for lo, hi in zip(edges[::2], edges[1::2], strict=True)
            if hi - lo > 28 * scale and lo > xs.max()]
    assert len(runs) == 2  # one per encoder
    # drawn from the two maps: the two panels differ, pixel for pixel
    side = min(hi - lo for lo, hi in runs)
    panel_a, panel_b = (pixels[y0:ys.max(), lo:lo + side].astype(int) for lo, _ in runs)
    assert np.abs(panel_a - panel_b).mean() > 5


def test_correlation_figure_shows_its_colour_scale_in_a_colour_bar():
    torch.manual_seed(0)
    a = load_backbone("vits14", None, tiny=True, device="cpu")
    torch.manual_seed(1)
    b = load_backbone("vits14", None, tiny=True, device="cpu")
    query, _ = make_scene(1, (56, 56))
    reference, _ = make_scene(2, (56, 56))
    fig, maps = correlation_figure(query, reference, (1, 2), [("A", a), ("B", b)], 56)
    heat = [im for ax in fig.axes for im in ax.get_images() if im.get_cmap().name == "inferno"]
    assert len(heat) == 2  # one heat map per encoder, in the colour map
    for image, corr in zip(heat, maps, strict=True):
        assert np.allclose(image.get_array(), corr)
        assert (image.norm.vmin, image.norm.vmax) == (-1, 1)  # one scale for both encoders
    bar = heat[-1].colorbar
    assert bar is not None and bar.ax in fig.axes
    assert len(fig.axes) == 4  # query, two encoders, the colour bar
    assert bar.cmap.name == "inferno" and (bar.norm.vmin, bar.norm.vmax) == (-1, 1)
    assert "cosine" in bar.ax.get_ylabel()


def test_segmentation_figure(tmp_path):
    green, blue = (10, 200, 30), (10, 30, 200)
    images = [np.full((40, 40, 3), c, np.uint8) for c in (green, blue)]
    full = lambda k: np.full((40, 40), k)  # noqa: E731
    uri = str(tmp_path / "seg.png")
    # row 0: prediction 2, truth 4; row 1: prediction 5, truth 3
    plot_segmentations(images, [full(2), full(5)], [full(4), full(3)], 6, uri)
    pixels = _pixels(uri)
    colours = palette(6)
    panels = {green: (1 / 6, 0.25), blue: (1 / 6, 0.75), tuple(colours[2]): (0.5, 0.25),
              tuple(colours[4]): (5 / 6, 0.25), tuple(colours[5]): (0.5, 0.75),
              tuple(colours[3]): (5 / 6, 0.75)}  # (column, row) centres of 3 x 2 panels
    for colour, (x, y) in panels.items():
        cx, cy, w, h, filled = _box(pixels, colour)
        assert abs(cx - x) < 0.05 and abs(cy - y) < 0.06, colour
        assert filled > 0.99 and abs(w - h) <= 2 and w > pixels.shape[1] / 5, colour
    assert not (pixels == colours[1]).all(-1).any()  # a class no map holds is not drawn
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
    pixels = _pixels(uri)
    height, width = pixels.shape[:2]
    colours = palette(6, None)[:6]
    # bottom row: the query's and the positive's pseudo-labels, each class at its own area
    for image_id, part in (("q", slice(0, width // 2)), ("p", slice(width // 2, width))):
        drawn = _class_fractions(pixels[height // 2:, part], colours)
        areas = np.bincount(maps[image_id].reshape(-1), minlength=6) / maps[image_id].size
        np.testing.assert_allclose(drawn, areas, atol=0.01)
        # the top row shows the images, not label colours (a stray pixel may match by chance)
        assert sum((pixels[: height // 2, part] == c).all(-1).sum() for c in colours) < 10
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
    # the figure's labels are the retrieval's: the benchmark path predicts the same maps
    expected = _retrieved_labels(backbone, bank, [s[0] for s in samples], k=5)
    assert all(np.array_equal(p, e) for p, e in zip(preds, expected, strict=True))
    uri = str(tmp_path / "retrieved.png")
    truths = [eval_geometry(to_tensor(s[0]), torch.from_numpy(s[1]), 28)[1].numpy()
              for s in samples]
    plot_segmentations([s[0] for s in samples], preds, truths, 6, uri)
    pixels = _pixels(uri)
    height, width = pixels.shape[:2]
    colours = palette(6)
    for row, (pred, truth) in enumerate(zip(preds, truths, strict=True)):  # each drawn panel
        rows = slice(row * height // 2, (row + 1) * height // 2)
        for column, labels in ((1, pred), (2, truth)):
            panel = pixels[rows, column * width // 3:(column + 1) * width // 3]
            drawn = labels.reshape(-1).astype(np.int64)
            areas = np.bincount(drawn[drawn < 6], minlength=6)  # 255 (ignore) is drawn white
            np.testing.assert_allclose(_class_fractions(panel, colours[:6]),
                                       areas / areas.sum(), atol=0.02)


def _retrieved_labels(backbone, bank, images: list[np.ndarray], k: int) -> list[np.ndarray]:
    """argmax of the bilinearly upsampled top-k soft transfer, recomputed from the bank."""
    import torch.nn.functional as F

    feats, values = bank.load_all()
    feats = F.normalize(feats.float(), dim=-1)
    out = []
    for image in images:
        x = eval_geometry(to_tensor(image), None, 28)[0]
        with torch.no_grad():
            query = F.normalize(backbone.dense_features(x[None])[0].float(), dim=-1)  # (2, 2, D)
        sims, idx = torch.topk(query.reshape(4, -1) @ feats.T, k, dim=1)
        pred = (torch.softmax(sims / 0.07, dim=1)[:, :, None] * values.float()[idx]).sum(1)
        scores = F.interpolate(pred.T.reshape(1, -1, 2, 2), size=(28, 28), mode="bilinear",
                               align_corners=False)
        out.append(scores[0].argmax(0).numpy())
    return out
