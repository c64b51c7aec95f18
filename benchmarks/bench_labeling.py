"""Labeling throughput: the whole Ray pipeline vs the segmenter + encoder forward passes alone.

The ratio shows what the plumbing (decode, Ray Data, K-means, pairs, writes) costs on top of the
model work. Tiny random-init models by default (CPU-friendly); ``--paper`` uses SSD-1B + DINOv2R
from the hub (GPU machines).

    python benchmarks/bench_labeling.py --images 32 --size 128
    python benchmarks/bench_labeling.py --paper --images 512 --size 512 --batch 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="synthetic image side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--paper", action="store_true", help="real SSD-1B + DINOv2R weights")
    parser.add_argument("--resolution", type=int, default=None, help="DiffCut input side")
    parser.add_argument("--feature-size", type=int, default=None)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs for the local Ray")
    args = parser.parse_args()

    import ray
    import torch

    from labeling.config import LabelConfig
    from labeling.listing import list_images
    from labeling.pipeline import run_labeling
    from labeling.stages import LabelingModels
    from shared.images import load_image
    from shared.synthetic import write_synthetic_dataset

    work = tempfile.mkdtemp(prefix="bench_labeling_")
    write_synthetic_dataset(f"{work}/data", num_train=args.images, num_val=0,
                            size=(args.size, args.size), seed=0)
    images_uri = f"{work}/data/images/train"
    cfg = {"images": images_uri, "out": f"{work}/labels", "tiny": not args.paper,
           "classes": args.classes, "batch_size": args.batch, "shard_size": max(args.batch, 32)}
    if args.resolution:
        cfg["diffcut"] = {"resolution": args.resolution}
    elif not args.paper:
        cfg["diffcut"] = {"resolution": 128}
    if args.feature_size:
        cfg["feature_size"] = args.feature_size
    elif not args.paper:
        cfg["feature_size"] = 112
    config = LabelConfig.model_validate(cfg)

    # models alone: decode once, then segment + encode in batches (what the actors must do)
    models = LabelingModels.load(config)
    images = [load_image(uri) for uri in list_images(images_uri).column("uri").to_pylist()]
    models.segmenter.segment(images[: args.batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(images), args.batch):
        chunk = images[i:i + args.batch]
        models.segmenter.segment(chunk)
        models.encode(chunk)
        models.encode(chunk)  # the labelling stage encodes each image a second time
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    alone = time.perf_counter() - t0
    del models

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    summary = run_labeling(config, progress=False)
    whole = time.perf_counter() - t0
    ray.shutdown()

    n = len(images)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nlabeling benchmark: {n} images {args.size}x{args.size}, batch {args.batch}, "
          f"{'paper' if args.paper else 'tiny'} models, {device}")
    print(f"| {'what':<34} | {'seconds':>8} | {'images/s':>9} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|")
    print(f"| {'segmenter + encoder alone':<34} | {alone:8.2f} | {n / alone:9.2f} |")
    print(f"| {'whole pipeline (Ray, 6 stages)':<34} | {whole:8.2f} | {n / whole:9.2f} |")
    print(f"\nplumbing overhead: whole / alone = {whole / alone:.2f}x")
    print("stage seconds:", summary["seconds"])


if __name__ == "__main__":
    main()
