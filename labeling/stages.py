"""Per-shard work of the labeling stages: read + decode, segment + pool, pseudo-label, write.

Each function does one shard end to end inside a worker and commits it through the label-set
writer, so no per-image data ever reaches the driver. Reads and decodes run in a thread pool a
few images ahead of the model work. No Ray here: ``labeling/pipeline.py`` wires these into actors.

Faults: a failure of the input (unreadable bytes, an image too small or too large, an image the
models fail on while the rest of its shard succeeds) is recorded against that image by URI and the
shard goes on; a failure of the environment (credentials, network, throttling, disk) raises
:class:`ShardEnvironmentError`, so the shard is not committed and a rerun retries it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from labeling.config import LabelConfig
from labeling.pseudo_classes import class_areas, pool_segment_features, pseudo_label_map
from labeling.quality import confusion_entries
from shared import storage
from shared.devices import default_device
from shared.images import decode_image, decode_png, encode_png, resize_image
from shared.labelset import LabelSetWriter
from shared.seeds import derive_seed

log = logging.getLogger(__name__)
# keys of the random streams of a run's random-init models (shared.seeds.derive_seed)
SEGMENTER_STREAM, BACKBONE_STREAM = 0, 1


class ShardEnvironmentError(RuntimeError):
    """A shard failed for a reason that is not its images' fault; a rerun retries it."""


@dataclass
class Failure:
    """Why one image could not be labelled (recorded in the images table)."""

    error: str


def _input_failure(uri: str, exc: BaseException) -> Failure:
    text = str(exc)
    return Failure(f"{type(exc).__name__}: {text if uri in text else f'{uri}: {text}'}")


def _environment(uri: str, exc: BaseException) -> ShardEnvironmentError:
    return ShardEnvironmentError(f"{uri}: {type(exc).__name__}: {exc}")


@dataclass
class LabelingModels:
    """The encoder (and, for the segment stage, the segmenter) of one worker, loaded once."""

    segmenter: Any
    backbone: torch.nn.Module
    device: torch.device
    feature_size: int

    @classmethod
    def load(cls, cfg: LabelConfig, device: str | None = None, segmenter: bool = True
             ) -> LabelingModels:
        from shared.backbones import load_backbone

        dev = default_device(device)
        # random-init (tiny) models must be the same in every actor of every stage, whether or
        # not it builds the segmenter: each model draws from a generator seeded for it alone
        seg = None
        if segmenter:
            torch.manual_seed(derive_seed(cfg.seed, SEGMENTER_STREAM))
            seg = build_segmenter(cfg, dev)
        torch.manual_seed(derive_seed(cfg.seed, BACKBONE_STREAM))
        backbone = load_backbone(cfg.backbone, weights=cfg.weights, tiny=cfg.tiny, device=dev)
        backbone.eval()
        return cls(seg, backbone, dev, cfg.feature_size)

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (B, g, g, D) and global (B, D) features of whole images resized to feature_size."""
        size = (self.feature_size, self.feature_size)
        batch = torch.stack([
            resize_image(torch.from_numpy(im).to(self.device).permute(2, 0, 1).float() / 255.0,
                         size) for im in images])  # (B, 3, s, s), resized where the model runs
        dense, glob = self.backbone.features(batch)
        return dense.float(), glob.float()


def build_segmenter(cfg: LabelConfig, device: torch.device):
    """The configured segmenter; ``tiny`` builds DiffCut on a random-init SDXL-shaped pipeline."""
    from labeling.segmenter import get_segmenter

    if cfg.segmenter == "felzenszwalb":  # no model: nothing of DiffCut is built
        return get_segmenter("felzenszwalb", config=cfg.felzenszwalb, device=device)
    if cfg.segmenter != "diffcut":
        return get_segmenter(cfg.segmenter, device=device)
    from labeling.diffcut import tiny_extractor

    dc = cfg.diffcut
    options = dict(resolution=dc.resolution, timestep=dc.timestep, seed=dc.seed, device=device,
                   vae_dtype=getattr(torch, dc.vae_dtype), noise_device=dc.noise_device,
                   antialias=dc.antialias)  # the preset's values, resolved by DiffCutConfig
    extractor = None
    if cfg.tiny:  # the pipeline's weights from the run's seed, the noise from DiffCut's
        extractor = tiny_extractor(cfg.seed, **options)
        options = {}
    return get_segmenter("diffcut", extractor=extractor, source=dc.model, tau=dc.tau,
                         alpha=dc.alpha, batch_size=cfg.batch_size, use_pamr=dc.pamr, **options)


# --------------------------------------------------------------------------- reading


def read_image(uri: str, check: Callable[[np.ndarray, str], Any] | None = None
               ) -> np.ndarray | Failure:
    """Read and decode one image; a failure of the input is returned, one of the environment
    raised as ShardEnvironmentError."""
    try:
        data = storage.read_bytes(uri)
    except Exception as exc:
        if storage.is_environment_error(exc):
            raise _environment(uri, exc) from exc
        return _input_failure(uri, exc)  # e.g. listed, then deleted
    try:
        image = decode_image(data, name=uri)
        return check(image, uri) if check is not None else image
    except MemoryError as exc:
        raise _environment(uri, exc) from exc
    except Exception as exc:
        return _input_failure(uri, exc)


def prefetch(fn: Callable[[str], Any], uris: Iterable[str], threads: int,
             ahead: int) -> Iterator[Any]:
    """``fn(uri)`` for each uri in order, computed by ``threads`` threads up to ``ahead`` ahead."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for uri in uris:
            pending.append(pool.submit(fn, uri))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def isolate(fn: Callable[[list[Any]], list[Any]], items: list[Any], names: list[str]
            ) -> list[Any]:
    """``fn(items)``; if the batch fails, each item alone, so that one bad input fails alone.

    An environment failure is raised at once; any other failure of one item is returned as a
    Failure naming it."""
    if not items:
        return []
    try:
        return fn(items)
    except Exception as exc:
        if storage.is_environment_error(exc):
            raise
        if len(items) == 1:
            return [_input_failure(names[0], exc)]
        log.warning("a batch of %d images failed (%s: %s); retrying them one by one",
                    len(items), type(exc).__name__, exc)
    return [isolate(fn, [item], [name])[0] for item, name in zip(items, names, strict=True)]


