"""The classical segmenter (Felzenszwalb-Huttenlocher): hand-made images, the segmenter contract,
settings validation, its identity, and that choosing it builds nothing of DiffCut."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from labeling import classical
from labeling.classical import FelzenszwalbSegmenter, felzenszwalb_map, working_size
from labeling.config import FelzenszwalbConfig, LabelConfig
from labeling.segmenter import ImageInputError, available_segmenters, get_segmenter
from shared.config import ConfigError, load_config
from shared.synthetic import make_scene


def halves(height: int, width: int, split: int) -> np.ndarray:
    """(H, W, 3) uint8: columns before `split` one flat colour, the rest another."""
    image = np.empty((height, width, 3), np.uint8)
    image[:, :split] = (30, 160, 40)
    image[:, split:] = (220, 40, 200)
    return image


@pytest.mark.parametrize("resolution", [80, 128, 48])  # native, upsampled, downsampled work
def test_two_flat_halves_are_two_segments_split_at_the_boundary(resolution):
    seg = FelzenszwalbSegmenter(resolution=resolution)
    (out,) = seg.segment([halves(64, 80, 40)])
    assert out.shape == (64, 80) and out.dtype == np.uint16
    assert np.unique(out).tolist() == [0, 1]
    assert (out[:, :40] == out[0, 0]).all() and (out[:, 40:] == out[0, -1]).all()
    assert out[0, 0] != out[0, -1]


def test_a_boundary_off_the_working_grid_moves_by_less_than_a_working_pixel():
    seg = FelzenszwalbSegmenter(resolution=32)  # 96 -> 32 wide: a working pixel is 3 columns
    (out,) = seg.segment([halves(48, 96, 50)])
    boundary = int(np.argmax(out[0] != out[0, 0]))  # first column of the second segment
    assert np.unique(out).tolist() == [0, 1] and abs(boundary - 50) < 3
    assert (out == out[:1]).all()  # every row splits at the same column


def test_maps_keep_the_contract_on_odd_gray_and_rgba_images():
    rng = np.random.default_rng(0)
    scene, _ = make_scene(5, (75, 131))
    gray = rng.integers(0, 256, (40, 33), dtype=np.uint8)
    rgba = np.concatenate([make_scene(6, (50, 60))[0], np.full((50, 60, 1), 7, np.uint8)], 2)
    seg = FelzenszwalbSegmenter()
    maps = seg.segment([scene, gray, rgba])
    tensors = seg.segment_tensors([scene, gray, rgba])
    for image, out, tensor in zip([scene, gray, rgba], maps, tensors, strict=True):
        assert out.shape == image.shape[:2] and out.dtype == np.uint16
        assert np.array_equal(np.unique(out), np.arange(out.max() + 1))  # contiguous from 0
        assert tensor.dtype == torch.int32 and tensor.device.type == "cpu"
        assert np.array_equal(tensor.numpy(), out)
    assert maps[0].max() >= 1  # a scene with objects has more than one segment


def test_ids_stay_contiguous_where_the_map_is_shrunk_back():
    # a small image is enlarged to the working size; smoothing then makes segments thinner than
    # one of its pixels, which the nearest shrink back skips
    image = np.random.default_rng(1).integers(0, 256, (33, 40, 3), dtype=np.uint8)
    (out,) = FelzenszwalbSegmenter(sigma=2.0, min_size=1, scale=10.0).segment([image])
    assert out.shape == (33, 40) and np.array_equal(np.unique(out), np.arange(out.max() + 1))


def test_a_uniform_image_is_one_segment():
    (out,) = FelzenszwalbSegmenter().segment([np.full((40, 50, 3), 90, np.uint8)])
    assert (out == 0).all()


def test_bad_inputs_are_refused_by_position():
    seg = FelzenszwalbSegmenter()
    with pytest.raises(ImageInputError, match="image 1: .*too small"):
        seg.segment([np.zeros((40, 40, 3), np.uint8), np.zeros((8, 40, 3), np.uint8)])
    with pytest.raises(ImageInputError, match="image 0: expected dtype uint8"):
        seg.segment([np.zeros((40, 40, 3), np.float32)])


def test_the_thread_pool_gives_the_sequential_maps(monkeypatch):
    images = [make_scene(i, (64, 80))[0] for i in range(6)]
    sequential = [felzenszwalb_map(im, FelzenszwalbConfig()) for im in images]
    threads: set[str] = set()
    real = classical.felzenszwalb_map

    def recording(image, settings):
        threads.add(threading.current_thread().name)
        return real(image, settings)

    monkeypatch.setattr(classical, "felzenszwalb_map", recording)
    pooled = FelzenszwalbSegmenter(threads=3).segment(images)
    assert all(np.array_equal(a, b) for a, b in zip(sequential, pooled, strict=True))
    assert threads and all(name.startswith("felzenszwalb") for name in threads)
    threads.clear()
    FelzenszwalbSegmenter(threads=1).segment(images)
    assert threads == {threading.current_thread().name}  # one thread: no pool at all


def test_maps_are_left_on_the_requested_device():
    seg = get_segmenter("felzenszwalb", device="meta")  # any torch device: the copy is the base's
    assert seg.device == torch.device("meta")
    (out,) = seg.segment_tensors([halves(40, 40, 20)])
    assert out.device.type == "meta" and out.dtype == torch.int32


@pytest.mark.gpu
def test_maps_on_a_gpu_equal_the_host_maps():
    images = [make_scene(i, (64, 80))[0] for i in range(3)]
    maps = FelzenszwalbSegmenter(device="cuda").segment_tensors(images)
    assert all(m.device.type == "cuda" and m.dtype == torch.int32 for m in maps)
    host = FelzenszwalbSegmenter().segment(images)
    assert all(np.array_equal(m.cpu().numpy(), h) for m, h in zip(maps, host, strict=True))


def test_working_size_keeps_the_aspect_ratio():
    assert working_size(64, 80, 128) == (102, 128)
    assert working_size(480, 640, 128) == (96, 128)
    assert working_size(100, 100, 100) == (100, 100)
    assert working_size(3000, 20, 128) == (128, 1)


@pytest.mark.parametrize("field, value", [("scale", 0), ("sigma", -0.5), ("min_size", 0),
                                          ("resolution", 16)])
def test_an_invalid_setting_is_an_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"FelzenszwalbConfig.*\n  - {field}: "):
        FelzenszwalbSegmenter(**{field: value})
    with pytest.raises(ConfigError, match=rf"  - felzenszwalb\.{field}: "):
        load_config(LabelConfig, overrides=[f"felzenszwalb.{field}={value}"])
    with pytest.raises(ValidationError, match=rf"felzenszwalb\.{field}"):
        LabelConfig.model_validate({"felzenszwalb": {field: value}})


def test_an_unknown_setting_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="unknown key 'scal'"):
        FelzenszwalbSegmenter(config={"scal": 10.0})
    with pytest.raises(ValueError, match="threads must be at least 1"):
        FelzenszwalbSegmenter(threads=0)


def test_settings_come_from_defaults_then_config_then_keywords():
    seg = FelzenszwalbSegmenter(config=FelzenszwalbConfig(scale=300.0, sigma=2.0), sigma=1.5)
    assert seg.settings == FelzenszwalbConfig(scale=300.0, sigma=1.5)
    assert FelzenszwalbSegmenter(config={"min_size": 7}).settings.min_size == 7


def test_identity_records_every_setting():
    base = FelzenszwalbSegmenter().identity()
    assert base["name"] == "felzenszwalb" and base["implementation"].startswith("scikit-image ")
    assert {k: base[k] for k in FelzenszwalbConfig.model_fields} == FelzenszwalbConfig().model_dump()
    for field, value in [("scale", 999.0), ("sigma", 0.1), ("min_size", 3), ("resolution", 64)]:
        other = FelzenszwalbSegmenter(**{field: value}).identity()
        assert other[field] == value and other != base


def test_registered_never_the_default_and_built_without_diffcut(monkeypatch):
    from labeling import diffcut, stages

    assert "felzenszwalb" in available_segmenters()
    assert LabelConfig().segmenter == "diffcut"

    def refuse(*args, **kwargs):
        raise AssertionError("DiffCut was built for the felzenszwalb segmenter")

    monkeypatch.setattr(diffcut.DiffCutFeatureExtractor, "from_pretrained", refuse)
    monkeypatch.setattr(diffcut.DiffCutFeatureExtractor, "__init__", refuse)
    monkeypatch.setattr(diffcut, "tiny_sdxl_components", refuse)
    for tiny in (False, True):
        cfg = LabelConfig(segmenter="felzenszwalb", tiny=tiny, felzenszwalb={"scale": 250.0})
        seg = stages.build_segmenter(cfg, torch.device("cpu"))
        assert isinstance(seg, FelzenszwalbSegmenter) and seg.settings.scale == 250.0
