"""DiffCut presets on a tiny random-init SDXL-style pipeline: the released resize, VAE and noise
reach the extractor and the segmenter, from a config as from keyword arguments."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labeling import segmenter as segmenter_module
from labeling.config import LabelConfig
from labeling.diffcut import DiffCutFeatureExtractor, tiny_extractor, tiny_sdxl_components
from labeling.segmenter import DiffCutSegmenter
from labeling.stages import build_segmenter

RESOLUTION = 128  # tiny VAE /8, tiny UNet /4 -> a 4 x 4 token grid


@pytest.fixture(scope="module")
def parts():
    return tiny_sdxl_components()


def extractor(parts, **kwargs) -> DiffCutFeatureExtractor:
    """An extractor on a copy of the VAE: the extractor casts the modules it is given in place."""
    return tiny_extractor(parts={**parts, "vae": copy.deepcopy(parts["vae"])},
                          resolution=RESOLUTION, **kwargs)


def images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_released_noise_on_a_cpu_is_refused_when_the_extractor_is_built(parts):
    with pytest.raises(ValueError, match="noise_device 'cuda' .* runs on cpu"):
        extractor(parts, device="cpu", noise_device="cuda")


def test_the_resize_follows_the_antialias_setting(parts):
    big = images(2, 3 * RESOLUTION)
    plain = extractor(parts, device="cpu", antialias=False)
    smooth = extractor(parts, device="cpu", antialias=True)
    size = (RESOLUTION, RESOLUTION)
    resized = F.interpolate(big, size=size, mode="bilinear", align_corners=False, antialias=False)
    assert torch.equal(plain(big), plain(resized))
    assert not torch.allclose(plain(big), smooth(big), atol=1e-4)


def test_a_float16_vae_holds_rounded_weights_and_computes_in_float32(parts):
    half = extractor(parts, device="cpu", vae_dtype=torch.float16)
    full = extractor(parts, device="cpu", vae_dtype=torch.float32)
    for p16, p32 in zip(half.vae.parameters(), full.vae.parameters(), strict=True):
        assert p16.dtype == torch.float32 and torch.equal(p16, p32.half().float())
    assert any(not torch.equal(p16, p32) for p16, p32 in
               zip(half.vae.parameters(), full.vae.parameters(), strict=True))  # fmt: skip
    x = images(1, RESOLUTION)
    rounded = extractor(parts, device="cpu")  # float32 arithmetic on the same rounded weights
    with torch.no_grad():
        for p_rounded, p16 in zip(rounded.vae.parameters(), half.vae.parameters(), strict=True):
            p_rounded.copy_(p16)
    assert half.encode(x).dtype == torch.float32 and torch.equal(half.encode(x), rounded.encode(x))


def test_the_segmenter_takes_the_preset_and_resizes_as_it_says(parts, monkeypatch):
    seg = DiffCutSegmenter(tiny=True, device="cpu", resolution=RESOLUTION, preset="released",
                           noise_device="cpu")  # fmt: skip
    ident = seg.identity()
    assert (ident["seed"], ident["noise_device"], ident["antialias"]) == (42, "cpu", False)
    assert ident["vae_dtype"] == "torch.float16"
    calls = []
    real = segmenter_module.resize_unit
    monkeypatch.setattr(segmenter_module, "resize_unit",
                        lambda img, size, antialias=True: calls.append(antialias) or
                        real(img, size, antialias))  # fmt: skip
    seg.segment([np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)])
    assert calls == [False]


def test_a_label_config_builds_the_preset_it_records():
    cfg = LabelConfig(tiny=True, diffcut={"preset": "released", "noise_device": "cpu",
                                          "resolution": RESOLUTION})  # fmt: skip
    ex = build_segmenter(cfg, torch.device("cpu")).extractor
    assert (ex.seed, ex.noise_device, ex.antialias, ex.vae_dtype) == (42, "cpu", False,
                                                                      torch.float16)
    with pytest.raises(ValueError, match="diffcut.noise_device"):
        build_segmenter(LabelConfig(tiny=True, diffcut={"preset": "released",
                                                        "resolution": RESOLUTION}),
                        torch.device("cpu"))  # fmt: skip


@pytest.mark.gpu
def test_the_float16_vae_equals_the_released_autocast_to_float32(parts):
    """The released code encodes with float16 weights under autocast(cuda, float32)."""
    ours = extractor(parts, device="cuda", vae_dtype=torch.float16)
    ref_vae = copy.deepcopy(parts["vae"]).to("cuda", torch.float16).eval()
    x = images(2, RESOLUTION).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float32):
        ref = ref_vae.encode(2 * x - 1).latent_dist.mean * ref_vae.config.scaling_factor
    assert ref.dtype == torch.float32
    assert torch.allclose(ours.encode(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_the_released_segmenter_runs_on_a_gpu_with_its_cuda_noise(parts):
    seg = DiffCutSegmenter(tiny=True, device="cuda", resolution=RESOLUTION, preset="released",
                           use_pamr=True)  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(42)
    expected = torch.randn(seg.extractor.noise.shape, generator=gen, device="cuda")
    assert seg.extractor.noise.is_cuda and torch.equal(seg.extractor.noise, expected)
    (out,) = seg.segment([np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8)])
    assert out.shape == (70, 90) and np.array_equal(np.unique(out), np.arange(out.max() + 1))
