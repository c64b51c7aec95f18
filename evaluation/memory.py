"""The memory-bank builder: a Ray job sharded over the memory (training) images.

Each shard of ``images_per_shard`` images is built by one worker: decode the images once, then
for every augmentation epoch jitter + crop each image (generator seeded by (seed, epoch, image
index), so the result does not depend on which worker runs it), run the encoder, keep the
rare-class-favouring sample of patches, and write the shard. Workers are Ray actors that load
the encoder once; the driver only sees shard markers, so host memory is bounded by one shard per
worker whatever the bank size. Finished shards are skipped on a rerun; the manifest is written
last.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from shared import storage
from shared.backbones import load_backbone
from shared.devices import default_device
from shared.images import to_tensor
from shared.ray_init import ensure_ray
from shared.seeds import derive_generator

from .augment import augment_memory_image
from .bank import (
    FORMAT,
    MANIFEST,
    BankError,
    MemoryBank,
    check_identity,
    encoder_identity,
    finished_shard,
    write_shard,
)
from .config import MemoryConfig
from .datasets import open_dataset
from .encode import dense_batches
from .sampling import memory_patches


@dataclass(frozen=True)
class EncoderRef:
    """How any process can load the encoder: registry name, "hub" or a weight-file URI, tiny."""

    name: str
    weights: str | None
    tiny: bool = False

    def load(self, device=None):
        return load_backbone(self.name, self.weights, tiny=self.tiny, device=device)


@dataclass(frozen=True)
class DatasetRef:
    name: str
    root: str
    split: str = "train"

    def open(self):
        return open_dataset(self.name, self.root, self.split)


@dataclass(frozen=True)
class BankSpec:
    """Everything that determines a bank's content."""

    encoder: EncoderRef
    identity: dict
    dataset: DatasetRef
    indices: tuple[int, ...]  # memory images: positions in the dataset's training split
    input_size: int
    options: dict  # MemoryConfig.model_dump()
    seed: int
    task: str = "segmentation"
    num_values: int = 1  # classes (histogram length), or 1 for depth

    @property
    def patches_per_image(self) -> int | None:
        """memory_size // (N images x epochs), at least 1; None for an unbounded memory (every
        patch of every view)."""
        if self.options["size"] is None:
            return None
        return max(1, self.options["size"] // (len(self.indices) * self.options["epochs"]))

    def fingerprint(self) -> dict:
        content = {k: self.options[k] for k in ("size", "epochs", "jitter", "jitter_p",
                                                "crop_scale", "crop_ratio", "min_valid",
                                                "augmentation")}
        ids = hashlib.sha256(np.asarray(self.indices, dtype=np.int64).tobytes()).hexdigest()
        return json.loads(json.dumps({
            "encoder": self.identity, "dataset": asdict(self.dataset), "indices_sha256": ids,
            "num_images": len(self.indices), "input_size": self.input_size,
            "patches_per_image": self.patches_per_image, "options": content, "seed": self.seed,
            "task": self.task, "num_values": self.num_values,
        }))


def fingerprint_key(fingerprint: dict) -> str:
    """A short stable hash of a bank fingerprint (for bank folder names)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:10]


def image_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one (epoch, image) view; independent of the worker and of the shard."""
    return derive_generator(seed, epoch, index)


def _view(spec: BankSpec, epoch: int, index: int, sample, ignore):
    """One augmented view (image, target, valid, generator) of a decoded memory image."""
    opts = spec.options
    image, target = sample
    gen = image_generator(spec.seed, epoch, index)
    img, tgt, valid = augment_memory_image(
        to_tensor(image), torch.from_numpy(np.ascontiguousarray(target)), spec.input_size, gen,
        ignore, opts["jitter"], opts["jitter_p"], tuple(opts["crop_scale"]),
        tuple(opts["crop_ratio"]), opts["augmentation"])
    return img, tgt, valid, gen


def build_shard(spec: BankSpec, positions: Sequence[int], backbone, dataset,
                device: torch.device, threads: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, D) float16 and values (n, C) of the images at ``positions``, all epochs.

    Decoding and augmentation run in ``threads`` threads (each view has its own generator, so
    the result does not depend on the thread count); the encoder runs in batches.
    """
    opts = spec.options
    segmentation = dataset.task == "segmentation"
    ignore = dataset.ignore_index if segmentation else 0.0
    feats, values = [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        samples = list(pool.map(lambda i: dataset.load(int(i)), positions))  # decoded once
        for epoch in range(opts["epochs"]):
            views = pool.map(_view, [spec] * len(samples), [epoch] * len(samples),
                             [int(i) for i in positions], samples, [ignore] * len(samples))
            # (image, (target, valid, generator)) per view, batched through the encoder
            pairs = ((img, (tgt, valid, gen)) for img, tgt, valid, gen in views)
            for dense, chunk in dense_batches(backbone, pairs, opts["batch_size"], device):
                dense = dense.float().cpu()  # (B, h, w, D)
                per_image = spec.patches_per_image or dense.shape[1] * dense.shape[2]
                for b, (tgt, valid, gen) in enumerate(chunk):
                    f, v = memory_patches(dense[b], tgt, valid, per_image, gen,
                                          dataset.task, dataset.num_classes,
                                          dataset.ignore_index, opts["min_valid"])
                    feats.append(f.half().numpy())
                    values.append(v.numpy().astype(np.float16 if segmentation else np.float32))
    if not feats:
        return (np.zeros((0, backbone.embed_dim), np.float16),
                np.zeros((0, dataset.num_classes), np.float32))
    return np.concatenate(feats), np.concatenate(values)


class BankWorker:
    """Builds shards; loads the encoder and the dataset reader once (a Ray actor, or in-process)."""

    def __init__(self, spec: BankSpec, threads: int | None = None):
        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.spec = spec
        self.device = default_device()
        self.backbone = spec.encoder.load(device=self.device)
        check_identity(spec.identity, encoder_identity(self.backbone),
                       f"(worker load of {spec.encoder.weights})")
        self.dataset = spec.dataset.open()

    def build(self, bank_uri: str, index: int, positions: list[int]) -> dict:
        feats, values = build_shard(self.spec, positions, self.backbone, self.dataset,
                                    self.device, self.spec.options["loader_threads"])
        marker = write_shard(bank_uri, index, feats, values, self.spec.fingerprint())
        return {"index": index, "count": marker["count"], "images": len(positions)}


def _run_ray(spec: BankSpec, bank_uri: str, jobs: list[tuple[int, list[int]]],
             cfg: MemoryConfig, address: str | None) -> list[dict]:
    ray = ensure_ray(address)
    from ray.util import ActorPool

    gpus = cfg.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    workers = cfg.workers
    if workers is None:
        total = ray.cluster_resources()
        workers = int(total.get("GPU", 0) // gpus) if gpus else int(
            total.get("CPU", 1) // cfg.cpus_per_worker)
    workers = max(1, min(workers, len(jobs)))
    actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=gpus)(BankWorker)
    actors = [actor.remote(spec, cfg.cpus_per_worker) for _ in range(workers)]
    try:
        pool = ActorPool(actors)
        return list(pool.map_unordered(
            lambda a, job: a.build.remote(bank_uri, job[0], job[1]), jobs))
    finally:
        for a in actors:  # free their CPUs / GPUs for the next bank
            ray.kill(a)


def build_memory_bank(
    spec: BankSpec,
    bank_uri: str,
    cfg: MemoryConfig,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> MemoryBank:
    """Build (or finish, or reuse) the bank of ``spec`` at ``bank_uri``; returns its reader."""
    if cfg.executor == "ray" and spec.encoder.weights is None:
        raise ValueError("a random-init encoder cannot be re-created identically in Ray "
                         "workers: save it (shared.backbones.save_backbone) and pass the file")
    fingerprint = spec.fingerprint()
    manifest_uri = storage.join(bank_uri, MANIFEST)
    if storage.exists(manifest_uri):
        manifest = storage.read_json(manifest_uri)
        if manifest.get("fingerprint") == fingerprint:
            return MemoryBank(bank_uri, cfg.cache_bytes)
        raise BankError(f"{bank_uri} already holds a different memory bank (other encoder, "
                        "data or options); choose another output URI or remove it")
    indices = list(spec.indices)
    step = cfg.images_per_shard
    jobs = [(s, indices[o : o + step]) for s, o in enumerate(range(0, len(indices), step))]
    todo = [job for job in jobs if finished_shard(bank_uri, job[0], fingerprint) is None]
    start = time.perf_counter()
    if todo and cfg.executor == "local":
        worker = BankWorker(spec)
        for index, positions in todo:
            worker.build(bank_uri, index, positions)
    elif todo:
        _run_ray(spec, bank_uri, todo, cfg, address)
    seconds = time.perf_counter() - start
    markers = [finished_shard(bank_uri, index, fingerprint) for index, _ in jobs]
    missing = [index for (index, _), m in zip(jobs, markers, strict=True) if m is None]
    if missing:
        raise BankError(f"memory bank {bank_uri}: shards {missing[:10]} did not finish")
    shards = [{"index": m["index"], "count": m["count"]} for m in markers]
    total = sum(s["count"] for s in shards)
    manifest = {
        "format": FORMAT, "encoder": spec.identity, "fingerprint": fingerprint,
        "dataset": asdict(spec.dataset), "num_images": len(indices),
        "input_size": spec.input_size, "patches_per_image": spec.patches_per_image,
        "task": spec.task, "num_values": spec.num_values, "shards": shards, "total": total,
        "options": spec.options, "seed": spec.seed, "build_seconds": round(seconds, 3),
        "built_shards": len(todo), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(manifest_uri, manifest)
    log(f"memory bank {bank_uri}: {total} patches from {len(indices)} images "
        f"({len(todo)} shards built in {seconds:.1f}s)")
    return MemoryBank(bank_uri, cfg.cache_bytes)
