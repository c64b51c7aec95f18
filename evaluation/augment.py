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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as TF

from shared.images import IMAGENET_MEAN, resize_image, resize_labels


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ColorJitter then joint RandomResizedCrop to (size, size): image bilinear, labels and the
    inside-the-image mask nearest -> image (3, S, S), labels (S, S), valid (S, S) bool."""
    image = color_jitter(image, generator, jitter, jitter_p)
    box = sample_crop_box(image.shape[1], image.shape[2], generator, scale, ratio)
    crop_img, crop_lab, valid = crop_with_padding(image, labels, box, ignore_index)
    out_img = resize_image(crop_img, (size, size))
    out_lab = resize_labels(crop_lab, (size, size))
    out_valid = resize_labels(valid.to(torch.uint8), (size, size)).bool()
    return out_img, out_lab, out_valid
