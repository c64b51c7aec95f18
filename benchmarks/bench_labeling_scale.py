"""Driver-side labeling stages at dataset scale: CPU seconds and peak RSS per stage.

Writes a synthetic label set of N images with realistic shapes through the project's writer
(12 segments of 384-d features per image, a 384-d global feature, 480x640 16-bit segment and
label maps, ~8 classes per image, a confusion table per shard), in a child process so that its
memory is not counted, then runs every stage the driver or a single whole-dataset task runs, in
this one process: the listing and identities, the segment-stage job rows, K-means (on a subset of
``--kmeans-images``), the label-stage job rows, the pairs (exact k-NN), the quality report and the
counts + ``labelset.json``. A sampling thread records the peak RSS of each stage.

    python benchmarks/bench_labeling_scale.py --images 10000
    python benchmarks/bench_labeling_scale.py --images 100000 --workdir /tmp/scale
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

SEGMENTS, DIM, CLASSES_PER_IMAGE = 12, 384, 8


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak RSS while the block runs (sampled every 5 ms), CPU seconds and wall seconds."""

    def __enter__(self) -> Peak:
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.cpu, self.wall = time.process_time(), time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self.cpu, self.wall = time.process_time() - self.cpu, time.perf_counter() - self.wall
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def write_labelset(uri: str, images: int, shard_size: int, height: int, width: int,
                   classes: int) -> None:
    """A complete segments + labels stage of ``images`` synthetic images, shard by shard."""
    from labeling.config import LabelConfig
    from labeling.pipeline import STAGE_TABLES
    from shared.images import encode_png
    from shared.labelset import LabelSetWriter

    rng = np.random.default_rng(0)
    ids_all = np.array([f"{i:08d}" for i in range(images)], object)
    identities = _identities(LabelConfig(classes=classes, shard_size=shard_size),
                             pa.table({"image_id": pa.array(ids_all.tolist(), pa.string())}))
    writer = LabelSetWriter(uri, identities["segments"])
    for stage, tables in STAGE_TABLES.items():
        writer.reset_stage(stage, identities[stage], tables)
    # a handful of distinct maps, reused: the driver never decodes them
    seg_png = [encode_png(rng.integers(0, SEGMENTS, (height, width)).astype(np.uint16))
               for _ in range(4)]
    lab_png = [encode_png(rng.integers(0, classes, (height, width)).astype(np.uint16))
               for _ in range(4)]
    for shard, start in enumerate(range(0, images, shard_size)):
        if writer.is_done("labels", shard):
            continue
        ids = ids_all[start:start + shard_size].tolist()
        n = len(ids)
        with writer.shard("segments", shard) as out:
            out.write_columns("images", image_id=ids, uri=[f"s3://bucket/{i}.jpg" for i in ids],
                              width=np.full(n, width), height=np.full(n, height),
                              status=["ok"] * n, error=[None] * n, shard=np.full(n, shard))
            out.write_columns("segments", image_id=np.repeat(np.array(ids, object), SEGMENTS),
                              segment_id=np.tile(np.arange(SEGMENTS), n),
                              area=np.full(n * SEGMENTS, 1 / SEGMENTS),
                              feature=rng.standard_normal((n * SEGMENTS, DIM), np.float32))
            out.write_columns("globals", image_id=ids,
                              feature=rng.standard_normal((n, DIM), np.float32))
            out.write_maps_png("segments", {i: seg_png[k % 4] for k, i in enumerate(ids)})
        cls = np.stack([rng.choice(classes, CLASSES_PER_IMAGE, replace=False) for _ in ids])
        with writer.shard("labels", shard) as out:
            out.write_columns("classes", image_id=np.repeat(np.array(ids, object),
                                                            CLASSES_PER_IMAGE),
                              class_id=np.sort(cls, 1).reshape(-1),
                              area=np.full(n * CLASSES_PER_IMAGE, 1 / CLASSES_PER_IMAGE))
            out.write_maps_png("labels", {i: lab_png[k % 4] for k, i in enumerate(ids)})
            t = rng.integers(0, 20, 200)
            out.write_columns("confusion", true_class=t, pred_class=rng.integers(0, classes, 200),
                              pixels=rng.integers(1, 1000, 200))
            out.count("images_with_truth", n)


