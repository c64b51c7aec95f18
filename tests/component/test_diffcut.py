"""DiffCut with a tiny random-init SDXL-style pipeline: features, early stop, loading, segmenter contract."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import median_filter

from labeling import segmenter as segmenter_module
from labeling.concepts import concept_scores, upsample, upsample_argmax
from labeling.diffcut import (
    DiffCutFeatureExtractor,
    add_noise,
    encode_empty_prompt,
    tiny_extractor,
    tiny_sdxl_components,
)
from labeling.ncut import batched_recursive_ncut
from labeling.pamr import pamr
from labeling.segmenter import (
    DiffCutSegmenter,
    ImageInputError,
    Segmenter,
    available_segmenters,
    get_segmenter,
    is_uniform,
    register_segmenter,
    relabel_contiguous,
    resize_unit,
)
from shared.synthetic import make_scene

RESOLUTION = 256  # tiny VAE /8, tiny UNet /4 -> an 8 x 8 token grid


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_components()


@pytest.fixture(scope="module")
def extractor(parts):
    return tiny_extractor(parts=parts, resolution=RESOLUTION, device="cpu")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))


def test_empty_prompt_matches_the_sdxl_pipeline(parts):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**parts)
    states, _, pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    ours = encode_empty_prompt(
        [parts["tokenizer"], parts["tokenizer_2"]], [parts["text_encoder"], parts["text_encoder_2"]]
    )
    assert torch.equal(ours.states, states) and torch.equal(ours.pooled, pooled)


def test_noise_matches_the_ddim_scheduler(extractor):
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ref = extractor.scheduler.add_noise(z0, eps, torch.tensor([50, 50]))
    assert torch.allclose(add_noise(z0, eps, extractor.alpha_bar), ref, atol=1e-6)
    assert extractor.scheduler.config.timestep_spacing == "trailing"


def test_early_stop_gives_the_full_pass_features_and_skips_the_rest(extractor):
    latents = extractor.encode(images(2))
    ran = []
    handle = extractor.unet.up_blocks[0].register_forward_hook(lambda *args: ran.append(1))
    try:
        early = extractor.hooked_tokens(latents, early_stop=True)
        assert ran == []  # nothing after the hooked layer ran
        full = extractor.hooked_tokens(latents, early_stop=False)
        assert ran == [1]
    finally:
        handle.remove()
    assert early.shape == (2, 64, 32) and torch.equal(early, full)


def test_tokens_are_normalised_and_independent_of_the_batch(extractor):
    imgs = images(3, seed=1)
    together = extractor(imgs)
    assert together.shape == (3, 64, 32) and extractor.token_grid == (8, 8)
    assert torch.allclose(together.norm(dim=-1), torch.ones(3, 64), atol=1e-5)
    alone = torch.cat([extractor(imgs[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_loads_from_a_local_pipeline_folder(parts, extractor, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**parts).save_pretrained(tmp_path)
    loaded = DiffCutFeatureExtractor.from_pretrained(
        str(tmp_path), resolution=RESOLUTION, device="cpu"
    )
    imgs = images(1, seed=2)
    assert torch.allclose(loaded(imgs), extractor(imgs), atol=1e-6)
    with pytest.raises(OSError, match="unet/"):
        DiffCutFeatureExtractor.from_pretrained(str(tmp_path / "missing"), device="cpu")


@pytest.fixture(scope="module")
def segmenter(extractor):
    return get_segmenter("diffcut", extractor=extractor, batch_size=2)


def test_segment_maps_have_the_input_size_and_contiguous_ids(segmenter):
    rng = np.random.default_rng(0)
    inputs = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(48, 64), (300, 200), (33, 32)]
    ]
    for img, seg in zip(inputs, segmenter.segment(inputs), strict=True):
        assert seg.shape == img.shape[:2] and seg.dtype == np.uint16
        assert np.array_equal(np.unique(seg), np.arange(seg.max() + 1))


def test_constant_image_is_one_segment(segmenter):
    (seg,) = segmenter.segment([np.full((40, 56, 3), 128, np.uint8)])
    assert seg.shape == (40, 56) and (seg == 0).all()


def test_gray_and_rgba_inputs_are_converted(segmenter):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((64, 48, 1), 7, np.uint8)], axis=2)
    gray = rgb[..., 0]
    seg_rgb, seg_rgba, seg_gray = segmenter.segment([rgb, rgba, gray])
    assert np.array_equal(seg_rgb, seg_rgba) and seg_gray.shape == (64, 48)


def test_bad_inputs_are_refused_with_the_size_or_dtype(segmenter):
    with pytest.raises(ImageInputError, match="image 1: size 20x40"):
        segmenter.segment([np.zeros((64, 64, 3), np.uint8), np.zeros((40, 20, 3), np.uint8)])
    with pytest.raises(ImageInputError, match="uint8"):
        segmenter.segment([np.zeros((64, 64, 3), np.float64)])
    small_limit = DiffCutSegmenter(extractor=segmenter.extractor, max_pixels=4096)
    with pytest.raises(ImageInputError, match="exceeds the limit of 4096"):
        small_limit.segment([np.zeros((65, 64, 3), np.uint8)])


def test_pamr_option_keeps_the_contract(extractor):
    seg = DiffCutSegmenter(extractor=extractor, use_pamr=True, pamr_iterations=2, pamr_size=64)
    img = np.random.default_rng(2).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    (out,) = seg.segment([img])
    assert out.shape == (100, 80) and np.array_equal(np.unique(out), np.arange(out.max() + 1))
    assert seg.identity()["pamr"] == {"iterations": 2, "dilations": [1, 2, 4, 8], "size": 64}


def test_registry_knows_diffcut_and_accepts_a_second_segmenter(monkeypatch):
    monkeypatch.setattr(
        segmenter_module, "_REGISTRY", dict(segmenter_module._REGISTRY)
    )  # keep it local
    assert "diffcut" in available_segmenters()
    with pytest.raises(KeyError, match="known: .*diffcut"):
        get_segmenter("no-such-segmenter")

    class Halves(Segmenter):
        name = "halves-test"

        def _segment(self, images):
            return [(np.arange(img.shape[1])[None, :] >= img.shape[1] // 2).repeat(img.shape[0], 0).astype(np.uint16)
                    for img in images]  # fmt: skip

        def identity(self):
            return {"name": self.name}

    register_segmenter("halves-test", Halves)
    with pytest.raises(KeyError, match="already registered"):
        register_segmenter("halves-test", Halves)
    (seg,) = get_segmenter("halves-test").segment([np.zeros((40, 40), np.uint8)])
    assert seg.shape == (40, 40) and seg[0, 0] == 0 and seg[0, -1] == 1


def test_built_from_a_config_with_tiny_models():
    config = {"model": "unused-when-tiny", "resolution": 128, "tau": 0.4, "pamr": False, "seed": 3}
    seg = get_segmenter("diffcut", config=config, tiny=True, device="cpu", batch_size=4)
    assert seg.identity()["tau"] == 0.4 and seg.identity()["source"] == "tiny-random-sdxl(seed=3)"
    assert seg.extractor.token_grid == (4, 4) and seg.batch_size == 4
    (out,) = seg.segment([np.random.default_rng(3).integers(0, 256, (70, 90, 3), dtype=np.uint8)])
    assert out.shape == (70, 90)
    with pytest.raises(TypeError, match="unknown setting 'taux'"):
        DiffCutSegmenter(extractor=seg.extractor, taux=0.3)


def host_path(seg: DiffCutSegmenter, images: list[np.ndarray]) -> list[np.ndarray]:
    """The segmenter as it ran on the host: CPU resize, NumPy uniform check and renumbering."""
    ex, maps = seg.extractor, []
    for lo in range(0, len(images), seg.batch_size):
        chunk = images[lo : lo + seg.batch_size]
        units = [torch.from_numpy(im).permute(2, 0, 1).float().div(255.0) for im in chunk]
        size = (ex.resolution, ex.resolution)
        batch = torch.stack(
            [F.interpolate(u[None], size=size, mode="bilinear", antialias=True)[0] for u in units]
        )
        tokens = ex(batch)
        labels = batched_recursive_ncut(tokens, seg.tau, seg.alpha)
        for im, unit, feats, lab in zip(chunk, batch, tokens, labels, strict=True):
            if (im == im[:1, :1]).all():
                maps.append(np.zeros(im.shape[:2], np.uint16))
                continue
            scores = concept_scores(feats, lab, ex.token_grid)
            if seg.use_pamr:
                maps.append(relabel_contiguous(released_pamr(seg, unit, scores, im.shape[:2])))
            else:
                maps.append(relabel_contiguous(upsample_argmax(scores, im.shape[:2]).numpy()))
    return maps


def released_pamr(seg, unit, scores, size) -> np.ndarray:
    """DiffCut's evaluation order: labels and image at s x s, PAMR of the one-hot masks of the
    labels present, argmax, scipy's 3 x 3 median; then each pixel of `size` takes the label
    under its centre."""
    s = seg.pamr_size
    small = F.interpolate(unit[None], size=(s, s), mode="bilinear", antialias=True)[0]
    labels = upsample(scores, (s, s)).argmax(0)
    present = labels.unique()
    masks = torch.stack([(labels == p).float() for p in present])
    refined = pamr(small, masks, seg.pamr_iterations, seg.pamr_dilations).argmax(0).numpy()
    refined = present.numpy()[median_filter(refined, 3)]
    rows = (2 * np.arange(size[0]) + 1) * s // (2 * size[0])
    cols = (2 * np.arange(size[1]) + 1) * s // (2 * size[1])
    return refined[rows[:, None], cols[None, :]]


def varied_images() -> list[np.ndarray]:
    """Scenes and noise of square, non-square and odd sizes, and a uniform image."""
    sizes = [(48, 64), (300, 200), (33, 32), (257, 255), (101, 67)]
    scenes = [make_scene(i, size)[0] for i, size in enumerate(sizes)]
    noise = np.random.default_rng(0).integers(0, 256, (75, 141, 3), dtype=np.uint8)
    return [*scenes, noise, np.full((40, 56, 3), 200, np.uint8)]


@pytest.mark.parametrize("use_pamr", [False, True], ids=["assignment", "pamr"])
def test_device_path_gives_the_host_path_maps(extractor, use_pamr):
    # tau and alpha chosen so that the tiny model cuts the images into many segments
    seg = DiffCutSegmenter(extractor=extractor, batch_size=3, tau=0.95, alpha=4.0,
                           use_pamr=use_pamr, pamr_iterations=2, pamr_size=64)  # fmt: skip
    images = varied_images()
    expected = host_path(seg, images)
    tensors = seg.segment_tensors(images)
    assert max(int(m.max()) for m in expected) >= 20
    for img, ref, ours, host in zip(images, expected, tensors, seg.segment(images), strict=True):
        assert ours.dtype == torch.int32 and ours.shape == img.shape[:2]
        assert np.array_equal(ours.numpy(), ref) and np.array_equal(host, ref)
        assert host.dtype == np.uint16


def test_full_resolution_never_waits_for_the_device(segmenter):
    # the meta device has shapes but no values: any read of one (a host wait on a GPU) raises
    image = torch.empty(45, 70, 3, dtype=torch.uint8, device="meta")
    feats = torch.empty(64, 32, device="meta")
    labels = torch.empty(64, dtype=torch.long, device="meta")
    out = segmenter._full_resolution(image, feats, labels, 6)
    assert out.shape == (45, 70) and out.dtype == torch.int32 and out.device.type == "meta"
    small = resize_unit(image, (16, 16))
    assert small.shape == (3, 16, 16) and small.device.type == "meta"


def test_uniform_means_every_pixel_equals_the_first():
    img = np.zeros((5, 7, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    assert is_uniform(torch.from_numpy(img))  # channels may differ, pixels may not
    for y, x, c in [(0, 0, 0), (4, 6, 2), (2, 3, 1)]:
        other = img.copy()
        other[y, x, c] += 1
        assert not is_uniform(torch.from_numpy(other))


def test_segment_tensors_validate_inputs_by_position(segmenter):
    good = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ImageInputError, match="image 1: size 20x40"):
        segmenter.segment_tensors([good, np.zeros((40, 20, 3), np.uint8)])
    with pytest.raises(ImageInputError, match="not one array"):
        segmenter.segment_tensors(good)
    assert segmenter.segment_tensors([]) == [] and segmenter.device == torch.device("cpu")


class Halves(Segmenter):
    """Left and right halves, from NumPy maps (the base class makes its tensors)."""

    name = "halves-test"

    def __init__(self, dtype=np.uint16):
        self.dtype = dtype

    def _segment(self, images):
        return [(np.arange(img.shape[1])[None, :] >= img.shape[1] // 2).repeat(img.shape[0], 0).astype(self.dtype)
                for img in images]  # fmt: skip

    def identity(self):
        return {"name": self.name}


def test_a_numpy_segmenter_gets_tensors_from_the_base_class():
    (tensor,) = Halves().segment_tensors([np.zeros((40, 36), np.uint8)])
    assert tensor.dtype == torch.int32 and tensor.device.type == "cpu"
    assert tensor.shape == (40, 36) and tensor[0, 0] == 0 and tensor[0, -1] == 1
    (array,) = Halves().segment([np.zeros((40, 36), np.uint8)])
    assert array.dtype == np.uint16 and np.array_equal(array, tensor.numpy())
    with pytest.raises(RuntimeError, match="halves-test: map 0 is ndarray float64"):
        Halves(np.float64).segment_tensors([np.zeros((40, 36), np.uint8)])


def test_a_segmenter_must_implement_one_of_the_two_methods():
    class Wide(Halves):
        def _segment_tensors(self, images):
            return [torch.zeros(img.shape[:2], dtype=torch.int64) for img in images]

    class Neither(Segmenter):
        def identity(self):
            return {}

    with pytest.raises(RuntimeError, match="map 0 is Tensor torch.int64 .* expected an int32"):
        Wide().segment_tensors([np.zeros((40, 36), np.uint8)])
    with pytest.raises(NotImplementedError, match="Neither .* neither _segment"):
        Neither().segment([np.zeros((40, 36), np.uint8)])


PLUGIN = """
    import numpy as np

    from labeling.segmenter import Segmenter


    class Stripes(Segmenter):
        name = "stripes"

        def __init__(self, device="cpu", rows=2):
            self.device, self.rows = device, rows

        def _segment(self, images):
            return [(np.arange(im.shape[0]) * self.rows // im.shape[0]).astype(np.uint16)[:, None]
                    .repeat(im.shape[1], 1) for im in images]

        def identity(self):
            return {"name": self.name, "rows": self.rows}

        @classmethod
        def four_rows(cls, **kwargs):
            return cls(rows=4, **kwargs)


    def make(**kwargs):
        return Stripes(**kwargs)


    def not_a_segmenter(**kwargs):
        return "stripes"


    ROWS = 2
"""


def test_a_segmenter_named_by_its_module_and_factory(tmp_path, monkeypatch):
    (tmp_path / "dip_stripes_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "dip_stripes_plugin", raising=False)
    seg = get_segmenter("dip_stripes_plugin:make", device="cpu", rows=3)
    (out,) = seg.segment_tensors([np.zeros((60, 40, 3), np.uint8)])
    assert seg.identity() == {"name": "stripes", "rows": 3}
    assert out[:, 0].unique().tolist() == [0, 1, 2] and out.dtype == torch.int32
    assert get_segmenter("dip_stripes_plugin:Stripes.four_rows").rows == 4  # a dotted path
    for name, error, message in [
        ("dip_no_such_module:make", ImportError, "cannot import module 'dip_no_such_module'"),
        ("dip_stripes_plugin:missing", AttributeError, "has no attribute 'missing'"),
        ("dip_stripes_plugin:ROWS", TypeError, "'ROWS' is a int, not callable"),
        ("dip_stripes_plugin:not_a_segmenter", TypeError, "returned a str, not a labeling"),
        ("dip_stripes_plugin:", ValueError, "package.module:factory"),
    ]:
        with pytest.raises(error, match=message):
            get_segmenter(name)


@pytest.mark.gpu
def test_the_resize_on_a_gpu_matches_the_cpu():
    img = torch.from_numpy(make_scene(0, (333, 517))[0])
    for size in [(256, 256), (1024, 1024), (64, 48)]:
        cpu = resize_unit(img, size)
        gpu = resize_unit(img.cuda(), size).cpu()
        assert torch.allclose(gpu, cpu, rtol=0, atol=2e-6), (gpu - cpu).abs().max()


@pytest.mark.gpu
def test_segment_tensors_on_a_gpu_stay_there_and_agree_with_the_host_path(parts):
    ex = tiny_extractor(parts=parts, resolution=RESOLUTION, device="cuda")
    seg = DiffCutSegmenter(extractor=ex, batch_size=3, tau=0.95, alpha=4.0)
    images = varied_images()
    maps = seg.segment_tensors(images)
    assert all(m.is_cuda and m.dtype == torch.int32 for m in maps)
    for ours, ref in zip(seg.segment(images), host_path(seg, images), strict=True):
        assert np.array_equal(np.unique(ours), np.arange(ours.max() + 1))
        assert (ours == ref).mean() > 0.99  # the resize differs in the last bits across devices
