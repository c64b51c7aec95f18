"""The class-agnostic segmenter interface used by the labeling pipeline, its registry, and DiffCut.

A segmenter turns RGB images into segment maps at each image's own size:

    seg = get_segmenter("diffcut", device="cuda")
    maps = seg.segment_tensors([img0, img1])  # (H, W, 3) uint8 each -> (H, W) int32 on seg.device
    maps = seg.segment([img0, img1])          # the same maps as (H, W) uint16 NumPy arrays

Ids are contiguous, 0..S-1. Both methods validate and convert their inputs with `prepare_image`
(grayscale and RGBA are converted to RGB; too small, too large or non-uint8 images are refused
with `ImageInputError`). `segment_tensors` leaves the maps where the segmenter computed them, so
a GPU worker pools features on them without a round trip through the host; `segment` copies the
whole batch to the host at once. A new segmenter subclasses `Segmenter`, implements `identity`
and either `_segment` (NumPy maps; the base class moves them to `device`) or `_segment_tensors`
(tensors on `device`), and is registered with `register_segmenter`, or named to
`get_segmenter` as "package.module:factory" without registering.

`DiffCutSegmenter` (the default): SSD-1B tokens (labeling.diffcut) -> batched recursive NCut on the
token grid -> every pixel takes the segment whose mean feature best matches its bilinearly
upsampled feature (labeling.concepts) -> optional PAMR -> contiguous ids. Each image is uploaded
once as uint8; its resize, the assignment and the renumbering run on the extractor's device,
which the host waits on once per batch outside the cut.

`felzenszwalb` (labeling.classical): graph segmentation on the CPU, a baseline with no model.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from labeling.concepts import concept_scores, contiguous_ids, upsample_argmax
from labeling.config import DIFFCUT_PRESETS, DiffCutConfig, LabelConfig
from labeling.diffcut import HOOKED_LAYER, DiffCutFeatureExtractor, tiny_extractor
from labeling.ncut import NCutWorkspace, batched_recursive_ncut
from labeling.pamr import (
    DEFAULT_DILATIONS,
    DEFAULT_ITERATIONS,
    DEFAULT_SIZE,
    nearest_resize,
    refine_scores,
)

MIN_SIDE = 32  # the 32 x 32 token grid needs at least one pixel per token
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_SEGMENTER = "diffcut"
UINT16_IDS = np.iinfo(np.uint16).max + 1  # segments a uint16 map can hold


class ImageInputError(ValueError):
    """An input image cannot be segmented: wrong type, dtype, channels or size."""


def prepare_image(
    image: Any,
    index: int | str = 0,
    min_side: int = MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Check one input image and return it as (H, W, 3) uint8 RGB (gray repeated, alpha dropped).

    `index` names the image in errors: its position in a batch, or its URI.
    """
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
    if len(present) > UINT16_IDS:
        raise ValueError(f"{len(present)} segments do not fit a uint16 segment map")
    return inverse.reshape(labels.shape).astype(np.uint16)


def maps_to_numpy(maps: Sequence[Tensor]) -> list[np.ndarray]:
    """(H, W) integer segment maps on any one device -> (H, W) uint16 NumPy maps.

    The batch crosses to the host in one copy (one wait on a GPU, not one per map).
    """
    if not maps:
        return []
    flat = torch.cat([m.reshape(-1).to(torch.int32) for m in maps]).cpu().numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= UINT16_IDS):
        raise ValueError(f"segment ids {flat.min()}..{flat.max()} do not fit a uint16 segment map")
    ends = np.cumsum([m.numel() for m in maps])[:-1]
    parts = np.split(flat.astype(np.uint16), ends)
    return [part.reshape(tuple(m.shape)) for part, m in zip(parts, maps, strict=True)]


def _describe(seg: Any) -> str:
    if isinstance(seg, (np.ndarray, Tensor)):
        where = f" on {seg.device}" if isinstance(seg, Tensor) else ""
        return f"{type(seg).__name__} {seg.dtype} {tuple(seg.shape)}{where}"
    return type(seg).__name__