def raise_if_systemic(failures: list[str], ok: int, where: str) -> None:
    """Several images of a shard, and none passing, failing in the models is the environment's
    fault (a broken device, a bug), not theirs: the shard fails instead of recording them."""
    if len(failures) > 1 and ok == 0:
        raise ShardEnvironmentError(f"{where}: every image failed in the models, the first with "
                                    f"{failures[0]}")


# --------------------------------------------------------------------------- segment stage


def _segment_and_pool(models: LabelingModels, images: list[np.ndarray]) -> list[tuple]:
    """(segment map (H, W) uint16, pooled (S, D), areas (S,), global (D,)) per image."""
    from labeling.segmenter import maps_to_numpy

    maps = [m.to(models.device) for m in models.segmenter.segment_tensors(images)]
    dense, glob = models.encode(images)
    counts = (torch.stack([m.amax() for m in maps]) + 1).tolist()  # one wait for the batch
    pooled = [pool_segment_features(dense[j], m, s) for j, (m, s) in
              enumerate(zip(maps, counts, strict=True))]
    host = maps_to_numpy(maps)  # the batch's maps cross to the host in one copy
    glob = glob.cpu().numpy()
    return [(host[j], feats.cpu().numpy(), area.cpu().numpy(), glob[j])
            for j, (feats, area) in enumerate(pooled)]


def segment_shard(models: LabelingModels, writer: LabelSetWriter, shard: int,
                  image_ids: list[str], uris: list[str], batch_size: int, threads: int
                  ) -> dict[str, int]:
    """Segment one shard and commit its images, segments, globals and segment maps."""
    if writer.is_done("segments", shard):  # a retried task after its shard was committed
        return {"shard": shard, "images": len(uris), "skipped": 1}
    seg = models.segmenter

    def check(image: np.ndarray, uri: str) -> np.ndarray:
        from labeling.segmenter import prepare_image

        return prepare_image(image, uri, seg.min_side, seg.max_pixels)

    n = len(uris)
    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors: list[str | None] = [None] * n
    results: list[tuple | None] = [None] * n
    model_failures: list[str] = []
    decoded = prefetch(lambda u: read_image(u, check), uris, threads, ahead=2 * batch_size)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png") as pngs:
        for start, chunk in zip(range(0, n, batch_size), chunks(decoded, batch_size),
                                strict=True):
            idx = [start + j for j, im in enumerate(chunk) if not isinstance(im, Failure)]
            for j, im in enumerate(chunk):
                if isinstance(im, Failure):
                    errors[start + j] = im.error
            good = [chunk[i - start] for i in idx]
            outs = isolate(lambda b: _segment_and_pool(models, b), good, [uris[i] for i in idx])
            for i, image, res in zip(idx, good, outs, strict=True):
                if isinstance(res, Failure):
                    errors[i] = res.error
                    model_failures.append(res.error)
                    continue
                height[i], width[i] = image.shape[:2]
                results[i] = (pngs.submit(encode_png, res[0]), *res[1:])
        raise_if_systemic(model_failures, sum(r is not None for r in results), f"shard {shard}")
        ok = [i for i in range(n) if results[i] is not None]
        maps = {image_ids[i]: results[i][0].result() for i in ok}
    _write_segments(writer, shard, image_ids, uris, width, height, errors,
                    [results[i] for i in ok], [image_ids[i] for i in ok], maps)
    return {"shard": shard, "images": n, "skipped": 0}


