"""Per-shard work of ``labeling.import``: one image and its map -> label map, segments, classes;
the encoder's global features when pairs are computed; the shard's two stages written; the
columns of file pairs.

Faults follow labeling/stages.py: a failure of one image's input (unreadable image or map, wrong
dtype, rank or size, a class id out of range) is recorded against that image and the shard goes
on; a failure of the environment raises ShardEnvironmentError and the shard is not committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from labeling.import_sources import MapError, Source, check_values, to_image_frame
from labeling.pairs import select_pairs
from labeling.stages import (
    Failure,
    ShardEnvironmentError,
    chunks,
    isolate,
    prefetch,
    raise_if_systemic,
    read_image,
)
from shared import storage
from shared.images import encode_png
from shared.labelset import LabelSetWriter

STAGES = ("segments", "labels")  # the labeling service's per-shard stages, in its order
MAX_SEGMENTS = 65536  # a 16-bit segment map holds ids 0..65535


@dataclass
class ImportedImage:
    """One imported image: its maps as 16-bit PNG bytes and its rows of the tables."""

    height: int
    width: int
    labels_png: bytes
    segments_png: bytes
    class_id: np.ndarray  # (C,) int32, classes present (ignore excluded)
    class_area: np.ndarray  # (C,) float32, fraction of the image
    segment_area: np.ndarray  # (S,) float32, fraction of the image
    image: np.ndarray | None  # (H, W, 3) uint8, kept only until the encoder has seen it
    glob: np.ndarray | None = None  # (D,) global feature


# --------------------------------------------------------------------------- per image


def class_regions(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected regions of equal value (4-connectivity): ids (H, W) int32 0..S-1 in raster
    order of their first pixel, and S. One labelling pass over a doubled grid: pixel (i, j) sits
    at (2i, 2j), and the cell between two neighbours is set only when their values are equal."""
    from scipy import ndimage

    h, w = labels.shape
    grid = np.zeros((2 * h - 1, 2 * w - 1), bool)
    grid[::2, ::2] = True
    grid[::2, 1::2] = labels[:, 1:] == labels[:, :-1]  # (h, w-1) horizontal neighbours
    grid[1::2, ::2] = labels[1:, :] == labels[:-1, :]  # (h-1, w) vertical neighbours
    regions, count = ndimage.label(grid)  # cross structure: odd-odd cells never connect
    return (regions[::2, ::2] - 1).astype(np.int32), int(count)


def segment_map(labels: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """Segment ids (H, W) and their count: connected class regions, or one segment per class."""
    if kind == "regions":
        return class_regions(labels)
    values, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int32), len(values)


