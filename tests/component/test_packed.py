"""Packed training input: bit-identical to prepare, an exact deterministic shuffle, resumable
and reused builds, local disk and s3://, and a build by Ray tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import storage
from training import packed
from training.config import TrainConfig
from training.episodes import EpisodeError, PairEpisodes
from training.loop import Runtime, prepare, training_input
from training.packed import (
    PackedImages,
    PackError,
    build_pack,
    pack_identity,
    pack_plan,
    pack_uri,
    packed_episodes,
    window_order,
)


def assert_same_items(expected: PairEpisodes, got) -> None:
    assert len(got) == len(expected)
    for index in range(len(expected)):
        a, b = expected[index], got[index]
        assert a.keys() == b.keys()
        for key in a:
            assert same(a[key], b[key]), (index, key)


def same(prepared: torch.Tensor, packed: torch.Tensor) -> bool:
    """Equal values; images of the same dtype, label maps narrower than prepare's int64."""
    if prepared.dtype == torch.int64:
        assert packed.dtype in (torch.uint8, torch.int32)
        return torch.equal(prepared, packed.long())
    return prepared.dtype == packed.dtype and torch.equal(prepared, packed)


def test_packed_items_equal_prepare_bit_for_bit(storage_root, synthetic_labelset):
    uri = synthetic_labelset(storage_root, num_images=10, size=(48, 64))
    source = PairEpisodes(uri, resize=32, crop=28)
    # window 1 and 3 images per shard: most positives lie in a shard not held (ranged reads)
    data = packed_episodes(source, shard_size=3, window=1, progress=False)
    assert data.images.uri.startswith(storage.join(uri, "packed", "r32-c28-s3-"))
    assert data.images.num_shards == 4 and data.images.local == (storage_root[:5] != "s3://")
    assert_same_items(source, data)
    everything = list(range(len(data)))[::-1]
    expected, got = source.batch(everything), data.batch(everything)  # a whole micro-batch
    assert all(same(expected[k], got[k]) for k in expected)
    assert got["query_labels"].dtype == torch.uint8  # every shard stores uint8 maps here
    summary = data.images.meta["shards"][0]
    assert summary["labels"]["dtype"] == "|u1" and summary["images"]["shape"] == [3, 3, 28, 28]
    blob = storage.read_bytes(data.images.blob_uri(0, "images"))
    assert len(blob) == summary["images"]["offset"] + 3 * 3 * 28 * 28  # raw rows, no compression


def test_wide_label_values_are_kept_as_uint16_and_checked_per_run(tmp_path, monkeypatch,
                                                                 synthetic_labelset):
    uri = synthetic_labelset(str(tmp_path), num_images=6)
    source = PairEpisodes(uri, resize=32, crop=28, ignore_index=300)
    load = PairEpisodes.load

    def with_ignored_pixels(self, image_id):
        image, labels = load(self, image_id)
        labels = labels.copy()
        labels[20:28, 20:28] = 300  # an ignore value beyond uint8, inside the crop
        return image, labels

    monkeypatch.setattr(PairEpisodes, "load", with_ignored_pixels)
    data = packed_episodes(source, shard_size=4, progress=False)
    assert data.images.meta["shards"][0]["labels"]["dtype"] == "<u2"
    assert_same_items(source, data)
    strict = PairEpisodes(uri, resize=32, crop=28)  # no ignore_index: 300 is not a class
    with pytest.raises(EpisodeError, match="holds class 300, but the set has"):
        packed_episodes(strict, shard_size=4, progress=False)


def test_window_order_is_an_exact_deterministic_permutation():
    rng = np.random.default_rng(0)
    item_shard = rng.integers(0, 10, size=500)
    order = window_order(item_shard, 10, seed=3, epoch=1, window=3)
    assert sorted(order.tolist()) == list(range(500))
    assert torch.equal(order, window_order(item_shard, 10, seed=3, epoch=1, window=3))
    assert not torch.equal(order, window_order(item_shard, 10, seed=3, epoch=2, window=3))
    assert not torch.equal(order, window_order(item_shard, 10, seed=4, epoch=1, window=3))
    # the windows follow one another: each run of items comes from at most `window` shards
    blocks, position = [], 0
    for shards in (3, 3, 3, 1):
        shard_set = set()
        while len(shard_set | {int(item_shard[order[position]])}) <= shards:
            shard_set.add(int(item_shard[order[position]]))
            position += 1
            if position == 500:
                break
        blocks.append(shard_set)
    assert position == 500 and [len(b) for b in blocks] == [3, 3, 3, 1]


def test_dataset_order_follows_the_query_shards(tmp_path, synthetic_labelset):
    uri = synthetic_labelset(str(tmp_path), num_images=12)
    data = packed_episodes(PairEpisodes(uri, 32, 28), shard_size=4, window=2, progress=False)
    order = data.order(0, 5)
    assert sorted(order.tolist()) == list(range(12)) and torch.equal(order, data.order(0, 5))
    first = {data.images.rows[data.query_ids[i]][0] for i in order[:8].tolist()}
    assert len(first) == 2  # 8 pairs = the queries of the first window of 2 shards of 4


