"""The labeling stages over the whole dataset: K-means, pairs, quality, counts.

Each reads the committed shards one at a time as Arrow/NumPy columns (no Python object per row)
and keeps only what the stage needs: the K-means subset, the global features and the class table
for the pairs, one confusion matrix, a few counters. No Ray here: ``labeling/pipeline.py`` runs
these as tasks (on a GPU when the cluster has one); the scale benchmark runs them in-process.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labeling.config import LabelConfig
from labeling.pairs import nearest_neighbours, select_pairs
from labeling.pseudo_classes import kmeans, kmeans_subset
from labeling.quality import confusion_from_entries, hungarian_miou, majority_miou
from shared.labelset import LabelSetError, LabelSetWriter
from shared.labelset_format import feature_matrix


def _strings(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def cluster(writer: LabelSetWriter, cfg: LabelConfig, device: str | None = None) -> int:
    """Fit the K pseudo-class centroids on the pooled segment features of a seeded random
    subset of at most ``kmeans_max_images`` images; returns the number of features used."""
    per_shard = _rows_by_shard(writer, "segments", "globals")  # shard -> images segmented
    total = sum(per_shard.values())
    chosen = kmeans_subset(total, cfg.kmeans_max_images, cfg.seed)  # positions in shard order
    parts, offset = [], 0
    for shard in sorted(per_shard):
        n = per_shard[shard]
        mine = chosen[(chosen >= offset) & (chosen < offset + n)] - offset
        offset += n
        if not len(mine):
            continue
        ids = _strings(writer.read_shard_table("globals", shard, ["image_id"]).column(0))
        segs = writer.read_shard_table("segments", shard, ["image_id", "feature"])
        keep = pc.is_in(segs.column("image_id"), value_set=ids.take(pa.array(mine)))
        parts.append(feature_matrix(segs.filter(keep).column("feature"), f"shard {shard}"))
    feats = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if len(feats) < cfg.classes:
        raise ValueError(
            f"K-means: {cfg.classes} pseudo-classes requested but only {len(feats)} segments "
            f"were found ({total} images segmented); lower --classes or label more images")
    cents = kmeans(feats, cfg.classes, seed=cfg.seed, niter=cfg.kmeans_niter,
                   use_gpu=device == "cuda" or None)
    writer.write_columns("centroids", class_id=np.arange(len(cents), dtype=np.int32),
                         feature=cents)
    return len(feats)


def centroids(writer: LabelSetWriter) -> np.ndarray:
    """The written centroids, float32 (K, D) in class order."""
    table = writer.read_table("centroids").sort_by("class_id")
    return feature_matrix(table.column("feature"), "centroids")


def _rows_by_shard(writer: LabelSetWriter, stage: str, table: str) -> dict[int, int]:
    return {m["shard"]: int(m.get("rows", {}).get(table, 0)) for m in writer.markers(stage)}


def pair(writer: LabelSetWriter, cfg: LabelConfig, device: str | None = None) -> int:
    """Query/positive pairs: nearest neighbours on global features, kept where a pseudo-class
    covers more than ``min_area`` of both images; returns the number of pairs written."""
    rows = _rows_by_shard(writer, "segments", "globals")
    total = sum(rows.values())
    feats: np.ndarray | None = None
    ids_parts: list[pa.Array] = []
    img, cls, area = [], [], []
    offset = 0
    for shard in sorted(rows):
        if not rows[shard]:
            continue  # every image of the shard failed: no features, no classes
        glob = writer.read_shard_table("globals", shard)
        x = feature_matrix(glob.column("feature"), f"globals of shard {shard}")
        if feats is None:
            feats = np.empty((total, x.shape[1]), np.float32)  # filled in place, shard by shard
        feats[offset:offset + len(x)] = x
        ids = _strings(glob.column("image_id"))
        ids_parts.append(ids)
        classes = writer.read_shard_table("classes", shard)
        index = pc.index_in(classes.column("image_id"), value_set=ids)
        if index.null_count:
            raise LabelSetError(f"{writer.uri}: shard {shard} has classes of images without a "
                                "global feature; the shard's label stage must be redone")
        img.append(index.to_numpy().astype(np.int64) + offset)
        cls.append(classes.column("class_id").to_numpy())
        area.append(classes.column("area").to_numpy())
        offset += len(x)
    if feats is None or total == 0:
        writer.write_columns("pairs", query_id=[], positive_id=[], class_id=[], query_area=[],
                             positive_area=[])
        return 0
    nn = nearest_neighbours(feats, cfg.neighbours, device=device, method=cfg.pair_search)
    del feats
    sel = select_pairs(nn, np.concatenate(img), np.concatenate(cls), np.concatenate(area),
                       cfg.min_area)
    ids = pa.concat_arrays(ids_parts)
    writer.write_columns(
        "pairs", query_id=ids.take(pa.array(sel["query"])),
        positive_id=ids.take(pa.array(sel["positive"])), class_id=sel["class_id"],
        query_area=sel["query_area"], positive_area=sel["positive_area"])
    return len(sel["query"])


def quality(writer: LabelSetWriter, num_classes: int) -> dict[str, float] | None:
    """Unsupervised mIoU of the pseudo-labels from the per-shard confusion tables, if any."""
    conf = np.zeros((0, num_classes), np.int64)
    images = 0
    for _, table in writer.iter_shard_tables("confusion"):
        t = table.column("true_class").to_numpy()
        if len(t) and t.max() >= conf.shape[0]:
            conf = np.vstack([conf, np.zeros((int(t.max()) + 1 - conf.shape[0], num_classes),
                                              np.int64)])
        conf += confusion_from_entries(t, table.column("pred_class").to_numpy(),
                                       table.column("pixels").to_numpy(), conf.shape[0],
                                       num_classes)
    for marker in writer.markers("labels"):
        images += int(marker.get("counts", {}).get("images_with_truth", 0))
    if not images:
        return None
    return {"hungarian_miou": round(hungarian_miou(conf), 4),
            "majority_miou": round(majority_miou(conf), 4), "images": images}


def counts(writer: LabelSetWriter, num_classes: int, num_shards: int) -> dict[str, float]:
    """The label set's counts, from the markers and single columns read shard by shard."""
    images = ok = 0
    for _, table in writer.iter_shard_tables("images", ["status"]):
        status = table.column("status")
        images += len(status)
        ok += int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    used = np.zeros(num_classes, bool)
    for _, table in writer.iter_shard_tables("classes", ["class_id"]):
        used[table.column("class_id").to_numpy()] = True
    segments = writer.stage_rows("segments").get("segments", 0)
    return {"images": images, "images_ok": ok, "images_failed": images - ok,
            "segments": segments, "segments_per_image": round(segments / max(ok, 1), 3),
            "classes_used": int(used.sum()), "pairs": writer.table_rows("pairs"),
            "shards": num_shards}
