"""DiffCut with a tiny random-init SDXL-style pipeline: features, early stop, loading, segmenter contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labeling import segmenter as segmenter_module
from labeling.diffcut import (
    DiffCutFeatureExtractor,
    add_noise,
    encode_empty_prompt,
    tiny_sdxl_components,
)
from labeling.segmenter import (
    DiffCutSegmenter,
    ImageInputError,
    Segmenter,
    available_segmenters,
    get_segmenter,
    register_segmenter,
)

RESOLUTION = 256  # tiny VAE /8, tiny UNet /4 -> an 8 x 8 token grid


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_components()


@pytest.fixture(scope="module")
def extractor(parts):
    prompt = encode_empty_prompt(
        [parts["tokenizer"], parts["tokenizer_2"]], [parts["text_encoder"], parts["text_encoder_2"]]
    )
    return DiffCutFeatureExtractor(
        parts["unet"], parts["vae"], parts["scheduler"], prompt, resolution=RESOLUTION, device="cpu"
    )


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
    seg = DiffCutSegmenter(extractor=extractor, use_pamr=True, pamr_iterations=2, pamr_max_side=64)
    img = np.random.default_rng(2).integers(0, 256, (100, 80, 3), dtype=np.uint8)
    (out,) = seg.segment([img])
    assert out.shape == (100, 80) and np.array_equal(np.unique(out), np.arange(out.max() + 1))
    assert seg.identity()["pamr"]["iterations"] == 2


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
