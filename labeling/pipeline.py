"""Ray wiring of the labeling service: list -> segment (GPU actors) -> K-means -> label -> pairs.

Each stage is resumable per shard through the label-set writer: a rerun skips what is done.
The math lives in ``labeling/stages.py``, ``pseudo_classes.py`` and ``pairs.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from labeling import stages
from labeling.config import LabelConfig
from labeling.pairs import nearest_neighbours, select_pairs
from labeling.pseudo_classes import kmeans
from shared import storage
from shared.labelset import LabelSetError, LabelSetWriter

log = logging.getLogger(__name__)

# Everything that changes the labels; operational knobs (actors, batch size, out) are left out.
FINGERPRINT_FIELDS = ("images", "backbone", "weights", "tiny", "segmenter", "diffcut",
                      "feature_size", "classes", "kmeans_max_images", "kmeans_niter", "neighbours",
                      "min_area", "shard_size", "synthetic_images", "synthetic_size", "seed")


class SegmentActor:
    """Ray Data actor: loads the segmenter and encoder once, then segments batches."""

    def __init__(self, cfg_json: str):
        self.models = stages.LabelingModels.load(LabelConfig.model_validate_json(cfg_json))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return stages.segment_batch(self.models, batch)


class LabelActor:
    """Ray Data actor: pseudo-label maps from encoder patches, segments and the centroids."""

    def __init__(self, cfg_json: str, centroids: np.ndarray):
        self.models = stages.LabelingModels.load(LabelConfig.model_validate_json(cfg_json))
        self.centroids = torch.from_numpy(np.asarray(centroids, np.float32))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return stages.label_batch(self.models, self.centroids, batch)


def resolve_images(cfg: LabelConfig) -> tuple[str, str | None]:
    """(image folder, ground-truth folder or None); synthetic scenes are written beside the output."""
    if cfg.images != "synthetic":
        return cfg.images, cfg.ground_truth
    from shared.synthetic import write_synthetic_dataset

    root = storage.join(cfg.out, "_synthetic")
    if not storage.exists(storage.join(root, "classes.json")):
        size = (cfg.synthetic_size, cfg.synthetic_size)
        write_synthetic_dataset(root, num_train=cfg.synthetic_images, num_val=0, size=size,
                                seed=cfg.seed)
    return storage.join(root, "images", "train"), storage.join(root, "masks", "train")


def fingerprint(cfg: LabelConfig, listing: list[tuple[str, str]]) -> dict[str, Any]:
    """Identity of a label set: the label-relevant config plus a hash of the image listing."""
    digest = hashlib.sha256("\n".join(i for i, _ in listing).encode()).hexdigest()
    data = cfg.model_dump(mode="json", include=set(FINGERPRINT_FIELDS))
    return {"config": data, "num_images": len(listing), "listing_sha256": digest}


def _gpus_per_actor(cfg: LabelConfig) -> float:
    import ray

    return cfg.gpus_per_actor if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _map(rows: list[dict], actor: type, args: tuple, cfg: LabelConfig) -> Iterator[dict]:
    """Stream batches of ``actor`` outputs; decoding runs in CPU tasks beside the actor pool."""
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))
    # distinct resources keep decoding in separate CPU tasks, overlapped with the actors
    ds = ds.map_batches(stages.decode_batch, batch_size=cfg.batch_size, num_cpus=0.5,
                        batch_format="numpy")
    ds = ds.map_batches(actor, fn_constructor_args=args, batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=1,
                        num_gpus=_gpus_per_actor(cfg), batch_format="numpy")
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _by_shard(batches: Iterator[dict], expected: dict[int, int],
              write: Callable[[int, list[dict]], None], progress) -> None:
    """Group streamed rows by shard; write each shard as soon as all its rows have arrived."""
    pending: dict[int, list[dict]] = {}
    for batch in batches:
        keys = list(batch)
        for i in range(len(batch["image_id"])):
            row = {k: batch[k][i] for k in keys}
            shard = int(row["shard"])
            pending.setdefault(shard, []).append(row)
            progress.update(1)
            if len(pending[shard]) == expected[shard]:
                write(shard, pending.pop(shard))
    if pending:
        raise RuntimeError(f"labeling: shards {sorted(pending)} did not receive all their images")


class LabelingRun:
    """One labeling job: its config, listing, shards and writer; methods are the stages."""

    def __init__(self, cfg: LabelConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.timings: dict[str, float] = {}
        root, self.ground_truth = resolve_images(cfg)
        self.listing = stages.list_images(root)
        if not self.listing:
            raise FileNotFoundError(f"no images (jpg/png/webp/bmp/tif) found under {root}")
        self.images_root = root
        size = cfg.shard_size
        self.shards = [self.listing[i:i + size] for i in range(0, len(self.listing), size)]
        try:
            self.writer = LabelSetWriter(cfg.out, fingerprint(cfg, self.listing))
        except LabelSetError:
            raise
        except Exception as exc:
            raise storage.StorageError(f"output {cfg.out} is not writable: {exc}") from exc

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", disable=not self.progress)

    def segment(self) -> None:
        """Stage 2: segments, pooled segment features and global features, per shard."""
        todo = [s for s in range(len(self.shards)) if not self.writer.is_done("segments", s)]
        if not todo:
            return
        rows = [{"image_id": iid, "uri": uri, "shard": s}
                for s in todo for iid, uri in self.shards[s]]
        expected = {s: len(self.shards[s]) for s in todo}
        cfg_json = self.cfg.model_dump_json()
        with self._bar(len(rows), "segment") as bar:
            _by_shard(_map(rows, SegmentActor, (cfg_json,), self.cfg), expected,
                      self._write_segments, bar)

    def _in_listing_order(self, shard: int, rows: list[dict]) -> list[dict]:
        """Rows arrive in any order from the actors; tables are written in listing order."""
        order = {iid: k for k, (iid, _) in enumerate(self.shards[shard])}
        return sorted(rows, key=lambda r: order[str(r["image_id"])])

    def _write_segments(self, shard: int, rows: list[dict]) -> None:
        rows = self._in_listing_order(shard, rows)
        ok = [r for r in rows if r["status"] == "ok"]
        images = pa.table({
            "image_id": [str(r["image_id"]) for r in rows],
            "uri": [str(r["uri"]) for r in rows],
            "width": pa.array([int(r["width"]) for r in rows], pa.int32()),
            "height": pa.array([int(r["height"]) for r in rows], pa.int32()),
            "status": [str(r["status"]) for r in rows],
            "error": [str(r["error"]) or None for r in rows],
            "shard": pa.array([shard] * len(rows), pa.int32()),
        })
        seg_ids, seg_img, seg_area, seg_feat = [], [], [], []
        for r in ok:
            n = int(r["num_segments"])
            feats = np.frombuffer(r["pooled"], np.float32).reshape(n, -1)
            area = np.frombuffer(r["areas"], np.float32)
            seg_img += [str(r["image_id"])] * n
            seg_ids += list(range(n))
            seg_area += area.tolist()
            seg_feat += [f for f in feats]
        dim = int(ok[0]["global"].shape[0]) if ok else 0
        segments = pa.table({
            "image_id": pa.array(seg_img, pa.string()),
            "segment_id": pa.array(seg_ids, pa.int32()),
            "area": pa.array(seg_area, pa.float32()),
            "feature": pa.array([f.tolist() for f in seg_feat], pa.list_(pa.float32())),
        })
        globs = pa.table({
            "image_id": pa.array([str(r["image_id"]) for r in ok], pa.string()),
            "feature": pa.array([np.asarray(r["global"], np.float32).tolist() for r in ok],
                                pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())),
        })
        with self.writer.shard("segments", shard) as out:
            out.write_table("images", images)
            out.write_table("segments", segments)
            out.write_table("globals", globs)
            out.write_maps_png("segments", {str(r["image_id"]): bytes(r["segments_png"]) for r in ok})

    def cluster(self) -> None:
        """Stage 3: K-means over pooled segment features (a random image subset above a size)."""
        if self.writer.has_table("centroids"):
            return
        segs = self.writer.read_table("segments")
        ids = np.asarray(segs.column("image_id").to_pylist())
        feats = np.asarray(segs.column("feature").to_pylist(), np.float32)
        uniq = np.unique(ids)
        if len(uniq) > self.cfg.kmeans_max_images:
            rng = np.random.default_rng(self.cfg.seed)
            keep = rng.choice(uniq, self.cfg.kmeans_max_images, replace=False)
            feats = feats[np.isin(ids, keep)]
        if len(feats) < self.cfg.classes:
            raise ValueError(
                f"K-means: {self.cfg.classes} pseudo-classes requested but only {len(feats)} "
                f"segments were found; lower --classes or label more images")
        cents = kmeans(feats, self.cfg.classes, seed=self.cfg.seed, niter=self.cfg.kmeans_niter)
        self.writer.write_table("centroids", pa.table({
            "class_id": pa.array(np.arange(len(cents)), pa.int32()),
            "feature": pa.array(cents.tolist(), pa.list_(pa.float32(), cents.shape[1])),
        }))

    def label(self) -> None:
        """Stage 4: per-image pseudo-label maps and the classes present with their areas."""
        todo = [s for s in range(len(self.shards)) if not self.writer.is_done("labels", s)]
        if not todo:
            return
        cents = np.asarray(self.writer.read_table("centroids").column("feature").to_pylist(),
                           np.float32)
        rows, expected = [], {}
        for s in todo:
            images = self.writer.read_shard_table("images", s)
            ok = [(r["image_id"], r["uri"]) for r in images.to_pylist() if r["status"] == "ok"]
            segpng = self.writer.read_maps_png("segments", s)
            rows += [{"image_id": i, "uri": u, "shard": s, "segments_png": segpng[i]} for i, u in ok]
            expected[s] = len(ok)
        for s in [s for s in todo if expected[s] == 0]:
            self._write_labels(s, [])
        expected = {s: n for s, n in expected.items() if n}
        if not rows:
            return
        with self._bar(len(rows), "label") as bar:
            _by_shard(_map(rows, LabelActor, (self.cfg.model_dump_json(), cents), self.cfg),
                      expected, self._write_labels, bar)

    def _write_labels(self, shard: int, rows: list[dict]) -> None:
        rows = self._in_listing_order(shard, rows)
        cls_img, cls_id, cls_area = [], [], []
        for r in rows:
            ids = np.frombuffer(r["class_ids"], np.int32)
            cls_img += [str(r["image_id"])] * len(ids)
            cls_id += ids.tolist()
            cls_area += np.frombuffer(r["class_areas"], np.float32).tolist()
        classes = pa.table({
            "image_id": pa.array(cls_img, pa.string()),
            "class_id": pa.array(cls_id, pa.int32()),
            "area": pa.array(cls_area, pa.float32()),
        })
        with self.writer.shard("labels", shard) as out:
            out.write_table("classes", classes)
            out.write_maps_png("labels", {str(r["image_id"]): bytes(r["labels_png"]) for r in rows})

    def pair(self) -> None:
        """Stage 5: 5 nearest neighbours on global features, kept where a class is shared."""
        if self.writer.has_table("pairs"):
            return
        globs = self.writer.read_table("globals")
        ids = globs.column("image_id").to_pylist()
        feats = np.asarray(globs.column("feature").to_pylist(), np.float32)
        classes = self.writer.read_table("classes")
        areas: dict[str, dict[int, float]] = {i: {} for i in ids}
        for r in classes.to_pylist():
            areas[r["image_id"]][r["class_id"]] = r["area"]
        nn = nearest_neighbours(feats, self.cfg.neighbours)
        rows = select_pairs(ids, nn, [areas[i] for i in ids], self.cfg.min_area)
        cols = list(zip(*rows, strict=True)) if rows else [[]] * 6
        self.writer.write_table("pairs", pa.table({
            "query_id": pa.array(cols[0], pa.string()),
            "positive_id": pa.array(cols[1], pa.string()),
            "class_id": pa.array(cols[2], pa.int32()),
            "query_area": pa.array(cols[3], pa.float32()),
            "positive_area": pa.array(cols[4], pa.float32()),
            "rank": pa.array(cols[5], pa.int32()),
        }))

    def finish(self) -> dict[str, Any]:
        """Stage 6: counts and identity in ``labelset.json``, written last."""
        images = self.writer.read_table("images")
        status = images.column("status").to_pylist()
        segs = self.writer.read_table("segments")
        classes = self.writer.read_table("classes")
        pairs = self.writer.read_table("pairs")
        ok = status.count("ok")
        counts = {
            "images": len(status), "images_ok": ok, "images_failed": len(status) - ok,
            "segments": segs.num_rows,
            "segments_per_image": round(segs.num_rows / max(ok, 1), 3),
            "classes_used": len(set(classes.column("class_id").to_pylist())),
            "pairs": pairs.num_rows, "shards": len(self.shards),
        }
        quality = self.quality()
        if quality is not None:
            counts["quality"] = quality
        meta = {
            "config": json.loads(self.cfg.model_dump_json()),
            "backbone": self.cfg.backbone, "segmenter": self.cfg.segmenter,
            "num_classes": self.cfg.classes, "images_uri": self.images_root, "counts": counts,
        }
        self.writer.finish(meta)
        return counts

    def quality(self) -> dict[str, float] | None:
        """Unsupervised mIoU of the pseudo-labels against ground-truth masks, when there are any."""
        if self.ground_truth is None:
            return None
        from labeling.quality import confusion, hungarian_miou, majority_miou
        from shared.images import decode_png

        pairs = []
        for shard in range(len(self.shards)):
            for iid, pred in self.writer.read_maps("labels", shard).items():
                uri = storage.join(self.ground_truth, iid + ".png")
                pairs.append((decode_png(storage.read_bytes(uri), name=uri), pred))
        if not pairs:
            return None
        num_true = int(max(t[t != 255].max(initial=0) for t, _ in pairs)) + 1
        conf = sum(confusion(t, p, num_true, self.cfg.classes) for t, p in pairs)
        return {"hungarian_miou": round(hungarian_miou(conf), 4),
                "majority_miou": round(majority_miou(conf), 4), "images": len(pairs)}

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t0, 3)
        return out


def run_labeling(cfg: LabelConfig, address: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) every stage of a labeling job; returns the summary."""
    import ray

    run = LabelingRun(cfg, progress)  # input and output checks before any model is loaded
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, include_dashboard=False)
    for name in ("segment", "cluster", "label", "pair"):
        run.timed(name, getattr(run, name))
    counts = run.timed("finish", run.finish)
    return {"out": cfg.out, **counts, "seconds": run.timings}
