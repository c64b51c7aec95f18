"""Scaling of the labeling pipeline with its actor pool, on a simulated multi-node Ray cluster.

A local ``ray.cluster_utils.Cluster`` of ``--nodes`` nodes (each with a few CPUs and an
``accel`` custom resource standing in for GPUs, loopback only) runs ``run_labeling`` on synthetic
scenes with the fixed-cost segmenter (``fixed_cost_segmenter.py``: a fixed wait per batch,
colour-quantisation maps) and fixed pools of ``--actors`` actors, one ``accel`` each, each run
from a fresh driver as a labeling job would be. The wait stands in for GPU work, so on any
machine N actors should label N times as many images per second as one; the first table says
how close the pipeline gets:

* ``segment s``: the segment stage as the pipeline times it (``summary["seconds"]["segment"]``),
  everything before the first batch (building the shard dataset, starting the actors) included;
* ``steady images/s``: the sum over actors of each one's images per second between its first
  and last batch (from the segmenter's records): the stage without its start-up, which is what
  a long run converges to;
* ``whole s``: the whole run (segment, K-means, label, pairs).

The second table says where the segment stage's time went (seconds from its start): the last
segmenter built, the first batch, the last actor's first batch, the time after the last batch,
and ``busy``: the waits' share of an actor's time between its first and last batch (the rest is
decoding, the encoder, commits and Ray Data's dispatch).

Every run must write the same label set (the pool size is an operational setting): the script
compares the Parquet bytes of all runs and exits with 1 if any differ.

    python benchmarks/bench_labeling_cluster.py        # 3 nodes; 1, 2, 4 actors; 256 images
    python benchmarks/bench_labeling_cluster.py --actors 1 4 --images 512 --wait 1.0
    python benchmarks/bench_labeling_cluster.py --nodes 1 3 --actors 2 --images 24 --wait 0.1 \\
        --shard-size 4 --batch-size 4 --workdir /tmp/lc --json /tmp/lc/report.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Read when ray is first imported: Ray then binds to and connects through 127.0.0.1 only (it
# would otherwise turn the cluster's 127.0.0.1 address into the primary interface's).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

SEGMENTER = "fixed_cost_segmenter:factory"
RESOURCE = "accel"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[3],
                        help="cluster sizes to run, each a fresh cluster")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4],
                        help="fixed actor pool sizes to run on each cluster")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="synthetic image side")
    parser.add_argument("--wait", type=float, default=1.0, help="seconds per segmenter batch")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs of a node")
    parser.add_argument("--accel-per-node", type=int, default=None,
                        help=f"'{RESOURCE}' slots per node (default: enough for the largest pool)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--object-store-mb", type=int, default=150, help="per node")
    parser.add_argument("--tasks-in-flight", type=int, default=None,
                        help="Ray Data's max tasks in flight per actor (default: Ray Data's)")
    parser.add_argument("--workdir", default=None, help="kept; default: a temporary folder")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("nodes", "actors"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def slots_per_node(args: argparse.Namespace, nodes: int) -> int:
    """``accel`` slots per node: as given, or the fewest that fit the largest pool."""
    return args.accel_per_node or math.ceil(max(args.actors) / nodes)


@contextlib.contextmanager
def private_ray_tmp(folder: str | None = None):
    """Ray's temporary files, and its "current cluster" address file, in a folder of their own
    (``folder``, or a new one) while the block runs, removed after: a bare ``ray.init()``
    elsewhere on the machine must not find and join this process's cluster."""
    folder = folder or tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths are limited
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = folder
    try:
        yield folder
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(folder, ignore_errors=True)


def _node_args(cpus: int, accel: int, object_store_mb: int) -> dict[str, Any]:
    return dict(num_cpus=cpus, num_gpus=0, resources={RESOURCE: accel},
                object_store_memory=object_store_mb * 1024**2, node_ip_address="127.0.0.1")


def start_cluster(nodes: int, cpus: int, accel: int, object_store_mb: int):
    """A local Ray cluster of ``nodes`` nodes on 127.0.0.1 (the first is the head), each with
    ``cpus`` CPUs and ``accel`` of the ``accel`` resource."""
    from ray.cluster_utils import Cluster

    head = {**_node_args(cpus, accel, object_store_mb), "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        add_nodes(cluster, nodes - 1, cpus, accel, object_store_mb)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def add_nodes(cluster, count: int, cpus: int, accel: int, object_store_mb: int) -> None:
    """``count`` more nodes like ``start_cluster``'s, waited for."""
    for _ in range(count):
        cluster.add_node(**_node_args(cpus, accel, object_store_mb))
    cluster.wait_for_nodes()


def worker_env(wait: float, records: Path) -> dict[str, str]:
    """What the workers need: the segmenter's module on their path, its wait and records."""
    from fixed_cost_segmenter import RECORDS_ENV, WAIT_ENV

    path = os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, WAIT_ENV: repr(wait), RECORDS_ENV: str(records),
            "RAY_USAGE_STATS_ENABLED": "0"}


