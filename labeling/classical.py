"""A classical CPU segmenter beside DiffCut: Felzenszwalb-Huttenlocher graph segmentation.

    seg = get_segmenter("felzenszwalb", config={"scale": 200.0}, device="cuda")
    maps = seg.segment_tensors([img0, img1])  # (H, W) int32 on cuda, ids 0..S-1

No model, no weights, no GPU: a baseline that shows what the DiffCut segments add, and a way to
label images on a machine without an accelerator. Each image is resized (aspect ratio kept;
shrunk with antialiased bilinear, enlarged by nearest) so that its longer side is `resolution`,
segmented there by `skimage.segmentation.felzenszwalb`, and its map resized back to the image's
own size by nearest neighbour. `scale`, `sigma` and `min_size` are thus in pixels of the working
image and mean the same on every image size. The images of a batch are segmented in a thread
pool: the algorithm's merge loop runs without the GIL.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from labeling.config import FelzenszwalbConfig
from labeling.segmenter import UINT16_IDS, Segmenter, relabel_contiguous
from shared.config import load_config
from shared.images import resize_image, resize_labels


def working_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) of an image of (height, width) resized so that its longer side is `resolution`."""
    scale = resolution / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def felzenszwalb_map(image: np.ndarray, settings: FelzenszwalbConfig) -> np.ndarray:
    """One (H, W, 3) uint8 image -> (H, W) uint16 segment map with contiguous ids 0..S-1.

    Segmented at the working resolution, then resized (nearest) to the image's size; ids are
    renumbered where that resize shrinks the map, which can drop a segment between its samples.
    """
    from skimage.segmentation import felzenszwalb

    height, width = image.shape[:2]
    size = working_size(height, width, settings.resolution)
    enlarged = max(size) > max(height, width)
    pixels = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)
    if enlarged:
        # by nearest: bilinear would blend the two colours of a sharp edge into strips of new
        # colours, which the graph keeps as segments of their own
        pixels = resize_labels(pixels, size)  # (3, h, w) uint8
    work = pixels.float().div_(255.0)  # (3, ., .) in [0, 1]
    if not enlarged and size != (height, width):
        work = resize_image(work, size)  # (3, h, w), antialiased so that textures do not alias
    # skimage reads a float image as [0, 1] and divides `scale` by 255 to match the paper's k
    labels = felzenszwalb(work.permute(1, 2, 0).numpy(), scale=settings.scale,
                          sigma=settings.sigma, min_size=settings.min_size,
                          channel_axis=-1)  # (h, w) int64, ids 0..S-1
    full = resize_labels(torch.from_numpy(labels), (height, width)).numpy()  # (H, W), nearest
    if enlarged:  # the map is shrunk back: a segment can fall between its samples
        return relabel_contiguous(full)
    if labels.max() >= UINT16_IDS:  # every working pixel is sampled: the ids stay contiguous
        raise ValueError(f"{labels.max() + 1} segments do not fit a uint16 segment map")
    return full.astype(np.uint16)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without affinity masks
        return os.cpu_count() or 1


class FelzenszwalbSegmenter(Segmenter):
    """Felzenszwalb-Huttenlocher segments at a working resolution, on the CPU.

    Settings come from FelzenszwalbConfig's defaults, then `config` (a FelzenszwalbConfig or a
    dict), then keyword arguments; an invalid value is a ConfigError naming the field. The maps
    are computed on the host and left on `device` (the worker's, so that pooling needs no copy).
    `threads` bounds the pool that segments a batch's images (default: the cores available).
    """

    name = "felzenszwalb"

    def __init__(self, config: FelzenszwalbConfig | dict[str, Any] | None = None,
                 device: str | torch.device | None = None, threads: int | None = None,
                 **settings: Any):
        base = config.model_dump() if isinstance(config, FelzenszwalbConfig) else dict(config or {})
        self.settings = load_config(FelzenszwalbConfig, overrides={**base, **settings})
        if threads is not None and threads < 1:
            raise ValueError(f"{self.name}: threads must be at least 1, got {threads}")
        self.threads = threads or available_cores()
        self.device = torch.device(device or "cpu")

    def identity(self) -> dict[str, Any]:
        import skimage

        return {"name": self.name, "implementation": f"scikit-image {skimage.__version__}",
                **self.settings.model_dump(),
                "resize": "longer side to resolution: shrunk bilinear antialiased, enlarged "
                          "nearest; maps back nearest"}

    def _segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        workers = min(self.threads, len(images))
        if workers == 1:
            return [felzenszwalb_map(image, self.settings) for image in images]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="felzenszwalb") as pool:
            return list(pool.map(lambda image: felzenszwalb_map(image, self.settings), images))