class Interrupted(RuntimeError):
    pass


def test_a_half_built_pack_resumes_to_the_same_bytes(tmp_path, monkeypatch, synthetic_labelset):
    uri = synthetic_labelset(str(tmp_path), num_images=10)
    source = PairEpisodes(uri, 32, 28)
    write, written = packed.write_shard, []

    def crash_at_2(pack, shard, ids, src):
        if shard == 2:
            raise Interrupted("killed while writing shard 2")
        written.append(shard)
        return write(pack, shard, ids, src)

    monkeypatch.setattr(packed, "write_shard", crash_at_2)
    with pytest.raises(Interrupted):
        packed_episodes(source, shard_size=3, progress=False)
    plan = pack_plan(source, 3)
    half = pack_uri(uri, pack_identity(source, plan, 3))
    assert written == [0, 1] and not storage.exists(storage.join(half, "pack.json"))
    with pytest.raises(PackError, match="pack.json is missing"):
        PackedImages(half)

    def count(pack, shard, ids, src):
        written.append(shard)
        return write(pack, shard, ids, src)

    monkeypatch.setattr(packed, "write_shard", count)
    data = packed_episodes(source, shard_size=3, progress=False)
    assert written == [0, 1, 2, 3]  # only the missing shards were prepared
    whole = str(tmp_path / "whole")
    build_pack(source, whole, plan, pack_identity(source, plan, 3), progress=False)
    for name in ("images", "labels"):
        for shard in range(4):
            assert storage.read_bytes(data.images.blob_uri(shard, name)) == storage.read_bytes(
                storage.join(whole, "shards", f"shard-{shard:05d}.{name}.npy"))
    assert_same_items(source, data)


def test_a_foreign_folder_is_refused(tmp_path, synthetic_labelset):
    uri = synthetic_labelset(str(tmp_path), num_images=6)
    source = PairEpisodes(uri, 32, 28)
    plan = pack_plan(source, 4)
    target = str(tmp_path / "pack")
    storage.write_json(storage.join(target, "_identity.json"), {"something": "else"})
    with pytest.raises(PackError, match=f"{target} holds a packed input of another"):
        build_pack(source, target, plan, pack_identity(source, plan, 4), progress=False)


def opened(cfg: TrainConfig, rt: Runtime | None = None):
    """The dataset a run of ``cfg`` reads (built first when it is missing)."""
    rt = rt or Runtime()
    data, _ = prepare(cfg, rt)
    return training_input(cfg, data, rt)


def test_a_second_run_reuses_the_pack_without_rebuilding(tmp_path, monkeypatch,
                                                         synthetic_labelset):
    uri = synthetic_labelset(str(tmp_path), num_images=16)
    written = []
    write = packed.write_shard
    monkeypatch.setattr(packed, "write_shard", lambda *a: written.append(a[1]) or write(*a))
    root = str(tmp_path / "packs")  # a shared root, as for many encoders of one label set
    cfg = TrainConfig(labels=uri, out=str(tmp_path / "a"), tiny=True, weights=None, resize=32,
                      crop=28, batch_size=8, micro_batch_size=8, packed_root=root,
                      packed_shard_size=8)
    first = opened(cfg)
    assert written == [0, 1] and first.images.uri.startswith(root)
    mtimes = {u: storage.url_to_fs(u)[0].modified(u) for u in storage.find(root)}
    second = opened(cfg.model_copy(update={"out": str(tmp_path / "b"),
                                               "backbone": "vitb14"}))
    assert written == [0, 1] and second.images.uri == first.images.uri
    assert {u: storage.url_to_fs(u)[0].modified(u) for u in storage.find(root)} == mtimes
    other = opened(cfg.model_copy(update={"crop": 24}))  # new geometry: new pack
    assert written == [0, 1, 0, 1] and other.images.uri != first.images.uri
    plain = opened(cfg.model_copy(update={"input": "prepare"}))
    assert isinstance(plain, PairEpisodes)
    with pytest.raises(PackError, match="is not built"):
        opened(cfg.model_copy(update={"packed_root": str(tmp_path / "empty"),
                                       "micro_batch_size": 4, "num_distractors": 3}),
                Runtime(rank=1, world_size=2))


def test_building_with_ray_needs_ray_initialised(tmp_path, synthetic_labelset):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")
    source = PairEpisodes(synthetic_labelset(str(tmp_path), num_images=6), 32, 28)
    with pytest.raises(PackError, match="Ray is not initialised"):
        packed_episodes(source, shard_size=4, use_ray=True, progress=False)


@pytest.mark.integration
def test_ray_tasks_build_the_same_pack_in_s3(ray_local, s3_bucket, synthetic_labelset):
    uri = synthetic_labelset(f"{s3_bucket}/data", num_images=10)
    source = PairEpisodes(uri, 32, 28)
    data = packed_episodes(source, shard_size=3, use_ray=True, progress=False)
    assert data.images.num_shards == 4 and not data.images.local
    assert_same_items(source, data)
