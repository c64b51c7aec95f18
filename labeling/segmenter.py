"""The class-agnostic segmenter interface used by the labeling pipeline, its registry, and DiffCut.

A segmenter turns RGB images into segment maps at each image's own size:

    seg = get_segmenter("diffcut", device="cuda")
    maps = seg.segment([img0, img1])   # (H, W, 3) uint8 each -> (H, W) uint16, ids 0..S-1

`Segmenter.segment` validates and converts its inputs with `prepare_image` (grayscale and RGBA are
converted to RGB; too small, too large or non-uint8 images are refused with `ImageInputError`),
then calls `_segment` on clean (H, W, 3) uint8 arrays. A new segmenter subclasses `Segmenter`,
implements `_segment` and `identity`, and is registered with `register_segmenter`.

`DiffCutSegmenter` (the default): SSD-1B tokens (labeling.diffcut) -> batched recursive NCut on the
token grid -> every pixel takes the segment whose mean feature best matches its bilinearly
upsampled feature (labeling.concepts) -> optional PAMR -> contiguous uint16 ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labeling.concepts import concept_scores, upsample, upsample_argmax
from labeling.diffcut import (
    HOOKED_LAYER,
    SSD1B_HUB_ID,
    DiffCutFeatureExtractor,
    encode_empty_prompt,
    tiny_sdxl_components,
)
from labeling.ncut import NCutWorkspace, batched_recursive_ncut
from labeling.pamr import DEFAULT_DILATIONS, DEFAULT_ITERATIONS, pamr

MIN_SIDE = 32  # the 32 x 32 token grid needs at least one pixel per token
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_SEGMENTER = "diffcut"


class ImageInputError(ValueError):
    """An input image cannot be segmented: wrong type, dtype, channels or size."""


def prepare_image(
    image: Any, index: int = 0, min_side: int = MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Check one input image and return it as (H, W, 3) uint8 RGB (gray repeated, alpha dropped)."""
    where = f"image {index}"
    if not isinstance(image, np.ndarray):
        raise ImageInputError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageInputError(f"{where}: expected dtype uint8 (0..255), got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageInputError(
            f"{where}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}"
        )
    height, width = image.shape[:2]
    if min(height, width) < min_side:
        raise ImageInputError(
            f"{where}: size {width}x{height} (WxH) is too small, each side needs at least {min_side} px"
        )
    if height * width > max_pixels:
        raise ImageInputError(
            f"{where}: size {width}x{height} (WxH) = {height * width} pixels exceeds the limit of "
            f"{max_pixels} (max_pixels)"
        )
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]  # alpha dropped, as an RGBA -> RGB conversion does
    return np.ascontiguousarray(image)


def relabel_contiguous(labels: np.ndarray) -> np.ndarray:
    """Map the ids present in `labels` to 0..S-1, keeping their order -> uint16 array of the same shape."""
    present, inverse = np.unique(labels, return_inverse=True)
    if len(present) > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"{len(present)} segments do not fit a uint16 segment map")
    return inverse.reshape(labels.shape).astype(np.uint16)


class Segmenter(ABC):
    """Class-agnostic segmentation of RGB images into maps of contiguous segment ids."""

    name: str = "base"
    min_side: int = MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS

    def segment(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) uint8 images (gray / RGBA accepted) -> (H, W) uint16 maps with ids 0..S-1."""
        if isinstance(images, np.ndarray):
            raise ImageInputError("segment() takes a list of images, not one array")
        clean = [
            prepare_image(img, i, self.min_side, self.max_pixels) for i, img in enumerate(images)
        ]
        if not clean:
            return []
        maps = self._segment(clean)
        for i, (img, seg) in enumerate(zip(clean, maps, strict=True)):
            if seg.shape != img.shape[:2] or seg.dtype != np.uint16:
                raise RuntimeError(
                    f"{self.name}: map {i} is {seg.dtype} {seg.shape}, expected uint16 {img.shape[:2]}"
                )
        return maps

    @abstractmethod
    def _segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Segment validated (H, W, 3) uint8 images -> (H, W) uint16 maps with ids 0..S-1."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What determines the output (name, settings, weights): recorded in a label set's metadata."""


SEGMENTER_DEFAULTS: dict[str, Any] = {
    "source": SSD1B_HUB_ID, "variant": None, "resolution": 1024, "timestep": 50, "seed": 0,
    "unet_dtype": None, "vae_dtype": torch.float32, "tau": 0.5, "alpha": 10.0, "batch_size": 8,
    "use_pamr": False, "pamr_iterations": DEFAULT_ITERATIONS, "pamr_dilations": DEFAULT_DILATIONS,
    "pamr_max_side": 512, "max_pixels": None,
}  # fmt: skip
_CONFIG_FIELDS = {"model": "source", "pamr": "use_pamr"}  # DiffCutConfig name -> setting name


