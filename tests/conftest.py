"""Shared test fixtures: a loopback S3 endpoint, a local Ray, storage roots, GPU skipping.

Nothing here touches the network beyond 127.0.0.1, and no model weights are downloaded.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Set before anything imports ray or the hub clients.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray binds and talks to loopback only: on Linux it would otherwise use the primary interface
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# OpenMP threads that spin while waiting make every test crawl when two processes share the cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible HTTP endpoint on 127.0.0.1 (moto), with the environment pointing at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the loopback endpoint; returns its ``s3://`` URI."""
    import boto3

    name = f"dip-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"


def _load_s3_faults():
    """tests/s3_faults.py as a module: the tests folder is not a package on ``sys.path``."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "dip_tests_s3_faults"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("s3_faults.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def s3_proxy(s3_endpoint):
    """A fault-injecting proxy (tests/s3_faults.py) in front of the loopback S3 endpoint.

    Point a client at ``s3_proxy.endpoint`` (e.g. ``monkeypatch.setenv("AWS_ENDPOINT_URL", ...)``)
    and add faults with ``s3_proxy.fail(method=..., key_contains=..., mode=..., times=...)``.
    """
    with _load_s3_faults().S3FaultProxy(s3_endpoint, stall_limit=30.0) as proxy:
        yield proxy


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """A writable root URI, once on local disk and once on the loopback S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A local Ray with small, explicit resources; workers see the loopback S3 endpoint."""
    import ray

    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint, "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray.init(
        address="local",  # a Ray of its own, even while another test's cluster runs
        _node_ip_address="127.0.0.1",
        num_cpus=4,
        num_gpus=0,
        object_store_memory=256 * 1024**2,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def build_synthetic_labelset(root: str, num_images: int = 8, size=(64, 48), seed: int = 100,
                             prefix: str = "img", pairing: str = "next", extra_pairs=()) -> str:
    """A complete label set of synthetic scenes whose ground-truth masks are the pseudo-labels.

    pairing "next": image i is paired with image i+1 (cyclic); "shared": with the next image that
    shares an object class. ``extra_pairs`` are appended as they are (e.g. naming a missing image).
    """
    import numpy as np
    import pyarrow as pa

    from shared import storage
    from shared.images import encode_jpeg
    from shared.labelset import LabelSetWriter
    from shared.synthetic import CLASS_NAMES, make_scene

    ids, uris, masks = [], [], {}
    for i in range(num_images):
        image, mask = make_scene(seed + i, size)
        ids.append(f"{prefix}{i:03d}")
        uris.append(storage.join(root, "source", f"{ids[-1]}.jpg"))
        storage.write_bytes(uris[-1], encode_jpeg(image))
        masks[ids[-1]] = mask.astype(np.uint16)
    if pairing == "next":
        pairs = list(zip(ids, ids[1:] + ids[:1], strict=True))
    elif pairing == "shared":
        objects = {i: set(np.unique(m).tolist()) - {0} for i, m in masks.items()}
        pairs = []
        for k, query in enumerate(ids):
            later = ids[k + 1:] + ids[:k]
            pairs.append((query, next((p for p in later if objects[p] & objects[query]), later[0])))
    else:
        raise ValueError(f"unknown pairing {pairing!r}")
    pairs += list(extra_pairs)
    uri = storage.join(root, "labelset")
    writer = LabelSetWriter(uri, {"test": "synthetic", "seed": seed, "pairing": pairing})
    n, m = len(ids), len(pairs)
    with writer.shard("label", 0) as shard:
        shard.write_table("images", pa.table({
            "image_id": ids, "uri": uris, "width": [size[1]] * n, "height": [size[0]] * n,
            "status": ["ok"] * n, "error": pa.array([None] * n, pa.string())}))
        shard.write_maps("labels", masks)
    writer.write_table("pairs", pa.table({
        "query_id": [q for q, _ in pairs], "positive_id": [p for _, p in pairs],
        "class_id": [1] * m, "query_area": [0.1] * m, "positive_area": [0.1] * m}))
    writer.finish({"K": len(CLASS_NAMES)})
    return uri


@pytest.fixture(scope="session")
def synthetic_labelset():
    """The builder of small hand-made label sets (see ``build_synthetic_labelset``)."""
    return build_synthetic_labelset


def build_memory_equals_queries(root: str) -> str:
    """Synthetic scenes whose train split is a copy of the val split (5 scenes of 48 px): with
    k = 1 every query patch retrieves itself. Returns ``root``."""
    from shared import storage
    from shared.synthetic import write_synthetic_dataset

    write_synthetic_dataset(root, num_train=0, num_val=5, size=(48, 48))
    for uri in storage.glob(storage.join(root, "images", "val", "*.jpg")):
        name = uri.rsplit("/", 1)[-1][:-4]
        for kind, ext in (("images", "jpg"), ("masks", "png")):
            data = storage.read_bytes(storage.join(root, kind, "val", f"{name}.{ext}"))
            storage.write_bytes(storage.join(root, kind, "train", f"{name}.{ext}"), data)
    return root


@pytest.fixture(scope="session")
def memory_equals_queries():
    """The builder of scenes whose memory is the queries (see ``build_memory_equals_queries``)."""
    return build_memory_equals_queries


def _stop_processes_mentioning(*markers: str) -> None:
    """SIGKILL the processes whose command line contains a marker, and all their descendants
    (``ray stop`` would also stop the tests' own Ray; Ray renames its agents' command lines)."""
    import signal
    from pathlib import Path

    parent, hits = {}, set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parent[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if any(m.encode() in cmdline for m in markers):
            hits.add(pid)
    grown = True
    while grown:  # add children of anything already selected
        new = {pid for pid, ppid in parent.items() if ppid in hits} - hits
        hits |= new
        grown = bool(new)
    for pid in hits - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


@pytest.fixture(scope="session")
def stop_processes():
    """``stop(*markers)``: SIGKILL the processes whose command line mentions a marker, with
    their descendants (see ``_stop_processes_mentioning``)."""
    return _stop_processes_mentioning


class HeadNode:
    """A one-node ``ray start --head`` cluster (auth off, 4 CPUs) and ``ray job submit`` to it."""

    def __init__(self, address: str, env: dict[str, str]):
        self.address = address
        self.env = env

    def submit(self, entrypoint: list[str], runtime_env: dict | None = None,
               working_dir: str | None = None, timeout: float = 900):
        """Run ``ray job submit -- <entrypoint>``; retried while the job agent is still starting."""
        import json
        import subprocess
        import sys
        import time

        cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
               f"--address={self.address}"]
        if working_dir:
            cmd += ["--working-dir", working_dir]
        if runtime_env:
            cmd += ["--runtime-env-json", json.dumps(runtime_env)]
        cmd += ["--", *entrypoint]
        deadline = time.monotonic() + 120
        while True:
            result = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                                    timeout=timeout)
            starting = "No available agent" in result.stdout + result.stderr
            if result.returncode == 0 or not starting or time.monotonic() > deadline:
                return result
            time.sleep(3)


@pytest.fixture
def head_node():
    """A Ray cluster of its own, started with ``ray start --head`` and stopped afterwards."""
    import shutil
    import subprocess
    import sys
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are limited
    dash = _free_port()
    # every port chosen here: the defaults (e.g. the agent's 52365) clash with the tests' own Ray
    ports = {name: _free_port() for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
           "--node-ip-address=127.0.0.1", "--num-cpus=4", "--num-gpus=0",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats",
           *(f"--{name}={value}" for name, value in ports.items())]
    try:
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
        yield HeadNode(f"http://127.0.0.1:{dash}", env)
    finally:
        _stop_processes_mentioning(temp_dir, f"127.0.0.1:{ports['port']}")
        shutil.rmtree(temp_dir, ignore_errors=True)


class TinyLabeling:
    """Tiny labeling runs for tests: configs, small image folders, a label set's table bytes."""

    num_images = 10

    @staticmethod
    def config(images: str, out: str, **kw):
        from labeling.config import LabelConfig

        base = dict(images=images, out=out, tiny=True, classes=6, shard_size=4, batch_size=4,
                    actors=1, feature_size=56, kmeans_niter=10, decode_threads=2)
        base["diffcut"] = {"resolution": 128}
        base.update(kw)
        return LabelConfig.model_validate(base)

    def images(self, root: str, corrupt: bool = True) -> str:
        """``num_images`` synthetic 64x80 scenes (and one corrupt JPEG) under ``root``."""
        from shared import storage
        from shared.synthetic import write_synthetic_dataset

        write_synthetic_dataset(root, num_train=self.num_images, num_val=0, size=(64, 80),
                                seed=3)
        images = storage.join(root, "images", "train")
        if corrupt:
            storage.write_bytes(storage.join(images, "zz_corrupt.jpg"),
                                b"\xff\xd8\xff\xe0 not a jpeg")
        return images

    @staticmethod
    def table_bytes(uri: str) -> dict[str, bytes]:
        """Every Parquet object of a label set, by relative path."""
        from shared import storage

        fs, base = storage.url_to_fs(uri)
        return {path[len(base):]: fs.cat_file(path)
                for path in sorted(fs.find(base)) if path.endswith(".parquet")}


@pytest.fixture(scope="session")
def tiny_labeling():
    """Helpers for tiny labeling runs (see :class:`TinyLabeling`)."""
    return TinyLabeling()