def class_table(labels: np.ndarray, ignore_index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Classes present (ignore excluded), ascending, and their area fractions of the image."""
    ids, counts = np.unique(labels, return_counts=True)  # (C,), (C,)
    keep = ids != ignore_index if ignore_index is not None else np.ones(len(ids), bool)
    return ids[keep].astype(np.int32), (counts[keep] / labels.size).astype(np.float32)


def frame_labels(raw: np.ndarray, height: int, width: int, uri: str, source: Source,
                 view: str, resize: int, crop: int, num_classes: int | None) -> np.ndarray:
    """The checked map of one image in the image's frame, uint16 (height, width)."""
    check_values(raw, uri, source.ignore_index, num_classes)
    if source.same_size:
        if raw.shape != (height, width):
            raise MapError(f"{uri}: mask is {raw.shape[1]}x{raw.shape[0]} but its image is "
                           f"{width}x{height}")
        return raw.astype(np.uint16)
    try:
        return to_image_frame(raw, height, width, view, resize, crop).astype(np.uint16)
    except MapError as exc:
        raise MapError(f"{uri}: {exc}") from None


def _read_map(uri: str) -> bytes | Failure:
    try:
        return storage.read_bytes(uri)
    except Exception as exc:
        if storage.is_environment_error(exc):
            raise ShardEnvironmentError(f"{uri}: {type(exc).__name__}: {exc}") from exc
        return Failure(f"{type(exc).__name__}: {uri}: {exc}")


def import_image(source: Source, index: int, cfg, keep_pixels: bool) -> ImportedImage | Failure:
    """Read image ``index`` and its map, bring the map into the image frame, derive its
    segments and classes; a failure of either input comes back as a Failure naming the file."""
    uri = source.map_uris[index]
    if uri is None:  # checked first: no image is decoded for nothing
        return Failure(f"MapError: {source.image_uris[index]}: {source.problems[index]}")
    image = read_image(source.image_uris[index])
    if isinstance(image, Failure):
        return image
    data = _read_map(uri)
    if isinstance(data, Failure):
        return data
    height, width = image.shape[:2]
    num_classes = cfg.classes if cfg.classes is not None else source.num_classes
    try:
        labels = frame_labels(source.decode(data, uri), height, width, uri, source,
                              cfg.map_view, cfg.view_resize, cfg.view_crop, num_classes)
        segments, count = segment_map(labels, cfg.segments)
        if count > MAX_SEGMENTS:
            raise MapError(f"{uri}: {count} connected class regions, more than a 16-bit "
                           "segment map holds (set segments=classes)")
    except MapError as exc:
        return Failure(f"MapError: {exc}")
    cls, area = class_table(labels, source.ignore_index)
    seg_area = (np.bincount(segments.reshape(-1), minlength=count) / labels.size)
    return ImportedImage(height, width, encode_png(labels), encode_png(segments.astype(np.uint16)),
                         cls, area, seg_area.astype(np.float32), image if keep_pixels else None)


def encode_batch(models, items: list[ImportedImage]) -> list[ImportedImage]:
    """The global feature of each image, as the labeling service computes it for its pairs."""
    _, glob = models.encode([it.image for it in items])  # (B, D)
    glob = glob.cpu().numpy()
    for j, it in enumerate(items):
        it.glob = glob[j]
    return items


# --------------------------------------------------------------------------- per shard


def import_shard(writer: LabelSetWriter, source: Source, cfg, models, shard: int,
                 rows: list[int]) -> None:
    """Import the images ``rows`` of ``source`` and commit the stages of ``shard`` not done."""
    todo = [stage for stage in STAGES if not writer.is_done(stage, shard)]
    if not todo:
        return
    names = {i: source.image_uris[i] for i in rows}
    loaded = prefetch(lambda i: (i, import_image(source, i, cfg, models is not None)), rows,
                      cfg.decode_threads, ahead=2 * cfg.batch_size)
    results: list[ImportedImage | Failure] = []
    model_failures: list[str] = []
    for chunk in chunks(loaded, cfg.batch_size):
        good = [(i, r) for i, r in chunk if isinstance(r, ImportedImage)]
        if models is not None and good:
            outs = isolate(lambda b: encode_batch(models, b), [r for _, r in good],
                           [names[i] for i, _ in good])
            model_failures += [o.error for o in outs if isinstance(o, Failure)]
            done = dict(zip([i for i, _ in good], outs, strict=True))
            chunk = [(i, done.get(i, r)) for i, r in chunk]
        for _, r in chunk:
            if isinstance(r, ImportedImage):
                r.image = None  # the pixels are no longer needed
            results.append(r)
    # every image failing in the encoder is the encoder's fault: the shard fails, as in the service
    raise_if_systemic(model_failures, sum(isinstance(r, ImportedImage) for r in results), f"shard {shard}")
    ids = [source.image_ids[i] for i in rows]
    if "segments" in todo:
        _write_segments(writer, shard, ids, [names[i] for i in rows], results, models)
    if "labels" in todo:
        _write_labels(writer, shard, ids, results)


def _ok(ids: list[str], results: list) -> list[tuple[str, ImportedImage]]:
    return [(i, r) for i, r in zip(ids, results, strict=True) if isinstance(r, ImportedImage)]


def _write_segments(writer, shard, ids, uris, results, models) -> None:
    ok = _ok(ids, results)
    errors = [r.error if isinstance(r, Failure) else None for r in results]
    counts = np.array([len(r.segment_area) for _, r in ok], np.int64)
    feats = np.zeros((int(counts.sum()), 0), np.float32)  # no K-means: no segment features
    size = [(r.width, r.height) if isinstance(r, ImportedImage) else (0, 0) for r in results]
    with writer.shard("segments", shard) as out:
        out.write_columns(
            "images", image_id=ids, uri=uris, width=np.array([s[0] for s in size], np.int32),
            height=np.array([s[1] for s in size], np.int32),
            status=["error" if e else "ok" for e in errors], error=errors,
            shard=np.full(len(ids), shard, np.int32))
        out.write_columns(
            "segments", image_id=np.repeat(np.asarray([i for i, _ in ok], object), counts),
            segment_id=np.concatenate([np.arange(c) for c in counts]) if ok else [],
            area=np.concatenate([r.segment_area for _, r in ok]) if ok else [], feature=feats)
        if models is not None:
            out.write_columns("globals", image_id=[i for i, _ in ok],
                              feature=np.stack([r.glob for _, r in ok]) if ok
                              else np.zeros((0, 0), np.float32))
        out.write_maps_png("segments", {i: r.segments_png for i, r in ok})


def _write_labels(writer, shard, ids, results) -> None:
    ok = _ok(ids, results)
    with writer.shard("labels", shard) as out:
        out.write_columns(
            "classes", image_id=[i for i, r in ok for _ in range(len(r.class_id))],
            class_id=np.concatenate([r.class_id for _, r in ok]) if ok else [],
            area=np.concatenate([r.class_area for _, r in ok]) if ok else [])
        out.write_maps_png("labels", {i: r.labels_png for i, r in ok})


# --------------------------------------------------------------------------- file pairs


def to_pairs_columns(queries: list[str], positives: list[str], ok_ids: pa.Array,
                     class_image: np.ndarray, class_id: np.ndarray, class_area: np.ndarray
                     ) -> dict:
    """Pairs-table columns of the file's pairs, in file order, both images imported.

    The shared class and its areas are the ones the labeling service's rule
    (``labeling.pairs.select_pairs``) picks among the classes both images hold; -1 and zero
    areas where they share none. ``class_image`` indexes ``ok_ids``."""
    q = _index(queries, ok_ids)
    p = _index(positives, ok_ids)
    keep = (q >= 0) & (p >= 0)  # a pair naming an image that failed is dropped
    q, p = q[keep], p[keep]
    n = len(ok_ids)
    per_query = np.bincount(q, minlength=n)  # (N,) pairs of each query
    order = np.argsort(q, kind="stable")
    rank = np.empty(len(q), np.int64)
    rank[order] = np.arange(len(q)) - (np.cumsum(per_query) - per_query)[q[order]]
    k = max(1, int(per_query.max()) if len(q) else 1)
    neighbours = np.full((n, k), -1, np.int64)  # (N, k): the file's positives as neighbours
    neighbours[q, rank] = p
    row = np.full((n, k), -1, np.int64)
    row[q, rank] = np.arange(len(q))  # (N, k) -> pair row
    sel = select_pairs(neighbours, class_image, class_id, class_area, min_area=0.0)
    at = row[sel["query"], sel["rank"]]
    shared = np.full(len(q), -1, np.int32)
    q_area, p_area = np.zeros(len(q), np.float32), np.zeros(len(q), np.float32)
    shared[at], q_area[at], p_area[at] = sel["class_id"], sel["query_area"], sel["positive_area"]
    return {"query_id": ok_ids.take(pa.array(q)), "positive_id": ok_ids.take(pa.array(p)),
            "class_id": shared, "query_area": q_area, "positive_area": p_area}


def _index(ids: list[str], value_set: pa.Array) -> np.ndarray:
    """Position of each id in ``value_set``, -1 where it is absent."""
    found = pc.index_in(pa.array(ids, pa.string()), value_set=value_set).fill_null(-1)
    return found.to_numpy(zero_copy_only=False).astype(np.int64)