class Segmenter(ABC):
    """Class-agnostic segmentation of RGB images into maps of contiguous segment ids."""

    name: str = "base"
    min_side: int = MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: torch.device | str = torch.device("cpu")  # where segment_tensors leaves its maps

    def segment(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W, 3) uint8 images (gray / RGBA accepted) -> (H, W) uint16 maps with ids 0..S-1."""
        return maps_to_numpy(self.segment_tensors(images))

    def segment_tensors(self, images: Sequence[np.ndarray]) -> list[Tensor]:
        """(H, W, 3) uint8 images (gray / RGBA accepted) -> (H, W) int32 maps, ids 0..S-1, on `device`.

        On a GPU the maps may still be being computed when this returns (work in the device's
        stream order); whatever reads them in that order sees them finished.
        """
        if isinstance(images, np.ndarray):
            raise ImageInputError("a segmenter takes a list of images, not one array")
        clean = [
            prepare_image(img, i, self.min_side, self.max_pixels) for i, img in enumerate(images)
        ]
        if not clean:
            return []
        maps = self._segment_tensors(clean)
        device = torch.device(self.device)
        self._check_maps(
            clean, maps, f"an int32 Tensor on {device}",
            lambda seg: isinstance(seg, Tensor) and seg.dtype == torch.int32
            and seg.device.type == device.type,
        )  # fmt: skip
        return maps

    def _segment_tensors(self, images: list[np.ndarray]) -> list[Tensor]:
        """Validated (H, W, 3) uint8 images -> (H, W) int32 maps on `device`; by default `_segment`'s."""
        maps = self._segment(images)
        self._check_maps(
            images, maps, "a uint16 ndarray",
            lambda seg: isinstance(seg, np.ndarray) and seg.dtype == np.uint16,
        )  # fmt: skip
        return [torch.from_numpy(seg.astype(np.int32)).to(self.device) for seg in maps]

    def _segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Segment validated (H, W, 3) uint8 images -> (H, W) uint16 maps with ids 0..S-1."""
        raise NotImplementedError(
            f"{type(self).__name__} ({self.name}) implements neither _segment (NumPy maps) nor "
            "_segment_tensors (tensors on its device)"
        )

    def _check_maps(
        self, images: list[np.ndarray], maps: Sequence[Any], kind: str, ok: Callable[[Any], bool]
    ) -> None:
        """One map per image, each of the image's (H, W) and of the kind `ok` accepts, or an error."""
        if len(maps) != len(images):
            raise RuntimeError(f"{self.name}: {len(maps)} maps for {len(images)} images")
        for i, (img, seg) in enumerate(zip(images, maps, strict=True)):
            if not ok(seg) or tuple(seg.shape) != img.shape[:2]:
                raise RuntimeError(
                    f"{self.name}: map {i} is {_describe(seg)}, expected {kind} {img.shape[:2]}"
                )

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What determines the output (name, settings, weights): recorded in a label set's metadata."""


_CONFIG_FIELDS = {"model": "source", "pamr": "use_pamr"}  # DiffCutConfig name -> setting name


def _segmenter_defaults() -> dict[str, Any]:
    """DiffCutConfig's defaults under the segmenter's names, then the settings no config holds.

    The fields a preset fills (DIFFCUT_PRESETS: seed, noise_device, antialias, vae_dtype) are
    None here: the preset in force gives them unless a setting does.
    """
    preset_fields = set().union(*DIFFCUT_PRESETS.values())
    defaults = {_CONFIG_FIELDS.get(name, name): None if name in preset_fields else field.default
                for name, field in DiffCutConfig.model_fields.items()}
    return {
        **defaults, "variant": None, "unet_dtype": None,
        "batch_size": LabelConfig.model_fields["batch_size"].default,
        "pamr_iterations": DEFAULT_ITERATIONS, "pamr_dilations": DEFAULT_DILATIONS,
        "pamr_size": DEFAULT_SIZE, "max_pixels": None,
    }  # fmt: skip