def label_config(images: str, out: str, actors: int, per_actor: float = 1.0, *,
                 shard_size: int, batch_size: int, classes: int = 8,
                 cpus_per_actor: float = 1.0):
    """Tiny models, the fixed-cost segmenter and a fixed pool of ``actors`` actors, each holding
    ``per_actor`` of the ``accel`` resource."""
    from labeling.config import LabelConfig

    return LabelConfig(images=images, out=out, tiny=True, segmenter=SEGMENTER, feature_size=56,
                       classes=classes, kmeans_niter=10, shard_size=shard_size,
                       batch_size=batch_size, actors=actors,
                       actor_resources={RESOURCE: per_actor}, cpus_per_actor=cpus_per_actor,
                       decode_threads=2)


@contextlib.contextmanager
def connected(cluster, env: dict[str, str], tasks_in_flight: int | None = None):
    """This process as the cluster's driver, its workers given ``env``; disconnects after."""
    import ray

    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        if tasks_in_flight:
            context.max_tasks_in_flight_per_actor = tasks_in_flight
        yield
    finally:
        ray.shutdown()


def timed_run(cfg) -> tuple[dict[str, Any], float, float]:
    """``run_labeling`` on the connected cluster: (summary, wall seconds, wall-clock time at
    which its segment stage began)."""
    from labeling.pipeline import run_labeling

    t0 = time.perf_counter()
    summary = run_labeling(cfg, progress=False)
    whole, done = time.perf_counter() - t0, time.time()
    # the stages run back to back, the segment stage first: it began this long before the end
    return summary, whole, done - sum(summary["seconds"].values())


def pool_metrics(records: list[dict[str, Any]], stage_start: float, stage_s: float
                 ) -> dict[str, Any]:
    """Where the segment stage's time went, from the segmenter's records (see the module
    docstring), and where the work ran."""
    batches = [r for r in records if r["kind"] == "batch"]
    if not batches:
        raise RuntimeError("the segmenter recorded no batch: did the workers get "
                           "DIP_FIXED_COST_RECORDS?")
    built = [r for r in records if r["kind"] == "built"]
    rate, busy, first = 0.0, [], []
    for pid in sorted({r["pid"] for r in batches}):
        own = [r for r in batches if r["pid"] == pid]  # in start order
        first.append(own[0]["start"])
        busy.append(sum(r["end"] - r["start"] for r in own) / (own[-1]["end"] - own[0]["start"]))
        if len(own) > 1:  # batch start to batch start: each period is one wait + what follows it
            rate += sum(r["images"] for r in own[:-1]) / (own[-1]["start"] - own[0]["start"])
        else:
            rate += own[0]["images"] / (own[0]["end"] - own[0]["start"])
    return {"steady_rate": rate, "busy": sum(busy) / len(busy),
            "built_s": max(r["start"] for r in built) - stage_start if built else float("nan"),
            "first_batch_s": min(first) - stage_start, "all_working_s": max(first) - stage_start,
            "tail_s": stage_start + stage_s - max(r["end"] for r in batches),
            "actors_working": len(first), "batch_images": sum(r["images"] for r in batches),
            "nodes_used": sorted({r["node"] for r in batches}),
            "nodes_placed": sorted({r["node"] for r in built})}


def labelset_digest(uri: str) -> dict[str, str]:
    """sha256 of every Parquet object of a label set (tables and maps), by relative path."""
    from shared import storage

    fs, base = storage.url_to_fs(uri)
    return {path[len(base):]: hashlib.sha256(fs.cat_file(path)).hexdigest()
            for path in sorted(fs.find(base)) if path.endswith(".parquet")}


