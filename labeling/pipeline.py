"""Ray wiring of the labeling service: list -> segment (actors) -> K-means -> label -> pairs.

The driver holds the listing, one row per shard and the K x D centroids, nothing per image:
actors segment and label whole shards and commit them themselves (``labeling/stages.py``);
K-means and the pairs run as single tasks, on a GPU when the cluster has one
(``labeling/aggregate.py``). Each stage is resumable per shard through the label-set writer, and
each has an identity covering only what changes its output (``labeling.config.stage_identities``):
a rerun skips finished work and redoes only the stages whose inputs changed.
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

from labeling import aggregate, stages
from labeling.config import LabelConfig, stage_identities
from labeling.listing import list_images
from labeling.weights import model_weights
from shared import storage
from shared.devices import default_device
from shared.labelset import LabelSetError, LabelSetWriter, is_labelset
from shared.lease import LEASE_FILE, Lease
from shared.ray_init import ensure_ray

log = logging.getLogger(__name__)

# The global tables each later stage owns (discarded with it when its inputs change).
STAGE_TABLES = {"centroids": ("centroids",), "labels": (), "pairs": ("pairs",)}
SYNTHETIC = "_synthetic"


class SegmentActor:
    """Ray Data actor: loads the segmenter and encoder once, then segments and commits shards.

    Every shard it commits records the identity of the segmenter that made it (its marker's
    provenance; ``labelset.json`` gathers them)."""

    def __init__(self, cfg_json: str, fingerprint: dict, lease_id: str):
        self.cfg = LabelConfig.model_validate_json(cfg_json)
        self.models = stages.LabelingModels.load(self.cfg)
        made_by = {"segmenter": self.models.segmenter.identity()}
        self.writer = LabelSetWriter(self.cfg.out, fingerprint, lease_id, check=False,
                                     provenance=made_by)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _shard_summaries([
            (shard, lambda shard=shard, ids=ids, uris=uris: stages.segment_shard(
                self.models, self.writer, shard, ids, uris, self.cfg.batch_size,
                self.cfg.decode_threads))
            for shard, ids, uris in zip(batch.column("shard").to_pylist(),
                                        batch.column("image_id").to_pylist(),
                                        batch.column("uri").to_pylist(), strict=True)])


class LabelActor:
    """Ray Data actor: loads only the encoder, then pseudo-labels and commits shards."""

    def __init__(self, cfg_json: str, fingerprint: dict, lease_id: str, centroids: np.ndarray):
        import torch

        self.cfg = LabelConfig.model_validate_json(cfg_json)
        self.models = stages.LabelingModels.load(self.cfg, segmenter=False)
        self.writer = LabelSetWriter(self.cfg.out, fingerprint, lease_id, check=False)
        self.centroids = torch.from_numpy(np.asarray(centroids, np.float32))
        self.ground_truth = self.cfg.ground_truth

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _shard_summaries([
            (shard, lambda shard=shard: stages.label_shard(
                self.models, self.writer, self.centroids, shard, self.ground_truth,
                self.cfg.batch_size, self.cfg.decode_threads))
            for shard in batch.column("shard").to_pylist()])


def _shard_summaries(work: list[tuple[int, Callable[[], dict]]]) -> pa.Table:
    """Run each shard's work; a failure comes back as data (the pickled exception and the
    worker's traceback), since Ray Data keeps only a generic error of a failed batch."""
    import pickle
    import traceback

    rows = []
    for shard, fn in work:
        try:
            rows.append({**fn(), "error": b"", "trace": ""})
        except Exception as exc:
            try:
                blob = pickle.dumps(exc)
            except Exception:  # an exception that does not pickle travels as its text
                blob = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
            rows.append({"shard": shard, "images": 0, "skipped": 0, "error": blob,
                         "trace": traceback.format_exc()})
    return pa.Table.from_pylist(rows)