SEGMENTER_DEFAULTS: dict[str, Any] = _segmenter_defaults()


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
    if settings["preset"] not in DIFFCUT_PRESETS:
        raise ValueError(f"DiffCutSegmenter: unknown preset {settings['preset']!r}; known: "
                         f"{', '.join(DIFFCUT_PRESETS)}")
    for key, value in DIFFCUT_PRESETS[settings["preset"]].items():
        if settings[key] is None:  # an explicit setting wins over the preset
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
            model = {k: opts[k] for k in ("resolution", "timestep", "seed", "unet_dtype",
                                          "vae_dtype", "noise_device", "antialias")}
            if tiny:
                extractor = tiny_extractor(opts["seed"], device=device, **model)
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
        self.pamr_size = opts["pamr_size"]
        if opts["max_pixels"] is not None:
            self.max_pixels = opts["max_pixels"]
        self._ncut_workspace = NCutWorkspace()  # the cut's large buffers, reused batch after batch

    def identity(self) -> dict[str, Any]:
        ex = self.extractor
        return {
            "name": self.name, "source": self.source, "tau": self.tau, "alpha": self.alpha,
            "resolution": ex.resolution, "timestep": ex.timestep, "seed": ex.seed,
            "unet_dtype": str(ex.unet_dtype), "vae_dtype": str(ex.vae_dtype), "hooked_layer": HOOKED_LAYER,
            "noise_device": ex.noise_device, "antialias": ex.antialias,
            "pamr": {"iterations": self.pamr_iterations, "dilations": list(self.pamr_dilations),
                     "size": self.pamr_size} if self.use_pamr else None,
        }  # fmt: skip

    @property
    def device(self) -> torch.device:
        """The extractor's device: all the work after decoding runs there, and the maps stay."""
        return self.extractor.device

    @torch.no_grad()
    def _segment_tensors(self, images: list[np.ndarray]) -> list[Tensor]:
        maps = []
        for start in range(0, len(images), self.batch_size):
            chunk = [to_device(img, self.device) for img in images[start : start + self.batch_size]]
            size = (self.extractor.resolution, self.extractor.resolution)
            batch = torch.stack(
                [resize_unit(img, size, self.extractor.antialias) for img in chunk]
            )  # (B, 3, R, R)
            tokens = self.extractor(batch)  # (B, h*w, C)
            labels = batched_recursive_ncut(
                tokens, self.tau, self.alpha, workspace=self._ncut_workspace
            )  # (B, h*w)
            counts = (labels.amax(dim=1) + 1).tolist()  # the batch's one host wait after the cut
            for img, unit, feats, lab, k in zip(chunk, batch, tokens, labels, counts, strict=True):
                maps.append(self._full_resolution(img, feats, lab, k, unit))
        return maps

    def _full_resolution(
        self, image: Tensor, feats: Tensor, labels: Tensor, k: int, unit: Tensor | None = None
    ) -> Tensor:
        """Token segments -> (H, W) int32 map: concept assignment, optional PAMR, contiguous ids.

        `image` is the (H, W, 3) uint8 image on the device, `k` the number of token segments,
        `unit` the (3, R, R) extractor input made from it (PAMR's image; resized here if None).
        """
        size = (image.shape[0], image.shape[1])
        scores = concept_scores(feats, labels, self.extractor.token_grid, k)  # (K, h, w)
        if self.use_pamr:
            ex = self.extractor
            if unit is None:
                unit = resize_unit(image, (ex.resolution, ex.resolution), ex.antialias)
            refined = refine_scores(unit, scores, self.pamr_size, self.pamr_iterations,
                                    self.pamr_dilations, ex.antialias)  # (s, s)
            ids = contiguous_ids(nearest_resize(refined, size), k)  # (H, W)
        else:
            ids = contiguous_ids(upsample_argmax(scores, size), k)  # (H, W)
        # a uniform image has a single region, decided on the device: nothing waits for it
        return ids.mul_(~is_uniform(image))


