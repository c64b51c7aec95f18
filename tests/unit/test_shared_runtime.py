"""Helpers every stage uses the same way: default device, seeds, Ray start-up, done-markers,
and the evaluation's threaded decode."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from evaluation.bank import finished_shard, shard_uris, write_shard
from evaluation.encode import threaded_map
from shared import storage
from shared.devices import default_device
from shared.markers import MarkedUnit, read_marker
from shared.ray_init import ensure_ray
from shared.seeds import derive_generator, derive_seed
from shared.synthetic import scene_seed


def test_default_device_follows_cuda_and_keeps_an_explicit_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda") == default_device("")
    assert default_device("cpu") == torch.device("cpu")
    assert default_device(torch.device("meta")) == torch.device("meta")


def test_derived_seeds_depend_on_every_key_and_only_on_the_keys():
    seeds = {derive_seed(0, purpose, epoch) for purpose in range(4) for epoch in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**64 for s in seeds)
    assert derive_seed(7, 1, 2) == derive_seed(7, 1, 2) != derive_seed(7, 2, 1)
    a, b = derive_generator(3, 1), derive_generator(3, 1)
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    assert scene_seed(5, "val", 9) == derive_seed(5, 1, 9)  # the synthetic scenes use it too
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(1, -2)


class FakeRay:
    """Records ray.init calls; ``initialized`` says whether a session is already open."""

    def __init__(self, initialized: bool = False):
        self.calls: list[dict] = []
        self.initialized = initialized

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self, **kwargs) -> None:
        self.calls.append(kwargs)
        self.initialized = True


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    fake = FakeRay()
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return fake


def test_ensure_ray_starts_a_local_ray_once(fake_ray):
    import ray

    assert ensure_ray(num_cpus=3) is ray
    assert ensure_ray("ray://elsewhere:10001") is ray  # already connected: nothing more
    assert fake_ray.calls == [{"num_cpus": 3, "log_to_driver": False, "include_dashboard": False}]


def test_ensure_ray_joins_the_named_cluster_without_sizing_it(fake_ray, monkeypatch):
    ensure_ray("ray://head:10001", num_cpus=3, log_to_driver=True)
    monkeypatch.setenv("RAY_ADDRESS", "ray://env-head:10001")
    fake_ray.initialized = False
    ensure_ray()
    assert fake_ray.calls == [
        {"address": "ray://head:10001", "log_to_driver": True, "include_dashboard": False},
        {"address": "ray://env-head:10001", "log_to_driver": False, "include_dashboard": False},
    ]


def test_a_unit_counts_only_once_its_marker_is_written(tmp_path):
    root = str(tmp_path / "out")
    with MarkedUnit(root, "done/0.json", "test unit 0") as unit:
        storage.write_bytes(unit.claim("data/0.bin"), b"abc")
        assert read_marker(root, "done/0.json") is None  # files written, not yet committed
        marker = unit.commit(shard=0, made_from="a")
    assert marker == {"shard": 0, "made_from": "a", "files": ["data/0.bin"]}
    assert read_marker(root, "done/0.json", made_from="a") == marker
    assert read_marker(root, "done/0.json", made_from="b") is None  # made from something else
    with pytest.raises(ValueError, match="already written"):
        unit.claim("data/0.bin")


def test_a_failed_unit_leaves_neither_marker_nor_files(tmp_path):
    root = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="disk full"):
        with MarkedUnit(root, "done/1.json", "test unit 1") as unit:
            storage.write_bytes(unit.claim("data/1.bin"), b"abc")
            raise RuntimeError("disk full")
    assert not storage.exists(storage.join(root, "data/1.bin"))
    assert read_marker(root, "done/1.json") is None


def test_a_bank_shard_that_fails_to_write_is_removed_and_not_finished(tmp_path, monkeypatch):
    bank = str(tmp_path / "bank")
    feats, values = np.zeros((4, 3), np.float16), np.ones((4, 2), np.float16)
    marker = write_shard(bank, 0, feats, values, {"f": 1})
    assert marker["files"] == ["shards/00000.features.npy", "shards/00000.values.npy"]
    assert finished_shard(bank, 0, {"f": 1}) == marker and finished_shard(bank, 0, {"f": 2}) is None
    real = storage.write_bytes

    def fail_values(uri, data):
        if uri.endswith(".values.npy"):
            raise OSError("connection reset")
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", fail_values)
    with pytest.raises(OSError, match="connection reset"):
        write_shard(bank, 1, feats, values, {"f": 1})
    assert finished_shard(bank, 1, {"f": 1}) is None
    assert not storage.exists(shard_uris(bank, 1)["features"])


def test_threaded_map_keeps_order_and_stays_a_bounded_number_of_items_ahead():
    started, lock = [], threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        return i * i

    out = []
    for value in threaded_map(work, range(100), threads=3, ahead=5):
        with lock:
            assert len(started) <= len(out) + 6  # the one being consumed + 5 ahead
        out.append(value)
    assert out == [i * i for i in range(100)]