def measure(args: argparse.Namespace, work: Path, images: str, nodes: int) -> list[dict]:
    """Every pool size of ``--actors`` on one fresh cluster of ``nodes`` nodes."""
    from fixed_cost_segmenter import read_records

    accel = slots_per_node(args, nodes)
    if max(args.actors) > nodes * accel:
        raise SystemExit(f"{max(args.actors)} actors do not fit {nodes} nodes x {accel} "
                         f"'{RESOURCE}': raise --accel-per-node")
    t0 = time.perf_counter()
    cluster = start_cluster(nodes, args.cpus_per_node, accel, args.object_store_mb)
    print(f"{nodes} node(s) x {args.cpus_per_node} CPUs, {accel} '{RESOURCE}' each: "
          f"started in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    try:
        for actors in args.actors:
            run_dir = work / f"nodes-{nodes}" / f"actors-{actors}"
            cfg = label_config(images, str(run_dir / "labels"), actors,
                               shard_size=args.shard_size, batch_size=args.batch_size,
                               classes=args.classes, cpus_per_actor=args.cpus_per_actor)
            # a fresh driver per run, as a labeling job has: no worker of an earlier run is reused
            with connected(cluster, worker_env(args.wait, run_dir / "records"),
                           args.tasks_in_flight):
                summary, whole, start = timed_run(cfg)
            segment_s = summary["seconds"]["segment"]
            pool = pool_metrics(read_records(run_dir / "records"), start, segment_s)
            rows.append({"nodes": nodes, "actors": actors, "images": summary["images"],
                         "segment_s": segment_s, "whole_s": whole,
                         "stages_s": summary["seconds"], "out": cfg.out, **pool,
                         "digest": labelset_digest(cfg.out)})
            print(f"  {actors} actor(s): segment {segment_s:.1f} s, whole {whole:.1f} s",
                  flush=True)
    finally:
        cluster.shutdown()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Speed-up and efficiency of each row against the smallest pool of the same cluster."""
    for row in rows:
        base = min((r for r in rows if r["nodes"] == row["nodes"]), key=lambda r: r["actors"])
        scale = row["actors"] / base["actors"]
        speeds = {"segment": base["segment_s"] / row["segment_s"],
                  "whole": base["whole_s"] / row["whole_s"],
                  "steady": row["steady_rate"] / base["steady_rate"]}
        for kind, speed in speeds.items():
            row[f"{kind}_speedup"], row[f"{kind}_efficiency"] = speed, speed / scale


def _markdown(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def tables(rows: list[dict]) -> str:
    """The scaling table, then where the segment stage's time went."""
    scaling = _markdown(
        ["nodes", "actors", "images", "segment s", "images/s", "speed-up", "efficiency",
         "steady images/s", "speed-up", "efficiency", "whole s", "images/s", "speed-up"],
        [[str(r["nodes"]), str(r["actors"]), str(r["images"]), f"{r['segment_s']:.2f}",
          f"{r['images'] / r['segment_s']:.2f}", f"{r['segment_speedup']:.2f}",
          f"{r['segment_efficiency']:.2f}", f"{r['steady_rate']:.2f}",
          f"{r['steady_speedup']:.2f}", f"{r['steady_efficiency']:.2f}", f"{r['whole_s']:.1f}",
          f"{r['images'] / r['whole_s']:.2f}", f"{r['whole_speedup']:.2f}"] for r in rows])
    where = _markdown(
        ["nodes", "actors", "actors working", "nodes used", "segmenters built s",
         "first batch s", "all actors working s", "after last batch s", "busy"],
        [[str(r["nodes"]), str(r["actors"]), str(r["actors_working"]), str(len(r["nodes_used"])),
          f"{r['built_s']:.1f}", f"{r['first_batch_s']:.1f}", f"{r['all_working_s']:.1f}",
          f"{r['tail_s']:.1f}", f"{r['busy']:.2f}"] for r in rows])
    return f"{scaling}\n\nthe segment stage, in seconds from its start:\n{where}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_labeling_cluster_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    taken = [f"nodes-{n}/actors-{a}" for n in args.nodes for a in args.actors
             if (work / f"nodes-{n}" / f"actors-{a}").exists()]
    if taken:  # a rerun there would resume, skipping every finished shard
        raise SystemExit(f"--workdir {work} already holds {', '.join(taken)}: choose a new one")
    from shared.synthetic import write_synthetic_dataset

    data = work / f"data-{args.images}x{args.size}"
    if not (data / "classes.json").exists():
        write_synthetic_dataset(str(data), num_train=args.images, num_val=0,
                                size=(args.size, args.size), seed=0)
    images = str(data / "images" / "train")
    with private_ray_tmp():
        rows = [row for nodes in args.nodes for row in measure(args, work, images, nodes)]
    add_ratios(rows)
    same = all(r["digest"] == rows[0]["digest"] for r in rows)
    print(f"\nlabeling on a simulated cluster: {args.images} images {args.size}x{args.size}, "
          f"shards of {args.shard_size}, batches of {args.batch_size}, fixed wait {args.wait} s "
          f"per batch (at most {args.batch_size / args.wait if args.wait else math.inf:.2f} "
          f"images/s per actor); tiny encoder at 56 px")
    print(tables(rows))
    print(f"label sets identical across runs ({len(rows[0]['digest'])} Parquet objects each): "
          f"{'yes' if same else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "identical": same,
                                               "runs": rows}, indent=1, default=str))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