def to_device(image: np.ndarray, device: torch.device) -> Tensor:
    """(H, W, 3) uint8 array -> the same uint8 tensor on `device` (a quarter of float32's bytes)."""
    if device.type != "cuda":  # torch shares the array's memory, so it must be writable
        return torch.from_numpy(image if image.flags.writeable else image.copy()).to(device)
    pinned = torch.empty(image.shape, dtype=torch.uint8, pin_memory=True)
    pinned.numpy()[...] = image  # from page-locked memory the upload is queued, not waited for
    return pinned.to(device, non_blocking=True)


def is_uniform(image: Tensor) -> Tensor:
    """Whether every pixel of an (H, W, 3) image equals the first -> 0-d bool tensor, on its device."""
    flat = image.reshape(-1)  # every value equal to the one a pixel before it
    return (flat[3:] == flat[:-3]).all()


def resize_unit(image: Tensor, size: tuple[int, int], antialias: bool = True) -> Tensor:
    """(H, W, 3) uint8 image -> (3, *size) float32 in [0, 1], bilinear (antialiased), on its device."""
    unit = image.permute(2, 0, 1).float().div(255.0)  # (3, H, W)
    return F.interpolate(
        unit[None], size=size, mode="bilinear", align_corners=False, antialias=antialias
    )[0]



def _felzenszwalb(**kwargs: Any) -> Segmenter:
    """The classical CPU segmenter (labeling.classical), imported only when one is built."""
    from labeling.classical import FelzenszwalbSegmenter

    return FelzenszwalbSegmenter(**kwargs)


_REGISTRY: dict[str, Callable[..., Segmenter]] = {
    "diffcut": DiffCutSegmenter, "felzenszwalb": _felzenszwalb,
}


def register_segmenter(name: str, factory: Callable[..., Segmenter]) -> None:
    """Register a segmenter class (or factory) under `name`."""
    if name in _REGISTRY:
        raise KeyError(f"segmenter {name!r} is already registered")
    _REGISTRY[name] = factory


def available_segmenters() -> list[str]:
    """Names accepted by get_segmenter (besides "package.module:factory")."""
    return sorted(_REGISTRY)


def get_segmenter(name: str = DEFAULT_SEGMENTER, **kwargs: Any) -> Segmenter:
    """Build the segmenter registered as `name`, or made by `name` = "package.module:factory".

    A factory named by its module is imported where the segmenter is built (in every Ray worker:
    the module must be importable there) and called with the keyword arguments.
    """
    if name in _REGISTRY:
        factory = _REGISTRY[name]
    elif ":" in name:
        factory = _import_factory(name)
    else:
        raise KeyError(
            f"unknown segmenter {name!r}; known: {', '.join(available_segmenters())}, "
            "or a factory named as 'package.module:factory'"
        )
    segmenter = factory(**kwargs)
    if not isinstance(segmenter, Segmenter):
        raise TypeError(
            f"segmenter {name!r}: the factory returned a {type(segmenter).__name__}, "
            "not a labeling.segmenter.Segmenter"
        )
    return segmenter


def _import_factory(spec: str) -> Callable[..., Segmenter]:
    """The callable that "package.module:attribute[.attribute]" names, imported."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"segmenter {spec!r}: a factory is named as 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"segmenter {spec!r}: cannot import module {module_name!r} ({exc})"
        ) from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise AttributeError(
                f"segmenter {spec!r}: module {module_name!r} ({module.__file__}) has no "
                f"attribute {attr!r}"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise TypeError(f"segmenter {spec!r}: {attr!r} is a {type(factory).__name__}, not callable")
    return factory
