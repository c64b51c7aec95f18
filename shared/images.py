"""Image decoding, lossless label-map PNGs, and the train / evaluation geometry.

Decoding is strict: a truncated or corrupt file is an error that names the file, never a
half-grey image. Label maps are stored as 8- or 16-bit single-channel PNGs and come back
bit-exact. Geometry works on torch tensors shaped ``(..., C, H, W)`` (images) and
``(..., H, W)`` (labels); labels only ever take values that are in the input. Image resizing
and centre crops are torchvision's (``transforms.v2.functional``); label resizing is our own
exact integer nearest, which torchvision has no equal of (its nearest computes the source
index in float, and works on float copies of most integer types).
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's own hard limit is 2 * Image.MAX_IMAGE_PIXELS (about 179M pixels); match it by default.
DEFAULT_MAX_PIXELS = 178_956_970


class ImageDecodeError(ValueError):
    """Bytes could not be decoded into an image; the message names the file and the reason."""


# ---------------------------------------------------------------------------------------------
# Decoding


_strict_lock = threading.Lock()
_strict_depth = 0
_saved_truncated_flag = False


@contextmanager
def _no_truncated_loads() -> Iterator[None]:
    """Turn off Pillow's process-wide LOAD_TRUNCATED_IMAGES while any strict decode runs.

    Other code (some dataset libraries) sets that flag to accept truncated files; we want the
    error instead. A depth counter keeps concurrent decodes in threads consistent.
    """
    global _strict_depth, _saved_truncated_flag
    with _strict_lock:
        if _strict_depth == 0:
            _saved_truncated_flag = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_depth += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_truncated_flag


def _open_fully(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Open ``data`` with Pillow and decode every pixel (no lazy loading, no truncation)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            # our own pixel limit below replaces Pillow's warning band
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{name}: refused as a possible decompression bomb ({err})") from err
    except Exception as err:  # Pillow raises many types for unrecognised bytes
        raise ImageDecodeError(
            f"{name}: not a readable image ({len(data)} bytes; {type(err).__name__}: {err})"
        ) from err
    width, height = image.size
    if width * height > limit:
        raise ImageDecodeError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "(possible decompression bomb; raise max_pixels if the image is genuine)"
        )
    if width == 0 or height == 0:
        raise ImageDecodeError(f"{name}: image has zero size ({width}x{height})")
    try:
        with _no_truncated_loads():
            image.load()
    except Exception as err:
        raise ImageDecodeError(
            f"{name}: corrupt or truncated {image.format or 'image'} data "
            f"({type(err).__name__}: {err})"
        ) from err
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha dropped, 16/32-bit grey scaled to 8 bits)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I"):
        # I;16 / I;16B / I (16-bit PNGs, TIFFs): full 16-bit range maps onto 0..255
        grey = np.asarray(image).astype(np.float64)
        grey8 = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8).convert("RGB")
    if mode == "F":
        return image.convert("L").convert("RGB")
    if mode == "P":
        # via RGBA so palette transparency is handled without Pillow warnings
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to a (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Grey, grey+alpha, RGBA, palette, CMYK and 16-bit modes are converted to RGB. ``max_pixels``
    (default :data:`DEFAULT_MAX_PIXELS`) guards against decompression bombs; a limit above
    Pillow's own (``2 * PIL.Image.MAX_IMAGE_PIXELS``) also needs that raised. Raises
    :class:`ImageDecodeError` naming ``name`` for empty, unrecognised, corrupt or truncated data.
    """
    image = _open_fully(data, name, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
        array = np.asarray(rgb, dtype=np.uint8)
    except Exception as err:
        raise ImageDecodeError(
            f"{name}: could not convert {image.format or 'image'} mode {image.mode} to RGB "
            f"({type(err).__name__}: {err})"
        ) from err
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageDecodeError(f"{name}: decoded to shape {array.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(array)


def load_image(uri: str, max_pixels: int | None = None) -> np.ndarray:
    """Read ``uri`` (any storage URI) and decode it with :func:`decode_image`."""
    from shared import storage  # lazy: keeps this module importable on its own

    return decode_image(storage.read_bytes(uri), name=str(uri), max_pixels=max_pixels)


def encode_jpeg(image: np.ndarray, quality: int = 95, subsampling: int = 0) -> bytes:
    """Encode a (H, W, 3) uint8 RGB array as JPEG bytes (deterministic for a given libjpeg).

    ``subsampling`` is Pillow's chroma code: 0 = 4:4:4 (default, keeps fine coloured texture),
    1 = 4:2:2, 2 = 4:2:0.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_jpeg expects (H, W, 3) uint8, got {image.shape} {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Label maps as lossless PNG


def encode_png(label_map: np.ndarray) -> bytes:
    """Encode a 2-D uint8 or uint16 label map as a lossless 8- or 16-bit greyscale PNG."""
    array = np.asarray(label_map)
    if array.ndim != 2:
        raise ValueError(f"encode_png expects a 2-D (H, W) label map, got shape {array.shape}")
    if array.dtype.kind != "u" or array.dtype.itemsize not in (1, 2):
        raise TypeError(f"encode_png expects uint8 or uint16, got {array.dtype}")
    if 0 in array.shape:
        raise ValueError(f"encode_png cannot store an empty label map of shape {array.shape}")
    # uint8 -> mode "L"; uint16 (native order) -> mode "I;16", written as a 16-bit PNG
    image = Image.fromarray(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="))))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode a single-channel PNG label map exactly: 8-bit -> uint8, 16-bit -> uint16.

    Palette PNGs (e.g. Pascal VOC masks) return their palette indices as uint8.
    """
    image = _open_fully(data, name, None)
    if image.format != "PNG":
        raise ImageDecodeError(f"{name}: expected a PNG label map, got {image.format}")
    mode = image.mode
    if mode in ("L", "P", "1"):
        return np.array(image, dtype=np.uint8)
    if mode.startswith("I;16"):
        return np.array(image).astype(np.uint16)
    if mode == "I":
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ImageDecodeError(f"{name}: label values outside the 16-bit range")
        return values.astype(np.uint16)
    raise ImageDecodeError(
        f"{name}: expected a single-channel (greyscale or palette) label PNG, got mode {mode}"
    )


# ---------------------------------------------------------------------------------------------
# Geometry


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 array -> float32 tensor (..., 3, H, W) in [0, 1]."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim < 3 or array.shape[-1] != 3:
        raise ValueError(f"to_tensor expects (..., H, W, 3) uint8, got {array.shape} {array.dtype}")
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)  # torch.from_numpy needs a writable, contiguous buffer
    tensor = torch.from_numpy(array)
    return tensor.movedim(-1, -3).float().div_(255.0)  # (..., H, W, 3) -> (..., 3, H, W)


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel for images shaped (..., 3, H, W) in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean_t) / std_t


