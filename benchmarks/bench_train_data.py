"""Training input: tasks/s per CPU core of the prepare path against the packed path.

    python benchmarks/bench_train_data.py                       # 256 synthetic 320x256 images
    python benchmarks/bench_train_data.py --labels s3://bucket/labels/coco --tasks 2000

Prepare path: ``PairEpisodes`` items (decode the JPEG, read the 16-bit PNG label map, resize and
crop both) at every visit, in the uniform epoch order. Packed path: the same pairs from the pack
of the same label set (built first, timed separately), in its window order, a micro-batch at a
time as the data loader asks for them. Each path is measured in a fresh process with one torch
thread; tasks/s per core = tasks / CPU seconds of that process (collate included). Peak RSS is
that process's maximum resident set, imports (torch) included; the import baseline is printed
with it. Bytes per image = the pack's shard blobs / its images.

Both measuring processes run with glibc's allocator as a loader worker has it, unless
``--keep-heap`` (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ raised): with int64 label maps a
micro-batch of 32 tasks was about 35 MB of fresh tensors, and glibc's heuristics decided run to
run whether that memory was reused or page-faulted anew; the packed reader's uint8 / int32 maps
make a batch 4-8x smaller, and the figure no longer depends on it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa

from shared import storage


def synthetic_labelset(root: str, num_images: int, height: int, width: int,
                       pairs_per_image: int, seed: int = 0) -> str:
    """A label set of procedural scenes (ground-truth masks as pseudo-labels): image i is paired
    with images i+1 .. i+pairs_per_image (cyclic), as k-NN pairs give a few per image."""
    from shared.images import encode_jpeg
    from shared.labelset import LabelSetWriter
    from shared.synthetic import CLASS_NAMES, make_scene

    ids, uris, masks = [], [], {}
    for i in range(num_images):
        image, mask = make_scene(seed + i, (height, width))
        ids.append(f"img{i:06d}")
        uris.append(storage.join(root, "source", f"{ids[-1]}.jpg"))
        storage.write_bytes(uris[-1], encode_jpeg(image))
        masks[ids[-1]] = mask.astype(np.uint16)
    pairs = [(ids[i], ids[(i + k) % num_images]) for i in range(num_images)
             for k in range(1, pairs_per_image + 1)]
    uri = storage.join(root, "labelset")
    writer = LabelSetWriter(uri, {"bench": "train_data", "images": num_images, "seed": seed})
    n, m = len(ids), len(pairs)
    with writer.shard("label", 0) as shard:
        shard.write_table("images", pa.table({
            "image_id": ids, "uri": uris, "width": [width] * n, "height": [height] * n,
            "status": ["ok"] * n, "error": pa.array([None] * n, pa.string())}))
        shard.write_maps("labels", masks)
    writer.write_table("pairs", pa.table({
        "query_id": [q for q, _ in pairs], "positive_id": [p for _, p in pairs],
        "class_id": [1] * m, "query_area": [0.1] * m, "positive_area": [0.1] * m}))
    writer.finish({"K": len(CLASS_NAMES)})
    return uri


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB


def measure(args: dict) -> dict:
    """One path in this (fresh) process: tasks, CPU seconds, wall seconds, peak RSS."""
    import torch

    from training.episodes import PairEpisodes
    from training.packed import packed_episodes

    torch.set_num_threads(1)
    baseline = _peak_rss_mib()
    source = PairEpisodes(args["labels"], args["resize"], args["crop"])
    if args["path"] == "packed":
        data = packed_episodes(source, args["root"], args["shard_size"], args["window"],
                               build=False, progress=False)
    else:
        data = source
    micro, done = args["micro"], 0
    cpu, wall = time.process_time(), time.perf_counter()
    epoch = 0
    while done < args["tasks"]:
        order = data.order(0, epoch).tolist()
        for start in range(0, len(order) - micro + 1, micro):
            data.batch(order[start : start + micro])  # what one loader request builds
            done += micro
            if done >= args["tasks"]:
                break
        epoch += 1
    return {"tasks": done, "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall, "rss_mib": _peak_rss_mib(),
            "import_rss_mib": baseline}


def run_isolated(args: dict) -> dict:
    """``measure`` in a fresh spawned process, so its peak RSS is its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (args,))


def pack_bytes(uri: str) -> int:
    return sum(storage.size(u) for u in storage.find(storage.join(uri, "shards")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", help="label set URI (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=256, help="synthetic images")
    parser.add_argument("--size", default="320x256", help="synthetic WIDTHxHEIGHT")
    parser.add_argument("--pairs-per-image", type=int, default=3)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--micro", type=int, default=32, help="tasks per loader request")
    parser.add_argument("--tasks", type=int, default=256, help="tasks timed on the prepare path")
    parser.add_argument("--packed-tasks", type=int, default=4096)
    parser.add_argument("--workdir", help="where the synthetic label set and the pack go")
    parser.add_argument("--keep-heap", action="store_true",
                        help="raise glibc's mmap / trim thresholds (see above)")
    a = parser.parse_args()
    if a.keep_heap:  # read by the measuring processes when they start
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 << 20))
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))

    import torch

    from training.episodes import PairEpisodes
    from training.packed import packed_episodes

    torch.set_num_threads(1)
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench-train-data-")
    labels = a.labels
    if labels is None:
        width, height = (int(v) for v in a.size.split("x"))
        labels = synthetic_labelset(workdir, a.images, height, width, a.pairs_per_image)
    root = storage.join(workdir, "packed") if a.workdir or a.labels is None else None
    source = PairEpisodes(labels, a.resize, a.crop)
    cpu, wall = time.process_time(), time.perf_counter()
    pack = packed_episodes(source, root, a.shard_size, a.window, progress=False)
    build_cpu, build_wall = time.process_time() - cpu, time.perf_counter() - wall
    images = pack.images.meta["num_images"]

    common = {"labels": labels, "resize": a.resize, "crop": a.crop, "root": root,
              "shard_size": a.shard_size, "window": a.window, "micro": a.micro}
    prep = run_isolated({**common, "path": "prepare", "tasks": a.tasks})
    packed = run_isolated({**common, "path": "packed", "tasks": a.packed_tasks})
    rate = {name: r["tasks"] / r["cpu_s"] for name, r in (("prepare", prep), ("packed", packed))}

    print(f"label set {labels}: {len(source)} pairs, {images} images; geometry "
          f"{a.resize}/{a.crop}; pack {pack.images.uri}")
    print(f"pack build: {build_wall:.1f} s wall, {build_cpu:.1f} CPU s "
          f"({images / max(build_cpu, 1e-9):.1f} images per CPU s); "
          f"{pack_bytes(pack.images.uri) / images:,.0f} bytes per image on disk")
    print(f"allocator: {'heap kept' if a.keep_heap else 'default'}")
    print(f"{'path':<8} {'tasks':>6} {'CPU s':>7} {'wall s':>7} {'tasks/s/core':>13} "
          f"{'peak RSS MiB':>13} {'(imports)':>10}")
    for name, r in (("prepare", prep), ("packed", packed)):
        print(f"{name:<8} {r['tasks']:>6} {r['cpu_s']:>7.2f} {r['wall_s']:>7.2f} "
              f"{rate[name]:>13.1f} {r['rss_mib']:>13.0f} {r['import_rss_mib']:>10.0f}")
    print(f"packed vs prepare, tasks/s per core: {rate['packed'] / rate['prepare']:.1f}x")


if __name__ == "__main__":
    main()
