"""The labeling service on a simulated multi-node Ray cluster writes the label set one node
writes: the same Parquet bytes and maps, with the actors placed on several nodes by a custom
resource. Plus the benchmark's fixed-cost segmenter and its timing arithmetic, without Ray.

The cluster lives in a child process (this file run as a script): the session's ``ray_local``
may already own this process's Ray, and a process is the driver of one Ray at a time, so a
cluster of its own here would mean shutting ``ray_local`` down under the other tests. The child
keeps Ray's temporary files and address file in a folder of its own, so that no bare
``ray.init()`` elsewhere can find its cluster, and grows one ``ray.cluster_utils.Cluster`` (one
start-up, one driver): first a single node with one actor, then three nodes with two actors,
each holding a whole node's two ``accel``, so necessarily on two nodes. The pool size and the
placement are operational settings: the label sets must not differ in a byte.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
WAIT = 0.3  # seconds per batch of the fixed-cost segmenter


def _bench_module(name: str):
    """A module of benchmarks/ (not a package), imported once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# --------------------------------------------------------------------------- without Ray


def test_the_fixed_cost_segmenter_waits_once_per_batch_and_quantises_colours(tmp_path):
    fixed = _bench_module("fixed_cost_segmenter")
    image = np.zeros((32, 40, 3), np.uint8)
    image[:, :20] = (200, 10, 10)  # red: code 4
    image[:16, 20:] = (10, 200, 10)  # green: code 2
    image[16:, 20:] = (250, 250, 250)  # white: code 7
    seg = fixed.FixedCostSegmenter(0.2, records=str(tmp_path / "rec"))
    t0 = time.perf_counter()
    maps = seg.segment([image, image[::-1].copy()])
    assert time.perf_counter() - t0 >= 0.2
    expected = np.zeros((32, 40), np.uint16)  # codes 2, 4, 7 renumbered 0, 1, 2
    expected[:, :20], expected[16:, 20:] = 1, 2
    assert np.array_equal(maps[0], expected) and np.array_equal(maps[1], expected[::-1])
    rows = fixed.read_records(tmp_path / "rec")
    assert [r["kind"] for r in rows] == ["built", "batch"]  # one wait for the whole batch
    assert rows[1]["images"] == 2 and rows[1]["end"] - rows[1]["start"] >= 0.2
    assert rows[1]["pid"] == os.getpid()
    assert seg.identity() == {"name": "fixed-cost", "maps": "colour-quantisation-3bit"}


def test_the_fixed_cost_factory_reads_the_workers_environment(monkeypatch, tmp_path):
    from labeling.segmenter import get_segmenter

    _bench_module("fixed_cost_segmenter")
    monkeypatch.setenv("DIP_FIXED_COST_WAIT", "0.25")
    monkeypatch.setenv("DIP_FIXED_COST_RECORDS", str(tmp_path))
    seg = get_segmenter("fixed_cost_segmenter:factory", device="cpu")  # as a worker builds it
    assert seg.wait == 0.25 and seg.records == tmp_path
    monkeypatch.setenv("DIP_FIXED_COST_WAIT", "soon")
    with pytest.raises(ValueError, match="DIP_FIXED_COST_WAIT='soon'"):
        get_segmenter("fixed_cost_segmenter:factory")
    monkeypatch.setenv("DIP_FIXED_COST_WAIT", "-1")
    with pytest.raises(ValueError, match=">= 0 s"):
        get_segmenter("fixed_cost_segmenter:factory")


def test_pool_metrics_separate_start_up_from_the_steady_rate():
    bench = _bench_module("bench_labeling_cluster")
    # two actors, three batches of 8 each, a batch every 1.25 s (1 s wait + 0.25 s between);
    # the second actor starts working 2 s after the first
    records = [{"kind": "built", "node": n, "pid": p, "start": 100.0 + d - 0.5}
               for n, p, d in (("a", 1, 10), ("b", 2, 12))]
    records += [{"kind": "batch", "node": n, "pid": p, "start": 100.0 + d + 1.25 * k,
                 "end": 101.0 + d + 1.25 * k, "images": 8}
                for n, p, d in (("a", 1, 10), ("b", 2, 12)) for k in range(3)]
    m = bench.pool_metrics(records, stage_start=100.0, stage_s=16.0)
    assert m["steady_rate"] == pytest.approx(2 * 16 / 2.5)  # 6.4 images/s per actor
    assert m["busy"] == pytest.approx(3 / 3.5)
    assert (m["first_batch_s"], m["all_working_s"]) == pytest.approx((10.0, 12.0))
    assert m["built_s"] == pytest.approx(11.5) and m["tail_s"] == pytest.approx(16.0 - 15.5)
    assert m["nodes_used"] == m["nodes_placed"] == ["a", "b"] and m["actors_working"] == 2