def _raise_failure(done: pa.Table) -> None:
    """Raise the first failure reported in a batch of shard summaries, if any."""
    import pickle

    for blob, trace in zip(done.column("error").to_pylist(), done.column("trace").to_pylist(),
                           strict=True):
        if blob:
            exc = pickle.loads(blob)
            exc.add_note(f"in a labeling worker:\n{trace}")
            raise exc


def _stage_task(name: str, cfg_json: str, fingerprint: dict, lease_id: str) -> Any:
    """A whole-dataset stage (``aggregate.cluster`` / ``aggregate.pair``) inside a Ray task."""
    cfg = LabelConfig.model_validate_json(cfg_json)
    writer = LabelSetWriter(cfg.out, fingerprint, lease_id, check=False)
    device = default_device().type
    return getattr(aggregate, name)(writer, cfg, device)


def resolve_images(cfg: LabelConfig) -> tuple[str, str | None]:
    """(image folder, ground-truth folder or None); synthetic scenes are written beside the output."""
    if cfg.images != "synthetic":
        return cfg.images, cfg.ground_truth
    from shared.synthetic import write_synthetic_dataset

    name = f"{cfg.synthetic_images}x{cfg.synthetic_size}-seed{cfg.seed}"
    root = storage.join(cfg.out, SYNTHETIC, name)
    if not storage.exists(storage.join(root, "classes.json")):
        size = (cfg.synthetic_size, cfg.synthetic_size)
        write_synthetic_dataset(root, num_train=cfg.synthetic_images, num_val=0, size=size,
                                seed=cfg.seed)
    return storage.join(root, "images", "train"), storage.join(root, "masks", "train")


def listing_digest(listing: pa.Table) -> str:
    """sha256 of the image ids, one per line, in listing order."""
    digest = hashlib.sha256()
    ids = listing.column("image_id").to_pylist()
    for start in range(0, len(ids), 65536):
        digest.update(("\n".join(ids[start:start + 65536]) + "\n").encode())
    return digest.hexdigest()


def check_out(out: str) -> None:
    """Refuse an output folder that holds something other than a label set."""
    if not storage.exists(out) or is_labelset(out):
        return
    names = {child.rstrip("/").rsplit("/", 1)[-1] for child in storage.ls(out)}
    if names <= {LEASE_FILE, SYNTHETIC}:  # empty, or only what a starting run writes first
        return
    raise LabelSetError(f"--out {out} exists and is not a label set (no labelset.json or "
                        "_progress.json in it); choose a new folder: nothing was written there")


def clear_labelset(out: str) -> None:
    """Remove a label set's files (never the lease, nor the synthetic inputs it was made from)."""
    if not is_labelset(out):
        return
    for child in storage.ls(out):
        if child.rstrip("/").rsplit("/", 1)[-1] not in (LEASE_FILE, SYNTHETIC):
            storage.remove(child, recursive=True)


