"""Augmentation of memory-bank images: colour jitter, then a joint random resized crop.

Randomness comes only from the ``torch.Generator`` passed in, so an (image, seed) pair always
gives the same view whatever process computes it.

Crop scale above 1. torchvision's ``RandomResizedCrop(scale=(0.5, 2.0))`` draws the crop area
as a fraction of the image area, but only accepts boxes that fit inside the image; a draw above
1 can never fit, so torchvision silently re-draws (10 tries, then falls back to a centre crop),
and the effective scale range is about (0.5, 1]. The intent of a range up to 2.0 is zooming
*out* as well as in: here a box larger than the image along a side is placed so that it
contains the image along that side, and the part outside the image is filled (image: the
ImageNet mean colour; labels: the ignore index) and marked invalid in a mask, so no patch that
lies mostly outside the image enters the bank.

Two augmentations, selected by name (``MemoryConfig.augmentation``):
- ``dip`` (ours): one p=0.5 coin for the whole ColorJitter, its four components in random order
  (torchvision's ColorJitter), then the zoom-in/zoom-out crop above.
- ``hummingbird`` (open-hummingbird-eval): four independent p=0.5 jitters, one component each,
  always in the order brightness, contrast, saturation, hue (torchvision's
  ``RandomApply([ColorJitter(brightness=s)], p)`` and so on), then torchvision's
  ``RandomResizedCrop`` box, which rejects draws that do not fit: the scale is effectively <= 1.
  The random draws are those torchvision makes, in the same order, so a generator seeded like
  torch's global one gives torchvision's parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF

from shared.images import IMAGENET_MEAN, resize_image, resize_labels

AUGMENTATIONS = ("dip", "hummingbird")
JITTER_ORDER = ("brightness", "contrast", "saturation", "hue")  # hummingbird: always this order


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def color_jitter(
    image: torch.Tensor, generator: torch.Generator, strength: float = 0.1, p: float = 0.5
) -> torch.Tensor:
    """With probability p: brightness, contrast, saturation (factors U(1-s, 1+s)) and hue
    (shift U(-s, s)) in a random order, as torchvision's ColorJitter(s, s, s, s); image (3, H, W)."""
    if _uniform(generator) >= p:
        return image
    factors = [_uniform(generator, 1 - strength, 1 + strength) for _ in range(3)]
    hue = _uniform(generator, -strength, strength)
    ops = [
        lambda x: TF.adjust_brightness(x, factors[0]),
        lambda x: TF.adjust_contrast(x, factors[1]),
        lambda x: TF.adjust_saturation(x, factors[2]),
        lambda x: TF.adjust_hue(x, hue),
    ]
    for i in torch.randperm(4, generator=generator).tolist():
        image = ops[i](image)
    return image.clamp(0.0, 1.0)


@dataclass(frozen=True)
class CropBox:
    """A crop in image pixel coordinates; top/left may be negative and the box may exceed the image."""

    top: int
    left: int
    height: int
    width: int


def _offset(size: int, box: int, generator: torch.Generator) -> int:
    """Uniform integer offset: inside the image if the box is smaller, else containing it."""
    lo, hi = sorted((0, size - box))
    return lo + int(torch.randint(0, hi - lo + 1, (), generator=generator))


def sample_crop_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.5, 2.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """Box of area U(scale) * H * W and aspect ratio log-uniform in ``ratio`` (w / h)."""
    area = height * width * _uniform(generator, *scale)
    aspect = math.exp(_uniform(generator, math.log(ratio[0]), math.log(ratio[1])))
    box_w = max(1, round(math.sqrt(area * aspect)))
    box_h = max(1, round(math.sqrt(area / aspect)))
    top = _offset(height, box_h, generator)
    left = _offset(width, box_w, generator)
    return CropBox(top, left, box_h, box_w)


def hummingbird_jitter_plan(
    generator: torch.Generator, strength: float = 0.1, p: float = 0.5
) -> list[tuple[str, float]]:
    """The jitters one view gets, in application order: (component, factor) for each of
    brightness, contrast, saturation, hue whose own coin came up (probability p each).

    Factors: U(1-s, 1+s), hue shift U(-s, s). The draws follow torchvision's
    RandomApply([ColorJitter(<one component>=s)], p): coin, then (if applied) ColorJitter's
    unused order permutation and the factor.
    """
    plan = []
    for name in JITTER_ORDER:
        if p < float(torch.rand(1, generator=generator)):  # RandomApply skips when p < u
            continue
        torch.randperm(4, generator=generator)  # ColorJitter's order draw (one component: moot)
        low, high = (-strength, strength) if name == "hue" else (1 - strength, 1 + strength)
        plan.append((name, float(torch.empty(1).uniform_(low, high, generator=generator))))
    return plan