def _identities(cfg, listing: pa.Table) -> dict:
    from labeling.config import stage_identities
    from labeling.pipeline import listing_digest

    return stage_identities(cfg, listing_digest(listing), listing.num_rows)


def run_stages(uri: str, images: int, shard_size: int, classes: int, kmeans_images: int,
               niter: int) -> list[tuple[str, Peak]]:
    from labeling import aggregate
    from labeling.config import LabelConfig
    from labeling.pipeline import label_jobs, segment_jobs
    from shared.labelset import LabelSetWriter

    cfg = LabelConfig(out=uri, classes=classes, shard_size=shard_size,
                      kmeans_max_images=kmeans_images, kmeans_niter=niter)
    results = []
    with Peak() as peak:  # what LabelingRun holds: the listing, the identities, the writer
        ids = pa.array([f"{i:08d}" for i in range(images)], pa.string())
        listing = pa.table({"image_id": ids,
                            "uri": pa.compute.binary_join_element_wise("s3://bucket/", ids,
                                                                       ".jpg", "")})
        identities = _identities(cfg, listing)
        writer = LabelSetWriter(uri, identities["segments"])
        jobs = segment_jobs(listing, shard_size, list(range(-(-images // shard_size))))
    results.append(("listing + segment jobs", peak))
    if writer.has_table("centroids"):
        writer.reset_stage("centroids", {"bench": time.time()}, ("centroids",))
    with Peak() as peak:
        aggregate.cluster(writer, cfg)
    results.append(("cluster (K-means)", peak))
    with Peak() as peak:
        cents = aggregate.centroids(writer)
        done = [m["shard"] for m in writer.markers("labels")]
        jobs = label_jobs(list(range(len(jobs))))
        assert cents.shape == (classes, DIM) and len(done) == len(jobs)
    results.append(("label jobs", peak))
    with Peak() as peak:
        aggregate.pair(writer, cfg)
    results.append(("pair (exact k-NN)", peak))
    with Peak() as peak:
        aggregate.quality(writer, classes)
    results.append(("quality", peak))
    with Peak() as peak:
        counts = aggregate.counts(writer, classes, len(jobs))
        writer.finish({"counts": counts})
    results.append(("finish (counts)", peak))
    assert counts["images"] == images and counts["segments"] == images * SEGMENTS, counts
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--map-size", default="480x640", help="HxW of the stored maps")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--kmeans-images", type=int, default=5000,
                        help="K-means subset (the paper's setting is 200k on large sets)")
    parser.add_argument("--kmeans-niter", type=int, default=10)
    parser.add_argument("--workdir", default=None, help="keep / reuse the synthetic label set")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / BLAS threads (a Ray task of one CPU gets one)")
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    height, width = (int(v) for v in args.map_size.lower().split("x"))
    workdir = args.workdir or tempfile.mkdtemp(prefix="dip-scale-")
    uri = os.path.join(workdir, f"labels-{args.images}")

    t0 = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(
        target=write_labelset, args=(uri, args.images, args.shard_size, height, width,
                                     args.classes))
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(f"writing the synthetic label set failed (exit {child.exitcode})")
    print(f"label set of {args.images} images ready at {uri} in "
          f"{time.perf_counter() - t0:.1f} s (maps {height}x{width})")
    results = run_stages(uri, args.images, args.shard_size, args.classes, args.kmeans_images,
                         args.kmeans_niter)
    print("\n| stage | CPU s | wall s | peak RSS GiB |\n|---|---|---|---|")
    for name, p in results:
        print(f"| {name} | {p.cpu:.1f} | {p.wall:.1f} | {p.peak / 2**30:.2f} |")
    peak = max(max(p.peak for _, p in results), resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(f"driver peak RSS {peak / 2**30:.2f} GiB at {args.images} images")


if __name__ == "__main__":
    main()
