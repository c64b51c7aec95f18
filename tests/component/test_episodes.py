"""Training data: a small label set built from synthetic scenes, read locally and from s3://."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from shared.images import load_image, train_geometry
from shared.labelset import LabelSetError, LabelSetWriter
from shared.synthetic import CLASS_NAMES, make_scene
from training import episodes
from training.episodes import (
    EpisodeError,
    PairEpisodes,
    TaskBatches,
    epoch_order,
    sample_support,
    steps_per_epoch,
    support_generator,
)


def test_items_are_the_joint_training_geometry(storage_root, synthetic_labelset):
    uri = synthetic_labelset(storage_root)
    data = PairEpisodes(uri, resize=32, crop=28)
    assert len(data) == 8 and data.num_classes == len(CLASS_NAMES)
    item = data[2]
    assert item["query"].shape == (3, 28, 28) and item["query"].dtype == torch.uint8
    assert item["query_labels"].shape == (28, 28) and item["query_labels"].dtype == torch.int64
    # independent recomputation from the source image and the stored pseudo-label map
    image = torch.tensor(load_image(data.image_uris["img003"])).permute(2, 0, 1)
    labels = torch.from_numpy(data.labelset.label_map("img003").astype(np.int64))
    crop, crop_labels = train_geometry(image, labels, 32, 28)
    assert torch.equal(item["positive"], crop)
    assert torch.equal(item["positive_labels"], crop_labels)
    _, mask = make_scene(103, (64, 48))
    assert set(crop_labels.unique().tolist()) <= set(np.unique(mask).tolist())


def test_cache_returns_the_same_tensors_without_rereading(tmp_path, monkeypatch, synthetic_labelset):
    uri = synthetic_labelset(str(tmp_path))
    cached = PairEpisodes(uri, resize=32, crop=28, cache=True)
    plain = PairEpisodes(uri, resize=32, crop=28)
    first, expected = cached[0], plain[0]
    calls = []
    monkeypatch.setattr(episodes, "load_image", lambda u: calls.append(u))
    again = cached[0]
    assert calls == []
    for key in first:
        assert torch.equal(first[key], again[key])
        assert torch.equal(first[key], expected[key])


def test_missing_and_incomplete_label_sets_are_named(tmp_path):
    with pytest.raises(LabelSetError, match="labelset.json"):
        PairEpisodes(str(tmp_path / "nowhere"))
    incomplete = str(tmp_path / "incomplete")
    writer = LabelSetWriter(incomplete, {"test": 1})
    with writer.shard("label", 0) as shard:
        shard.write_table("images", pa.table({
            "image_id": ["a"], "uri": ["x.jpg"], "width": [8], "height": [8], "status": ["ok"],
            "error": pa.array([None], pa.string())}))
    with pytest.raises(LabelSetError, match=f"{incomplete}.*labelset.json"):
        PairEpisodes(incomplete)


def test_pair_naming_a_missing_image_is_an_error(tmp_path, synthetic_labelset):
    uri = synthetic_labelset(str(tmp_path), extra_pairs=[("img001", "ghost")])
    with pytest.raises(EpisodeError, match="pair 8 names positive image 'ghost'"):
        PairEpisodes(uri)


def test_support_sets_draw_distinct_other_positives():
    gen = torch.Generator().manual_seed(0)
    support = sample_support(10, 7, gen)
    assert support.shape == (10, 8)
    for i, row in enumerate(support.tolist()):
        assert row[0] == i
        assert len(set(row)) == 8 and i not in row[1:]
        assert all(0 <= j < 10 for j in row)
    again = sample_support(10, 7, torch.Generator().manual_seed(0))
    other = sample_support(10, 7, torch.Generator().manual_seed(1))
    assert torch.equal(support, again) and not torch.equal(support, other)
    # with exactly 8, every other positive is a distractor
    full = sample_support(8, 7, gen)
    assert all(sorted(r) == list(range(8)) for r in full.tolist())


def test_batch_smaller_than_distractors_plus_one_is_refused():
    with pytest.raises(EpisodeError, match="at least 8"):
        sample_support(7, 7, torch.Generator())


def test_data_order_depends_only_on_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=1)
    assert sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, epoch_order(50, seed=3, epoch=1))
    assert not torch.equal(a, epoch_order(50, seed=3, epoch=2))
    assert not torch.equal(a, epoch_order(50, seed=4, epoch=1))
    g1, g2 = support_generator(0, 1, 2, 3, 4), support_generator(0, 1, 2, 3, 4)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    with pytest.raises(EpisodeError, match="fewer than one effective batch"):
        steps_per_epoch(7, 8)


def test_task_batches_split_each_step_across_ranks_and_resume_exactly():
    n, batch, micro, world = 70, 32, 8, 2  # 2 steps per epoch, 2 micro-batches per rank per step
    total = 5
    per_rank = [list(TaskBatches(n, 0, batch, micro, world, r, total)) for r in range(world)]
    assert all(len(b) == total * 2 for b in per_rank)
    for step in range(total):
        epoch = step // 2
        seen = [i for r in range(world) for m in per_rank[r][2 * step : 2 * step + 2] for i in m]
        order = epoch_order(n, 0, epoch).tolist()
        begin = (step % 2) * batch
        assert sorted(seen) == sorted(order[begin : begin + batch])
        assert len(set(seen)) == batch
    resumed = TaskBatches(n, 0, batch, micro, world, 1, total, start_step=3)
    assert list(resumed) == per_rank[1][6:]
    assert resumed.position(0) == (1, 3, 0)


def test_task_batches_follow_a_given_order_and_batched_builds_micro_batches(tmp_path,
                                                                          synthetic_labelset):
    reverse = lambda seed, epoch: torch.arange(16).flip(0).roll(epoch)  # noqa: E731
    batches = list(TaskBatches(16, 0, 8, 4, 1, 0, total_steps=4, order=reverse))
    assert batches[:2] == [[15, 14, 13, 12], [11, 10, 9, 8]]
    assert batches[4] == reverse(0, 1)[:4].tolist()  # epoch 1 = global step 2
    data = PairEpisodes(synthetic_labelset(str(tmp_path)), resize=32, crop=28)
    batch = episodes.Batched(data)[[3, 1]]
    for key, value in batch.items():
        assert torch.equal(value, torch.stack([data[3][key], data[1][key]]))