def _write_segments(writer, shard, image_ids, uris, width, height, errors, results, ok_ids, maps):
    counts = np.array([len(r[2]) for r in results], np.int64)
    dim = results[0][3].shape[0] if results else 0
    feats = (np.concatenate([r[1] for r in results]) if results
             else np.zeros((0, dim), np.float32))
    with writer.shard("segments", shard) as out:
        out.write_columns(
            "images", image_id=image_ids, uri=uris, width=width, height=height,
            status=["error" if e else "ok" for e in errors], error=errors,
            shard=np.full(len(image_ids), shard, np.int32))
        out.write_columns(
            "segments", image_id=np.repeat(np.asarray(ok_ids, object), counts),
            segment_id=np.concatenate([np.arange(c) for c in counts]) if results else [],
            area=np.concatenate([r[2] for r in results]) if results else [], feature=feats)
        out.write_columns("globals", image_id=ok_ids,
                          feature=np.stack([r[3] for r in results]) if results
                          else np.zeros((0, dim), np.float32))
        out.write_maps_png("segments", maps)


# --------------------------------------------------------------------------- label stage


def label_shard(models: LabelingModels, writer: LabelSetWriter, centroids: torch.Tensor,
                shard: int, ground_truth: str | None, batch_size: int, threads: int
                ) -> dict[str, int]:
    """Pseudo-label maps, classes present and (with ground truth) confusion of one shard."""
    if writer.is_done("labels", shard):
        return {"shard": shard, "images": 0, "skipped": 1}
    images = writer.read_shard_table("images", shard, ["image_id", "uri", "status"])
    keep = np.asarray(images.column("status").to_numpy(zero_copy_only=False) == "ok")
    ids = np.asarray(images.column("image_id").to_numpy(zero_copy_only=False))[keep].tolist()
    uris = np.asarray(images.column("uri").to_numpy(zero_copy_only=False))[keep].tolist()
    segpng = writer.read_maps_png("segments", shard)
    cents = centroids.to(models.device)
    cls_img, cls_id, cls_area, conf = [], [], [], []
    maps: dict[str, bytes] = {}

    def read(uri: str) -> np.ndarray:
        image = read_image(uri)
        if isinstance(image, Failure):  # it decoded in the segment stage: the data changed
            raise ShardEnvironmentError(f"shard {shard}: {image.error} (the image was readable "
                                        "when it was segmented; has the source changed?)")
        return image

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png") as pngs:
        futures = {}
        for start, chunk in zip(range(0, len(uris), batch_size),
                                chunks(prefetch(read, uris, threads, 2 * batch_size), batch_size),
                                strict=True):
            dense, _ = models.encode(chunk)
            for j in range(len(chunk)):
                iid = ids[start + j]
                seg = torch.from_numpy(decode_png(segpng[iid]).astype(np.int64)).to(models.device)
                labels = pseudo_label_map(dense[j], seg, cents)  # (H, W)
                label_np = labels.cpu().numpy().astype(np.uint16)
                futures[iid] = pngs.submit(encode_png, label_np)
                c, a = class_areas(labels)
                cls_img += [iid] * len(c)
                cls_id.append(c)
                cls_area.append(a)
                if ground_truth is not None:
                    entries = _truth_confusion(ground_truth, iid, label_np)
                    if entries is not None:
                        conf.append(entries)
        maps = {iid: f.result() for iid, f in futures.items()}
    with writer.shard("labels", shard) as out:
        out.write_columns("classes", image_id=cls_img,
                          class_id=np.concatenate(cls_id) if cls_id else [],
                          area=np.concatenate(cls_area) if cls_area else [])
        out.write_maps_png("labels", maps)
        if ground_truth is not None:
            t, p, c = ([np.concatenate(x) for x in zip(*conf, strict=True)] if conf
                       else ([], [], []))
            out.write_columns("confusion", true_class=t, pred_class=p, pixels=c)
            out.count("images_with_truth", len(conf))
    return {"shard": shard, "images": len(uris), "skipped": 0}


def _truth_confusion(root: str, image_id: str, pred: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Sparse (true, pred, pixels) counts against ``root/<id>.png``; None if it has no mask."""
    uri = storage.join(root, image_id + ".png")
    try:
        truth = decode_png(storage.read_bytes(uri), name=uri)
    except FileNotFoundError:
        return None
    except Exception as exc:
        if storage.is_environment_error(exc):
            raise _environment(uri, exc) from exc
        raise
    return confusion_entries(truth, pred)