# --------------------------------------------------------------------------- on a cluster


def _child(images: str, work: str, ray_tmp: str) -> None:
    """Single node, then three: one labeling run each on the same growing cluster."""
    sys.path.insert(0, str(BENCH))
    import bench_labeling_cluster as bench  # before ray: it keeps Ray on 127.0.0.1
    import ray
    from fixed_cost_segmenter import read_records

    out = Path(work)
    records = out / "records"
    report = {}
    with bench.private_ray_tmp(ray_tmp):
        cluster = bench.start_cluster(1, cpus=4, accel=2, object_store_mb=150)
        try:
            with bench.connected(cluster, bench.worker_env(WAIT, records)):
                for name, nodes, actors, per_actor in (("single", 1, 1, 1.0),
                                                       ("three", 3, 2, 2.0)):
                    bench.add_nodes(cluster, nodes - len(cluster.list_all_nodes()), 4, 2, 150)
                    cfg = bench.label_config(images, str(out / name), actors=actors,
                                             per_actor=per_actor, shard_size=3, batch_size=3,
                                             classes=4)
                    t0 = time.time()
                    summary, whole, _ = bench.timed_run(cfg)
                    mine = [r for r in read_records(records) if r["start"] >= t0]
                    report[name] = {
                        "out": cfg.out, "seconds": whole, "summary": summary,
                        "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
                        "actors_built": sum(r["kind"] == "built" for r in mine),
                        "placed": sorted({r["node"] for r in mine if r["kind"] == "built"}),
                        "worked": sorted({r["node"] for r in mine if r["kind"] == "batch"})}
        finally:
            cluster.shutdown()
    (out / "report.json").write_text(json.dumps(report, indent=1))


@pytest.mark.integration
@pytest.mark.slow
def test_a_three_node_cluster_writes_the_label_set_of_a_single_node(tmp_path, tiny_labeling,
                                                                   stop_processes):
    from labeling.segmenter import prepare_image
    from shared import storage
    from shared.images import decode_image
    from shared.labelset import LabelSet

    fixed = _bench_module("fixed_cost_segmenter")
    images = tiny_labeling.images(str(tmp_path / "data"))  # 10 scenes and one corrupt JPEG
    work = tmp_path / "work"
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run([sys.executable, __file__, images, str(work), ray_tmp], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop_processes(ray_tmp)
    assert done.returncode == 0, done.stderr[-5000:]
    report = json.loads((work / "report.json").read_text())
    single, three = report["single"], report["three"]

    assert len(single["cluster_nodes"]) == 1 and single["placed"] == single["cluster_nodes"]
    assert len(three["cluster_nodes"]) == 3
    assert len(three["placed"]) == 2 and set(three["placed"]) <= set(three["cluster_nodes"])
    assert (single["actors_built"], three["actors_built"]) == (1, 2)
    assert three["worked"] and set(three["worked"]) <= set(three["placed"])

    tables = tiny_labeling.table_bytes(single["out"])
    assert tables == tiny_labeling.table_bytes(three["out"])
    assert any("maps" in path for path in tables), sorted(tables)
    one, other = LabelSet(single["out"]), LabelSet(three["out"])
    assert one.image_ids == other.image_ids and len(one.image_ids) == tiny_labeling.num_images
    for iid in one.image_ids:
        seg = one.segment_map(iid)
        assert np.array_equal(seg, other.segment_map(iid))
        assert np.array_equal(one.label_map(iid), other.label_map(iid))
        uri = storage.join(images, f"{iid}.jpg")
        image = prepare_image(decode_image(storage.read_bytes(uri), name=uri))
        assert np.array_equal(seg, fixed.quantise(image))  # the fixed-cost segmenter's maps
    failed = [r["image_id"] for r in one.images().to_pylist() if r["status"] == "error"]
    assert failed == ["zz_corrupt"]


if __name__ == "__main__":
    _child(*sys.argv[1:])