def _check_size(size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"output size must be positive, got {size}")
    return height, width


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing of (..., C, H, W) to (..., C, *size).

    torchvision's v2 ``resize``. Integer images are resized in float32 and rounded back, so
    that they come out the same on every device (torchvision's own uint8 kernel, used on CPU
    only, rounds differently). An image that already has ``size`` comes back as it is.
    """
    if image.ndim < 3:
        raise ValueError(f"resize_image expects (..., C, H, W), got shape {tuple(image.shape)}")
    height, width = _check_size(size)
    work = image if image.is_floating_point() else image.float()
    out = TF.resize(work, [height, width], interpolation=InterpolationMode.BILINEAR,
                    antialias=True)
    if not image.is_floating_point():
        info = torch.iinfo(image.dtype)
        out = out.round_().clamp_(info.min, info.max).to(image.dtype)
    return out


def nearest_indices(in_len: int, out_len: int, device=None) -> torch.Tensor:
    """Source index of each output pixel for centre-aligned nearest: floor((i + 1/2) in / out).

    Exact integer arithmetic, so no float rounding decides a boundary.
    """
    i = torch.arange(out_len, device=device, dtype=torch.int64)
    return torch.div((2 * i + 1) * in_len, 2 * out_len, rounding_mode="floor").clamp_(max=in_len - 1)


_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest (pixel-centre aligned) resize of (..., H, W) labels; dtype and values preserved."""
    if labels.ndim < 2:
        raise ValueError(f"resize_labels expects (..., H, W), got shape {tuple(labels.shape)}")
    height, width = _check_size(size)
    rows = nearest_indices(labels.shape[-2], height, labels.device)
    cols = nearest_indices(labels.shape[-1], width, labels.device)
    # unsigned 16/32/64-bit tensors have few kernels: index their bits as the signed type
    signed = _SIGNED_VIEW.get(labels.dtype)
    work = labels if signed is None else labels.view(signed)
    # pure indexing: every output value is copied from an input pixel
    out = work.index_select(-2, rows).index_select(-1, cols)  # (..., height, width)
    return out if signed is None else out.view(labels.dtype)


def shorter_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """Output (h, w) of ``Resize(short)``: shorter side -> short, longer side truncated."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def center_crop(tensor: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """Centre crop of the last two dims: torchvision's, anchored at round((size - crop) / 2).

    A crop larger than the input is an error here (torchvision would pad it with zeros).
    """
    crop_h, crop_w = _check_size(crop)
    height, width = tensor.shape[-2:]
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop {crop_h}x{crop_w} is larger than the input {height}x{width}")
    return TF.center_crop(tensor, [crop_h, crop_w])


def _check_pair(image: torch.Tensor, labels: torch.Tensor | None) -> None:
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"expected an image (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    if labels is not None and (
        labels.shape[-2:] != image.shape[-2:] or labels.ndim != image.ndim - 1
    ):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match image {tuple(image.shape)} "
            "(expected (H, W) for (3, H, W) or (B, H, W) for (B, 3, H, W))"
        )


def train_geometry(
    image: torch.Tensor, labels: torch.Tensor | None = None, resize: int = 256, crop: int = 224
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize(shorter side = resize, bilinear antialias) + CenterCrop(crop); labels nearest."""
    _check_pair(image, labels)
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    size = shorter_side_size(image.shape[-2], image.shape[-1], resize)
    out_image = center_crop(resize_image(image, size), (crop, crop))
    out_labels = None
    if labels is not None:
        out_labels = center_crop(resize_labels(labels, size), (crop, crop))
    return out_image, out_labels


def eval_geometry(
    image: torch.Tensor, labels: torch.Tensor | None, size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The whole image resized to (size, size) (bilinear antialias); labels nearest."""
    _check_pair(image, labels)
    out_image = resize_image(image, (size, size))
    out_labels = None if labels is None else resize_labels(labels, (size, size))
    return out_image, out_labels
