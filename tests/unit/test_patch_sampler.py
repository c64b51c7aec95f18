"""Rare-class-favouring patch sampling, memory patch values, and the memory-image augmentation."""

from __future__ import annotations

import pytest
import torch

from evaluation.augment import (
    CropBox,
    augment_memory_image,
    color_jitter,
    crop_with_padding,
    sample_crop_box,
)
from evaluation.sampling import memory_patches, rare_class_scores, sample_patches


def test_scores_on_a_hand_example():
    hist = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    # class 0 appears in 4 patches, class 1 in 1: sums 4, 4, 5, 4
    u = torch.tensor([0.5, 0.1, 0.2, 1.0])
    torch.testing.assert_close(rare_class_scores(hist, u), torch.tensor([2.0, 0.4, 1.0, 4.0]))


def _image_with_one_rare_patch(n=100, rare_at=37):
    hist = torch.zeros(n, 4)
    hist[:, 0] = 1.0
    hist[rare_at] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    return hist


def test_the_sampler_keeps_the_rare_class():
    hist = _image_with_one_rare_patch()
    kept = sum(37 in sample_patches(hist, 5, torch.Generator().manual_seed(s)).tolist()
               for s in range(200))
    assert kept >= 195  # uniform sampling of 5 of 100 would keep it about 10 times
    uniform = sum(37 in torch.randperm(100, generator=torch.Generator().manual_seed(s))[:5].tolist()
                  for s in range(200))
    assert uniform < 30


def test_sampler_is_deterministic_sorted_and_respects_eligibility():
    hist = _image_with_one_rare_patch()
    a = sample_patches(hist, 10, torch.Generator().manual_seed(3))
    b = sample_patches(hist, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a, torch.sort(a).values) and len(set(a.tolist())) == 10
    eligible = torch.zeros(100, dtype=torch.bool)
    eligible[[1, 5, 9]] = True
    out = sample_patches(hist, 10, torch.Generator().manual_seed(3), eligible)
    assert out.tolist() == [1, 5, 9]


def test_memory_patches_segmentation_values_and_features():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 8, generator=gen)  # a 2x3 grid of patches, D = 8
    target = torch.zeros(4, 6, dtype=torch.uint8)  # patch size 2
    target[0:2, 4:6] = 2  # patch (0, 2) is class 2
    target[2, 0] = 255  # ignore counts as class 0
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[:, 0:2] = False  # column 0 of patches lies outside the image
    feats, values = memory_patches(features, target, valid, 10, gen, "segmentation", 3)
    assert feats.shape == (4, 8) and values.shape == (4, 3)  # only the 4 eligible patches
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(values.sum(dim=1), torch.ones(4))
    assert (values[:, 2] == 1).sum() == 1  # the class-2 patch is in


def test_memory_patches_depth_skips_unmeasured_patches():
    features = torch.randn(1, 2, 4)
    depth = torch.tensor([[1.0, 3.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    feats, values = memory_patches(features, depth, valid, 5, torch.Generator().manual_seed(0),
                                   "depth")
    assert values.tolist() == [[2.0]]
    with pytest.raises(ValueError, match="unknown task"):
        memory_patches(features, depth, valid, 5, torch.Generator(), "normals")


def test_crop_boxes_above_scale_one_contain_the_image():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        box = sample_crop_box(40, 40, gen, scale=(1.5, 2.0), ratio=(1.0, 1.0))
        assert box.height >= 40 and box.width >= 40
        assert box.top <= 0 and box.top + box.height >= 40
        assert box.left <= 0 and box.left + box.width >= 40
    for _ in range(200):
        box = sample_crop_box(40, 60, gen, scale=(0.5, 2.0))
        # along each side: inside the image when it fits, else containing the image
        for start, length, size in ((box.top, box.height, 40), (box.left, box.width, 60)):
            if length <= size:
                assert 0 <= start <= size - length
            else:
                assert size - length <= start <= 0
        assert 0.5 * 2400 * 0.9 <= box.height * box.width <= 2.0 * 2400 * 1.1


def test_crop_with_padding_by_hand():
    image = torch.arange(12, dtype=torch.float32).view(3, 2, 2) / 12
    labels = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    img, lab, valid = crop_with_padding(image, labels, CropBox(-1, 0, 3, 2), 255)
    assert lab.tolist() == [[255, 255], [1, 2], [3, 4]]
    assert valid.tolist() == [[False, False], [True, True], [True, True]]
    torch.testing.assert_close(img[:, 1:], image)
    torch.testing.assert_close(img[:, 0, 0], torch.tensor([0.485, 0.456, 0.406]))


def test_augmentation_is_deterministic_and_keeps_label_values():
    gen_img = torch.Generator().manual_seed(5)
    image = torch.rand(3, 30, 40, generator=gen_img)
    labels = torch.randint(0, 3, (30, 40), generator=gen_img).to(torch.uint8)
    outs = [augment_memory_image(image, labels, 28, torch.Generator().manual_seed(s))
            for s in (1, 1, 2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])
    for img, lab, valid in outs:
        assert img.shape == (3, 28, 28) and lab.shape == (28, 28) and valid.dtype == torch.bool
        assert set(lab.unique().tolist()) <= {0, 1, 2, 255}
        assert ((lab == 255) == ~valid).all()


def test_color_jitter_probability():
    image = torch.rand(3, 8, 8)
    assert torch.equal(color_jitter(image, torch.Generator().manual_seed(0), 0.1, p=0.0), image)
    jittered = color_jitter(image, torch.Generator().manual_seed(0), 0.1, p=1.0)
    assert not torch.equal(jittered, image)
    assert (jittered - image).abs().max() < 0.35  # a mild change at strength 0.1
