"""The hummingbird memory augmentation: independent jitters in fixed order, torchvision's crop."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision import transforms as T

from evaluation.augment import (
    JITTER_ORDER,
    apply_jitter_plan,
    augment_memory_image,
    color_jitter,
    crop_with_padding,
    hummingbird_color_jitter,
    hummingbird_crop_box,
    hummingbird_jitter_plan,
    sample_crop_box,
)
from shared.images import resize_image, resize_labels


def _plans(n: int, p: float = 0.5) -> list[list[tuple[str, float]]]:
    return [hummingbird_jitter_plan(torch.Generator().manual_seed(s), 0.1, p) for s in range(n)]


def test_jitters_come_in_the_fixed_order():
    for plan in _plans(500):
        names = [name for name, _ in plan]
        assert names == [n for n in JITTER_ORDER if n in names]  # a subsequence, never reordered
    assert JITTER_ORDER == ("brightness", "contrast", "saturation", "hue")


def test_each_jitter_has_its_own_coin():
    plans = _plans(4000)
    applied = [frozenset(name for name, _ in plan) for plan in plans]
    for name in JITTER_ORDER:
        assert 0.46 < sum(name in a for a in applied) / len(plans) < 0.54
    # independent coins: every one of the 16 subsets occurs, each about 1/16
    combos = Counter(applied)
    assert len(combos) == 16
    assert all(0.045 < c / len(plans) < 0.08 for c in combos.values())
    # one coin for all four (the dip jitter) could only give "none" or "all"
    both = sum({"brightness", "contrast"} <= a for a in applied) / len(plans)
    assert 0.22 < both < 0.28  # P(b) P(c) = 1/4, not 1/2


def test_jitter_probability_and_factor_ranges():
    assert all(plan == [] for plan in _plans(50, p=0.0))
    drawn = {name: [] for name in JITTER_ORDER}
    for plan in _plans(200, p=1.0):
        assert [name for name, _ in plan] == list(JITTER_ORDER)
        for name, factor in plan:
            drawn[name].append(factor)
    # uniform on [0.9, 1.1] (hue [-0.1, 0.1]): 200 draws reach within 0.01 of both ends
    for name, values in drawn.items():
        low, high = (-0.1, 0.1) if name == "hue" else (0.9, 1.1)
        assert low <= min(values) < low + 0.01 and high - 0.01 < max(values) <= high, name
        assert np.mean(values) == pytest.approx((low + high) / 2, abs=0.015), name


def test_the_plan_is_applied_in_its_order():
    image = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1))
    plan = [("brightness", 1.08), ("contrast", 0.93), ("saturation", 1.05), ("hue", -0.07)]
    expected = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(
        TF.adjust_brightness(image, 1.08), 0.93), 1.05), -0.07)
    assert torch.equal(apply_jitter_plan(image, plan), expected)
    assert not torch.equal(apply_jitter_plan(image, plan[::-1]), expected)  # order matters


def test_the_jitter_equals_torchvision_four_random_applies_seed_for_seed():
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = T.Compose([T.RandomApply([T.ColorJitter(brightness=0.1)], p=0.5),
                           T.RandomApply([T.ColorJitter(contrast=0.1)], p=0.5),
                           T.RandomApply([T.ColorJitter(saturation=0.1)], p=0.5),
                           T.RandomApply([T.ColorJitter(hue=0.1)], p=0.5)])
    for seed in range(40):
        torch.manual_seed(seed)
        expected = reference(image)
        assert torch.equal(hummingbird_color_jitter(image, torch.Generator().manual_seed(seed)),
                           expected)


@pytest.mark.parametrize("size", [(40, 60), (37, 23), (64, 64), (10, 90)])
def test_the_crop_box_equals_torchvision_random_resized_crop(size):
    height, width = size
    for seed in range(150):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(torch.zeros(3, height, width), [0.5, 2.0],
                                                  [3 / 4, 4 / 3])
        box = hummingbird_crop_box(height, width, torch.Generator().manual_seed(seed))
        assert (box.top, box.left, box.height, box.width) == expected


def test_crop_scales_never_exceed_one():
    gen = torch.Generator().manual_seed(0)
    for height, width in ((40, 60), (48, 48), (90, 30)):  # 90 x 30: always the centre crop
        areas = []
        for _ in range(1000):
            box = hummingbird_crop_box(height, width, gen, scale=(0.5, 2.0))
            assert 0 <= box.top and box.top + box.height <= height  # always inside the image
            assert 0 <= box.left and box.left + box.width <= width
            areas.append(box.height * box.width / (height * width))
        assert max(areas) <= 1.0
        assert sum(a > 0.95 for a in areas) < 0.1 * len(areas)  # rejected, not clamped to 1
    square = [hummingbird_crop_box(48, 48, gen) for _ in range(1000)]
    assert sum(b.height * b.width > 0.9 * 48 * 48 for b in square) > 50  # up to the whole image


def test_draws_that_never_fit_fall_back_to_the_centre_crop():
    gen = torch.Generator().manual_seed(0)
    box = hummingbird_crop_box(40, 40, gen, scale=(1.5, 2.0))  # 10 rejections
    assert (box.top, box.left, box.height, box.width) == (0, 0, 40, 40)
    wide = hummingbird_crop_box(10, 90, gen, scale=(1.5, 2.0))  # ratio 9 > 4/3: centre crop
    assert (wide.top, wide.left, wide.height, wide.width) == (0, 38, 10, 13)  # (90 - 13) // 2


def test_the_hummingbird_view_is_all_inside_the_image():
    gen_img = torch.Generator().manual_seed(5)
    image = torch.rand(3, 30, 40, generator=gen_img)
    labels = torch.randint(0, 3, (30, 40), generator=gen_img).to(torch.uint8)
    for s in range(30):
        img, lab, valid = augment_memory_image(image, labels, 28, torch.Generator().manual_seed(s),
                                               kind="hummingbird")
        assert img.shape == (3, 28, 28) and valid.all()
        assert set(lab.unique().tolist()) <= {0, 1, 2}  # no padding, no ignore label
    dip_padded = sum(not augment_memory_image(image, labels, 28,
                                              torch.Generator().manual_seed(s))[2].all()
                     for s in range(30))
    assert dip_padded > 5  # the dip augmentation zooms out with padding
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_memory_image(image, labels, 28, torch.Generator(), kind="simclr")


def test_the_dip_augmentation_is_still_one_jitter_then_the_padded_crop():
    image = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 3, (30, 40), generator=torch.Generator().manual_seed(3))
    for seed in range(10):
        out = augment_memory_image(image, labels, 28, torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)
        jittered = color_jitter(image, gen, 0.1, 0.5)
        box = sample_crop_box(30, 40, gen, (0.5, 2.0), (3 / 4, 4 / 3))
        img, lab, valid = crop_with_padding(jittered, labels, box, 255)
        assert torch.equal(out[0], resize_image(img, (28, 28)))
        assert torch.equal(out[1], resize_labels(lab, (28, 28)))