def _settings(config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- a DiffCut config (model or dict) <- explicit keyword arguments."""
    raw = config.model_dump() if hasattr(config, "model_dump") else dict(config or {})
    settings = dict(SEGMENTER_DEFAULTS)
    for key, value in [
        *((_CONFIG_FIELDS.get(k, k), v) for k, v in raw.items()),
        *overrides.items(),
    ]:
        if key not in settings:
            raise TypeError(
                f"DiffCutSegmenter: unknown setting {key!r}; known: {', '.join(settings)}"
            )
        settings[key] = value
    for key in ("unet_dtype", "vae_dtype"):
        if isinstance(settings[key], str):
            settings[key] = getattr(torch, settings[key])
    return settings


class DiffCutSegmenter(Segmenter):
    """DiffCut: SSD-1B tokens -> recursive NCut -> full-resolution concept assignment (-> PAMR).

    Settings come from SEGMENTER_DEFAULTS, then `config` (a DiffCutConfig or a dict), then keyword
    arguments. `tiny=True` builds a random-init SDXL-structured pipeline instead of loading weights.
    """

    name = "diffcut"

    def __init__(
        self,
        extractor: DiffCutFeatureExtractor | None = None,
        config: Any = None,
        tiny: bool = False,
        device: str | torch.device | None = None,
        **settings: Any,
    ):
        opts = _settings(config, settings)
        if extractor is None:
            model = {
                k: opts[k] for k in ("resolution", "timestep", "seed", "unet_dtype", "vae_dtype")
            }
            if tiny:
                parts = tiny_sdxl_components(opts["seed"])
                prompt = encode_empty_prompt(
                    [parts["tokenizer"], parts["tokenizer_2"]],
                    [parts["text_encoder"], parts["text_encoder_2"]],
                )
                extractor = DiffCutFeatureExtractor(
                    parts["unet"], parts["vae"], parts["scheduler"], prompt, device=device, **model
                )
            else:
                extractor = DiffCutFeatureExtractor.from_pretrained(
                    opts["source"], opts["variant"], device=device, **model
                )
            self.source = f"tiny-random-sdxl(seed={opts['seed']})" if tiny else opts["source"]
        else:
            self.source = "<given extractor>"
        self.extractor = extractor
        self.tau, self.alpha, self.batch_size = opts["tau"], opts["alpha"], opts["batch_size"]
        self.use_pamr, self.pamr_iterations = opts["use_pamr"], opts["pamr_iterations"]
        self.pamr_dilations = tuple(opts["pamr_dilations"])
        self.pamr_max_side = opts["pamr_max_side"]
        if opts["max_pixels"] is not None:
            self.max_pixels = opts["max_pixels"]
        self._ncut_workspace = NCutWorkspace()  # the cut's large buffers, reused batch after batch

    def identity(self) -> dict[str, Any]:
        ex = self.extractor
        return {
            "name": self.name, "source": self.source, "tau": self.tau, "alpha": self.alpha,
            "resolution": ex.resolution, "timestep": ex.timestep, "seed": ex.seed,
            "unet_dtype": str(ex.unet_dtype), "vae_dtype": str(ex.vae_dtype), "hooked_layer": HOOKED_LAYER,
            "pamr": {"iterations": self.pamr_iterations, "dilations": list(self.pamr_dilations),
                     "max_side": self.pamr_max_side} if self.use_pamr else None,
        }  # fmt: skip

    def _segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        maps = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            tensors = [torch.from_numpy(img).permute(2, 0, 1).float().div(255.0) for img in chunk]
            size = (self.extractor.resolution, self.extractor.resolution)
            batch = torch.stack(
                [F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
                 for t in tensors]
            )  # fmt: skip
            tokens = self.extractor(batch)  # (B, h*w, C)
            labels = batched_recursive_ncut(
                tokens, self.tau, self.alpha, workspace=self._ncut_workspace
            )  # (B, h*w)
            for img, image, feats, lab in zip(tensors, chunk, tokens, labels, strict=True):
                if (image == image[:1, :1]).all():  # a uniform image has a single region
                    maps.append(np.zeros(image.shape[:2], dtype=np.uint16))
                else:
                    maps.append(self._full_resolution(img, feats, lab, image.shape[:2]))
        return maps

    def _full_resolution(
        self, image: Tensor, feats: Tensor, labels: Tensor, size: tuple[int, int]
    ) -> np.ndarray:
        """Token segments -> (H, W) uint16 map: concept assignment, optional PAMR, contiguous ids."""
        scores = concept_scores(feats, labels, self.extractor.token_grid)  # (K, h, w)
        if self.use_pamr:
            scale = min(1.0, self.pamr_max_side / max(size))
            work = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            small = F.interpolate(
                image[None], size=work, mode="bilinear", align_corners=False, antialias=True
            )[0]
            onehot = (
                F.one_hot(upsample(scores, work).argmax(dim=0), scores.shape[0])
                .permute(2, 0, 1)
                .float()
            )
            scores = pamr(
                small.to(onehot.device), onehot, self.pamr_iterations, self.pamr_dilations
            )
        full = upsample_argmax(scores, size)  # (H, W)
        return relabel_contiguous(full.cpu().numpy())


_REGISTRY: dict[str, Callable[..., Segmenter]] = {"diffcut": DiffCutSegmenter}


def register_segmenter(name: str, factory: Callable[..., Segmenter]) -> None:
    """Register a segmenter class (or factory) under `name`."""
    if name in _REGISTRY:
        raise KeyError(f"segmenter {name!r} is already registered")
    _REGISTRY[name] = factory


def available_segmenters() -> list[str]:
    """Names accepted by get_segmenter."""
    return sorted(_REGISTRY)


def get_segmenter(name: str = DEFAULT_SEGMENTER, **kwargs: Any) -> Segmenter:
    """Build the segmenter registered as `name` with its keyword arguments."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown segmenter {name!r}; known: {', '.join(available_segmenters())}")
    return _REGISTRY[name](**kwargs)