_ADJUST = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


def apply_jitter_plan(image: torch.Tensor, plan: list[tuple[str, float]]) -> torch.Tensor:
    """Apply (component, factor) jitters in the plan's order to a (3, H, W) image in [0, 1]."""
    for name, factor in plan:
        image = _ADJUST[name](image, factor)
    return image


def hummingbird_color_jitter(
    image: torch.Tensor, generator: torch.Generator, strength: float = 0.1, p: float = 0.5
) -> torch.Tensor:
    """Four independent jitters (own coin each, fixed order) on a (3, H, W) image in [0, 1]."""
    return apply_jitter_plan(image, hummingbird_jitter_plan(generator, strength, p))


def hummingbird_crop_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.5, 2.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """torchvision's RandomResizedCrop box: up to 10 draws of area U(scale) * H * W and
    log-uniform aspect ratio; the first that fits inside the image wins, else a centre crop
    (the whole image when its aspect ratio lies in ``ratio``). Never larger than the image."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                   generator=generator)).item()
        box_w = int(round(math.sqrt(target * aspect)))
        box_h = int(round(math.sqrt(target / aspect)))
        if 0 < box_w <= width and 0 < box_h <= height:  # a draw above scale 1 never fits
            top = int(torch.randint(0, height - box_h + 1, size=(1,), generator=generator))
            left = int(torch.randint(0, width - box_w + 1, size=(1,), generator=generator))
            return CropBox(top, left, box_h, box_w)
    box_h, box_w = height, width
    if width / height < min(ratio):
        box_h = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        box_w = int(round(height * max(ratio)))
    return CropBox((height - box_h) // 2, (width - box_w) // 2, box_h, box_w)


def crop_with_padding(
    image: torch.Tensor, labels: torch.Tensor, box: CropBox, ignore_index: int | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut ``box`` out of image (3, H, W) and labels (H, W); outside the image: mean colour,
    ``ignore_index`` labels, and valid = False -> (image, labels, valid) of the box's size."""
    _, height, width = image.shape
    fill = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    out_img = fill.expand(3, box.height, box.width).clone()
    out_lab = torch.full((box.height, box.width), ignore_index, dtype=labels.dtype)
    valid = torch.zeros(box.height, box.width, dtype=torch.bool)
    y0, y1 = max(box.top, 0), min(box.top + box.height, height)  # intersection, image coords
    x0, x1 = max(box.left, 0), min(box.left + box.width, width)
    if y1 > y0 and x1 > x0:
        ty, tx = y0 - box.top, x0 - box.left  # the same region in box coordinates
        out_img[:, ty : ty + y1 - y0, tx : tx + x1 - x0] = image[:, y0:y1, x0:x1]
        out_lab[ty : ty + y1 - y0, tx : tx + x1 - x0] = labels[y0:y1, x0:x1]
        valid[ty : ty + y1 - y0, tx : tx + x1 - x0] = True
    return out_img, out_lab, valid


def augment_memory_image(
    image: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    generator: torch.Generator,
    ignore_index: int | float = 255,
    jitter: float = 0.1,
    jitter_p: float = 0.5,
    scale: tuple[float, float] = (0.5, 2.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    kind: str = "dip",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Colour jitter then a joint random resized crop to (size, size), the ``kind`` augmentation
    ("dip" or "hummingbird"): image bilinear, labels and the inside-the-image mask nearest
    -> image (3, S, S), labels (S, S), valid (S, S) bool."""
    if kind == "dip":
        image = color_jitter(image, generator, jitter, jitter_p)
        box = sample_crop_box(image.shape[1], image.shape[2], generator, scale, ratio)
    elif kind == "hummingbird":
        image = hummingbird_color_jitter(image, generator, jitter, jitter_p)
        box = hummingbird_crop_box(image.shape[1], image.shape[2], generator, scale, ratio)
    else:
        raise ValueError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}")
    crop_img, crop_lab, valid = crop_with_padding(image, labels, box, ignore_index)
    out_img = resize_image(crop_img, (size, size))
    out_lab = resize_labels(crop_lab, (size, size))
    out_valid = resize_labels(valid.to(torch.uint8), (size, size)).bool()
    return out_img, out_lab, out_valid