class LabelingRun:
    """One labeling job: checks, listing, lease and writer; methods are the stages."""

    def __init__(self, cfg: LabelConfig, progress: bool = True, resume: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.timings: dict[str, float] = {}
        check_out(cfg.out)
        root, self.ground_truth = resolve_images(cfg)
        self.cfg = cfg = cfg.model_copy(update={"ground_truth": self.ground_truth})
        self.listing = list_images(root)
        if not self.listing.num_rows:
            raise FileNotFoundError(f"no images (jpg/png/webp/bmp/tif) found under {root}")
        self.images_root = root
        self.num_shards = -(-self.listing.num_rows // cfg.shard_size)
        self.weights = model_weights(cfg)  # by content: new weights under an old name count
        self.identities = stage_identities(cfg, listing_digest(self.listing),
                                           self.listing.num_rows, self.weights)
        try:
            self.lease = Lease(cfg.out, cfg.lease_timeout).acquire()
        except storage.StorageError as exc:
            raise storage.StorageError(f"output {cfg.out} is not writable: {exc}") from exc
        try:
            if not resume:
                clear_labelset(cfg.out)
            self.writer = LabelSetWriter(cfg.out, self.identities["segments"],
                                         self.lease.run_id)
            for stage, tables in STAGE_TABLES.items():
                if self.writer.reset_stage(stage, self.identities[stage], tables):
                    log.warning("%s: the %s stage's inputs changed; its output is redone",
                                cfg.out, stage)
        except BaseException:
            self.lease.release()
            raise

    def close(self) -> None:
        """Release the output lease."""
        self.lease.release()

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", disable=not self.progress)

    def _args(self) -> tuple:
        return self.cfg.model_dump_json(), self.identities["segments"], self.lease.run_id

    def segment(self) -> None:
        """Stage 2: segments, pooled segment features and global features, per shard."""
        size = self.cfg.shard_size
        todo = [s for s in range(self.num_shards) if not self.writer.is_done("segments", s)]
        jobs = segment_jobs(self.listing, size, todo)
        self._map(jobs, SegmentActor, self._args(), "segment",
                  sum(min(size, self.listing.num_rows - s * size) for s in todo))

    def cluster(self) -> None:
        """Stage 3: K-means over pooled segment features (a random image subset above a size)."""
        if not self.writer.has_table("centroids"):
            self._task("cluster")

    def label(self) -> None:
        """Stage 4: per-image pseudo-label maps and the classes present with their areas."""
        todo = [s for s in range(self.num_shards) if not self.writer.is_done("labels", s)]
        if not todo:
            return
        cents = aggregate.centroids(self.writer)
        wanted = set(todo)
        images = sum(int(m["rows"].get("globals", 0)) for m in self.writer.markers("segments")
                     if m["shard"] in wanted)
        jobs = label_jobs(todo)
        self._map(jobs, LabelActor, (*self._args(), cents), "label", images)

    def pair(self) -> None:
        """Stage 5: nearest neighbours on global features, kept where a class is shared."""
        if not self.writer.has_table("pairs"):
            self._task("pair")

    def finish(self) -> dict[str, Any]:
        """Stage 6: counts and identity in ``labelset.json``, written last."""
        counts = aggregate.counts(self.writer, self.cfg.classes, self.num_shards)
        quality = aggregate.quality(self.writer, self.cfg.classes)
        if quality is not None:
            counts["quality"] = quality
        meta = {
            "config": json.loads(self.cfg.model_dump_json()),
            "backbone": self.cfg.backbone, "backbone_weights": self.weights["backbone"],
            "segmenter": self.cfg.segmenter, "segmenter_weights": self.weights["segmenter"],
            "segmenter_identity": segmenter_identity(self.writer),
            "num_classes": self.cfg.classes, "images_uri": self.images_root, "counts": counts,
            "stage_identities": self.identities,
        }
        self.writer.finish(meta)
        return counts

    def _map(self, jobs: list[pa.Table], actor: type, args: tuple, desc: str, images: int
             ) -> None:
        """Run ``actor`` over one row per shard; the progress bar counts images."""
        if not jobs:
            return
        batches = _map_shards(jobs, actor, args, self.cfg)
        try:
            with self._bar(images, desc) as bar:
                for done in batches:
                    _raise_failure(done)
                    bar.update(int(sum(done.column("images").to_pylist())))
        finally:
            batches.close()  # stops the dataset's executor at once on a failure

    def _task(self, name: str) -> Any:
        import ray

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0, **_env())(_stage_task)
        return ray.get(task.remote(name, *self._args()))

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = round(time.perf_counter() - t0, 3)
        return out


def segmenter_identity(writer: LabelSetWriter) -> dict | list[dict] | None:
    """The identity of the segmenter that made the segments, from the shards' markers.

    One dict when every shard agrees (the rule: the segments stage's identity fixes the
    settings); if a resumed run's segmenter differed from the first run's in something its
    settings do not name (a library version), each identity with the shards it made, and a
    warning. None for shards committed without a recorded identity.
    """
    made: dict[str, list[int]] = {}
    for marker in writer.markers("segments"):
        identity = marker.get("provenance", {}).get("segmenter")
        if identity is not None:
            made.setdefault(json.dumps(identity, sort_keys=True), []).append(marker["shard"])
    if len(made) <= 1:
        return json.loads(next(iter(made))) if made else None
    log.warning("%s: the segments were made by %d different segmenters (see "
                "segmenter_identity in labelset.json)", writer.uri, len(made))
    return [{"identity": json.loads(k), "shards": v} for k, v in sorted(made.items())]


def segment_jobs(listing: pa.Table, shard_size: int, shards: list[int]) -> list[pa.Table]:
    """One single-row table per shard: its index, and its image ids and URIs as two lists."""
    jobs = []
    for s in shards:
        part = listing.slice(s * shard_size, shard_size)
        jobs.append(pa.table({"shard": pa.array([s], pa.int32()),
                              "image_id": _one_list(part.column("image_id")),
                              "uri": _one_list(part.column("uri"))}))
    return jobs


def label_jobs(shards: list[int]) -> list[pa.Table]:
    """One single-row table per shard to label."""
    return [pa.table({"shard": pa.array([s], pa.int32())}) for s in shards]


def _one_list(values: pa.ChunkedArray) -> pa.ListArray:
    """A column as a single list<string> value (one shard's ids or URIs in one row)."""
    flat = values.combine_chunks()
    return pa.ListArray.from_arrays(pa.array([0, len(flat)], pa.int32()), flat)


def _env() -> dict[str, Any]:
    """The driver's storage settings (endpoint, credentials, timeouts) for the workers."""
    env = storage.storage_environment()
    return {"runtime_env": {"env_vars": env}} if env else {}


def actor_pool(cfg: LabelConfig) -> tuple[Any, dict[str, Any]]:
    """The actor pool (from 1 up to the cluster's GPUs or custom resources, or --actors) and
    the resources of one actor."""
    import ray

    total = ray.cluster_resources()
    remote: dict[str, Any] = {"num_cpus": cfg.cpus_per_actor}
    limits = []
    if total.get("GPU", 0) > 0 and cfg.gpus_per_actor > 0:
        remote["num_gpus"] = cfg.gpus_per_actor
        limits.append(total["GPU"] / cfg.gpus_per_actor)
    if cfg.actor_resources:
        remote["resources"] = dict(cfg.actor_resources)
        limits += [total.get(k, 0) / v for k, v in cfg.actor_resources.items() if v > 0]
    if cfg.actors is not None:
        return ray.data.ActorPoolStrategy(size=cfg.actors), remote
    top = max(1, int(min(limits))) if limits else 1
    if top == 1:
        return ray.data.ActorPoolStrategy(size=1), remote
    return ray.data.ActorPoolStrategy(min_size=1, max_size=top), remote


def _map_shards(jobs: list[pa.Table], actor: type, args: tuple, cfg: LabelConfig
                ) -> Iterator[pa.Table]:
    """Stream the actors' per-shard summaries; one block per shard spreads them over the pool."""
    import ray

    strategy, remote = actor_pool(cfg)
    # from_blocks: one block per shard with its metadata computed here (from_arrow runs one
    # metadata task per block before the first shard is dispatched: 5,000 tasks at ImageNet)
    ds = ray.data.from_blocks(jobs)
    ds = ds.map_batches(actor, fn_constructor_args=args, batch_size=1, batch_format="pyarrow",
                        compute=strategy, **remote, **_env())
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def run_labeling(cfg: LabelConfig, address: str | None = None, progress: bool = True,
                 resume: bool = True) -> dict:
    """Run (or resume) every stage of a labeling job; returns the summary."""
    run = LabelingRun(cfg, progress, resume)  # input and output checks before any model is loaded
    try:
        ensure_ray(address)
        for name in ("segment", "cluster", "label", "pair"):
            run.timed(name, getattr(run, name))
        counts = run.timed("finish", run.finish)
    finally:
        run.close()
    return {"out": cfg.out, **counts, "seconds": run.timings}
