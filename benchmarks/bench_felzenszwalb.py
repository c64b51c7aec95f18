"""Best-match IoU of the classical segmenter's segments on the built-in scenes, over a grid of
settings, beside content-blind maps; the source of FelzenszwalbConfig's defaults.

    python benchmarks/bench_felzenszwalb.py                        # 64 scenes, the coarse grid
    python benchmarks/bench_felzenszwalb.py --resolution 80 96 112 128 --scale 1200 1600 2400 \
        3200 6400 --sigma 0 0.25 0.5 --min-size 50 100 200            # the fine grid
    python benchmarks/bench_felzenszwalb.py --images 128 --seed 1 ...  # held-out scenes

The scenes are `shared.synthetic.write_synthetic_dataset`'s (128 x 128, 1-4 textured objects over
a textured background, JPEG q95), read back as the labeling pipeline reads them. Score: for each
ground-truth region (each class present in an image) its IoU with the best-overlapping segment
(`labeling.quality.best_match_ious`), averaged over every region of every image. Content-blind
maps (one segment per image, a 4 x 4 grid of blocks, 16 ids at random per pixel) show what a
segmenter that ignores the image scores.

Measured on a shared 2-core CPU (load 4-6 from other jobs: ms/image are upper bounds),
scikit-image 0.26.0, one thread. The grid of the defaults (resolution 64-192, scale 100-6400,
sigma 0-2, min_size 20-200, in two passes), best-match IoU:
    64 scenes, seed 0: default 96 / 1600 / 0.25 / 100 0.798 (4.7 segments/image); best
    96 / 2400 / 0.25 / 100 0.799; 112 / 1600 / 0.5 / 100 0.792; 128 / 1600 / 1 / 100 0.738;
    one segment 0.327, 4x4 blocks 0.274, random 16 ids 0.051.
    128 scenes, seed 1 (held out): default 0.774, the best there; 96 / 2400 / 0.25 / 100 0.759;
    one segment 0.313, 4x4 blocks 0.268, random 16 ids 0.049.
The full table is in docs/labeling.md ("A classical CPU baseline").
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable

import numpy as np

from labeling.classical import felzenszwalb_map
from labeling.config import FelzenszwalbConfig
from labeling.quality import best_match_ious
from shared import storage
from shared.images import decode_image, decode_png
from shared.synthetic import image_id, write_synthetic_dataset


def load_scenes(count: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (H, W, 3) uint8, mask (H, W) uint8) pairs written and read back as files."""
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_dataset(root, num_train=count, num_val=0, size=(size, size), seed=seed)
        names = [image_id(i) for i in range(count)]
        return [(decode_image(storage.read_bytes(storage.join(root, "images", "train", f"{n}.jpg"))),
                 decode_png(storage.read_bytes(storage.join(root, "masks", "train", f"{n}.png"))))
                for n in names]


def score(scenes: list[tuple[np.ndarray, np.ndarray]],
          segment: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float, float]:
    """(mean best-match IoU over all regions, mean segments per image, ms per image)."""
    ious, counts, start = [], [], time.perf_counter()
    for image, mask in scenes:
        seg = segment(image)
        ious.append(best_match_ious(mask, seg))
        counts.append(int(seg.max()) + 1)
    ms = 1000 * (time.perf_counter() - start) / len(scenes)
    return float(np.concatenate(ious).mean()), float(np.mean(counts)), ms


def blind_maps(seed: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Maps that ignore the image's content: what a broken segmenter scores."""
    rng = np.random.default_rng(seed)

    def blocks(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return (np.arange(h)[:, None] * 4 // h) * 4 + np.arange(w)[None, :] * 4 // w

    return {"one segment": lambda im: np.zeros(im.shape[:2], np.int64),
            "4x4 blocks": blocks,
            "random 16 ids": lambda im: rng.integers(0, 16, im.shape[:2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, nargs="+", default=[64, 96, 128, 192])
    parser.add_argument("--scale", type=float, nargs="+", default=[100, 200, 400, 800, 1600])
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--min-size", type=int, nargs="+", default=[20, 50, 100, 200])
    parser.add_argument("--top", type=int, default=10, help="rows of the best settings shown")
    args = parser.parse_args()

    scenes = load_scenes(args.images, args.size, args.seed)
    print(f"{len(scenes)} scenes of {args.size} px; best-match IoU over every true region")
    for name, fn in blind_maps(args.seed).items():
        iou, segs, _ = score(scenes, fn)
        print(f"  {name:>14}: IoU {iou:.3f}, {segs:.1f} segments/image")
    default = FelzenszwalbConfig()
    rows = []
    for res, scale, sigma, min_size in itertools.product(args.resolution, args.scale,
                                                         args.sigma, args.min_size):
        cfg = FelzenszwalbConfig(resolution=res, scale=scale, sigma=sigma, min_size=min_size)
        iou, segs, ms = score(scenes, lambda im, cfg=cfg: felzenszwalb_map(im, cfg))
        rows.append((iou, segs, ms, cfg))
    rows.sort(key=lambda r: -r[0])
    print("| resolution | scale | sigma | min_size | best-match IoU | segments/image | ms/image |")
    print("|---|---|---|---|---|---|---|")
    shown = rows[: args.top] + [r for r in rows[args.top:] if r[3] == default]
    for iou, segs, ms, cfg in shown:
        mark = " (default)" if cfg == default else ""
        print(f"| {cfg.resolution} | {cfg.scale:g} | {cfg.sigma:g} | {cfg.min_size} | "
              f"{iou:.3f}{mark} | {segs:.1f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
