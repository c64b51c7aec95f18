"""The whole-dataset labeling stages, in-process on a hand-made label set: K-means reads only
its subset, pairs and counts come out of the shards, quality sums the per-shard confusions."""

from __future__ import annotations

import numpy as np
import pytest

from labeling import aggregate
from labeling.config import LabelConfig
from labeling.pseudo_classes import kmeans_subset
from labeling.quality import confusion, hungarian_miou, majority_miou
from shared.labelset import LabelSetWriter

SHARDS, PER_SHARD, SEGS, DIM, K = 3, 4, 3, 8, 4


def _failed_shard(writer: LabelSetWriter, shard: int) -> None:
    """A shard none of whose images could be read: empty segments, globals and classes."""
    empty = np.zeros((0, 0), np.float32)
    with writer.shard("segments", shard) as out:
        out.write_columns("images", image_id=["bad"], uri=["/x/bad.jpg"], width=[0], height=[0],
                          status=["error"], error=["ImageDecodeError: /x/bad.jpg"], shard=[shard])
        out.write_columns("segments", image_id=[], segment_id=[], area=[], feature=empty)
        out.write_columns("globals", image_id=[], feature=empty)
    with writer.shard("labels", shard) as out:
        out.write_columns("classes", image_id=[], class_id=[], area=[])


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(0)
    writer = LabelSetWriter(str(tmp_path / "set"), {"v": 1})
    truths, preds = [], []
    for shard in range(SHARDS):
        ids = [f"s{shard}i{i}" for i in range(PER_SHARD)]
        ok = ids[:-1] if shard == 1 else ids  # one failed image in shard 1
        n = len(ok)
        with writer.shard("segments", shard) as out:
            out.write_columns("images", image_id=ids, uri=[f"/x/{i}.jpg" for i in ids],
                              width=np.full(PER_SHARD, 4), height=np.full(PER_SHARD, 4),
                              status=["ok"] * n + ["error"] * (PER_SHARD - n),
                              error=[None] * n + ["bad"] * (PER_SHARD - n),
                              shard=np.full(PER_SHARD, shard))
            out.write_columns("segments", image_id=np.repeat(np.array(ok, object), SEGS),
                              segment_id=np.tile(np.arange(SEGS), n),
                              area=np.full(n * SEGS, 1 / SEGS),
                              feature=rng.standard_normal((n * SEGS, DIM)).astype(np.float32))
            out.write_columns("globals", image_id=ok,
                              feature=rng.standard_normal((n, DIM)).astype(np.float32))
        with writer.shard("labels", shard) as out:
            out.write_columns("classes", image_id=np.repeat(np.array(ok, object), 2),
                              class_id=np.tile([0, 1 + shard], n), area=np.full(2 * n, 0.5))
            t, p = rng.integers(0, 3, (n, 5, 5)), rng.integers(0, K, (n, 5, 5))
            truths.append(t)
            preds.append(p)
            from labeling.quality import confusion_entries

            cells = [confusion_entries(a, b) for a, b in zip(t, p, strict=True)]
            out.write_columns("confusion", **dict(zip(
                ("true_class", "pred_class", "pixels"),
                [np.concatenate(c) for c in zip(*cells, strict=True)], strict=True)))
            out.count("images_with_truth", n)
    return writer, np.concatenate(truths), np.concatenate(preds)


def test_kmeans_reads_only_the_chosen_images(written):
    writer, _, _ = written
    cfg = LabelConfig(classes=K, kmeans_max_images=5, kmeans_niter=2)
    used = aggregate.cluster(writer, cfg)
    assert used == len(kmeans_subset(SHARDS * PER_SHARD - 1, 5, cfg.seed)) * SEGS == 5 * SEGS
    assert aggregate.centroids(writer).shape == (K, DIM)


def test_too_few_segments_for_k_names_the_counts(written):
    writer, _, _ = written
    with pytest.raises(ValueError, match="lower --classes"):
        aggregate.cluster(writer, LabelConfig(classes=100, kmeans_niter=2))


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_pairs_share_a_class_and_name_real_images(written, search):
    writer, _, _ = written
    cfg = LabelConfig(neighbours=2, pair_search=search)
    count = aggregate.pair(writer, cfg)
    pairs = writer.read_table("pairs").to_pylist()
    assert count == len(pairs) == (SHARDS * PER_SHARD - 1) * 2  # class 0 is in every image
    ok = {f"s{s}i{i}" for s in range(SHARDS) for i in range(PER_SHARD)} - {"s1i3"}
    for row in pairs:
        assert row["query_id"] in ok and row["positive_id"] in ok
        assert row["query_id"] != row["positive_id"] and row["class_id"] in (0, 1, 2, 3)


def test_a_shard_whose_images_all_failed_is_skipped(written):
    writer, _, _ = written
    _failed_shard(writer, SHARDS)
    cfg = LabelConfig(classes=K, neighbours=2, kmeans_niter=2)
    assert aggregate.cluster(writer, cfg) == (SHARDS * PER_SHARD - 1) * SEGS
    assert aggregate.pair(writer, cfg) == (SHARDS * PER_SHARD - 1) * 2
    assert aggregate.counts(writer, K, SHARDS + 1)["images_failed"] == 2


def test_counts_and_quality_from_the_shards(written):
    writer, truth, pred = written
    aggregate.pair(writer, LabelConfig(neighbours=2))
    counts = aggregate.counts(writer, K, SHARDS)
    assert counts == {"images": 12, "images_ok": 11, "images_failed": 1, "segments": 33,
                      "segments_per_image": 3.0, "classes_used": 4, "pairs": 22, "shards": 3}
    quality = aggregate.quality(writer, K)
    dense = confusion(truth, pred, 3, K)
    assert quality == {"hungarian_miou": round(hungarian_miou(dense), 4),
                       "majority_miou": round(majority_miou(dense), 4), "images": 11}
