"""A label set from labels that already exist: ``import_labels(ImportConfig(...)) -> summary``.

Sources (labeling/import_sources.py): a folder of per-image class maps (``.pt`` tensors such as
the DIP authors' released COCO pseudo-labels, or PNGs), a folder of ground-truth masks, or a
dataset layout of evaluation/datasets (the last two make an *oracle* label set: pseudo-class =
true class). The output is written through shared/labelset.py exactly as the labeling service
writes it: the same tables and schemas, the same two per-shard stages (``segments``: images,
segments, globals, segment maps; ``labels``: classes, label maps), the global pairs table, and
``labelset.json`` last, recording the source. A rerun resumes: finished shards are skipped; a
changed setting is refused (write elsewhere, or ``resume=False``).

Choices, and why:

- **Maps at the image's own size.** Training reads a label map at its image's size and applies
  Resize + CenterCrop to both jointly (``LabelSet.label_map``, ``PairEpisodes.load``, which
  refuses a map of another size), so every map is brought into the image frame by nearest-
  neighbour indexing: ``map_view="image"`` resizes a map that covers the whole image;
  ``map_view="train_crop"`` reads a crop x crop map as the training view (Resize(256) +
  CenterCrop(224), what the authors' released training pairs its 224 x 224 labels with) and
  places it back so that training sees exactly that map again. Ground-truth masks must already
  be at their image's size.
- **Ignore.** Pixels equal to ``ignore_index`` (masks: 255 or the dataset's own; class maps: none)
  keep that value in the label map ("unlabelled"), count in no class, and stay in each image's
  area, so areas are fractions of the image as in the service. ``labelset.json`` records
  ``ignore_index``: train with the same ``ignore_index``. Background is a class like any other:
  the service labels every pixel, the background included.
- **Segments**: ``segments="regions"`` (default) takes the connected regions of one class
  (4-connectivity) as segments, class-agnostic like DiffCut's; ``"classes"`` takes each class of
  the image as one segment. The segments table holds each segment's area and a zero-length
  feature: pooled segment features exist only to be clustered, and an import clusters nothing.
- **Classes** per image are (class id, area fraction) from NumPy counts over the label map.
- **Pairs**: from the pairs file when given (kept in file order; a pair naming an image whose
  map failed is dropped; the shared class and its areas are what the service's rule picks, or
  class -1 when the two share none); otherwise computed as the service does
  (``labeling.aggregate.pair``: global-feature neighbours, then the shared-class rule).
- **Centroids**: none exist for imported labels and no table is written. K is recorded as
  ``num_classes`` in ``labelset.json``, which is what ``LabelSet.num_classes`` and training read.
  K is ``classes`` when given, the dataset's class count, or else the largest class id + 1.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from labeling import aggregate
from labeling.import_sources import (
    LabelImportError,
    Source,
    dataset_source,
    folder_source,
    read_pairs_file,
)
from labeling.import_work import import_shard, to_pairs_columns
from shared.config import Config
from shared.labelset import LabelSetError, LabelSetWriter

__all__ = ["ImportConfig", "LabelImportError", "import_labels"]
log = logging.getLogger(__name__)


class ImportConfig(Config):
    """One import. Exactly one of ``maps``, ``masks``, ``dataset`` names the labels."""

    images: str = ""  # image folder URI; with ``dataset``, the dataset's root
    maps: str | None = None  # folder of class maps <image id>.pt / .png
    masks: str | None = None  # folder of ground-truth masks <image id>.png (oracle)
    dataset: str | None = None  # a dataset layout of evaluation/datasets (oracle), e.g. synthetic
    split: Literal["train", "val"] = "train"  # with ``dataset``
    pairs: str | None = None  # pairs file "query.jpg: positive.jpg"; None: computed
    out: str = "runs/imported"
    classes: int | None = Field(None, ge=1)  # K; None: the dataset's, or the largest id + 1
    ignore_index: int | None = Field(None, ge=0, le=65535)  # None: masks 255, maps none
    map_view: Literal["image", "train_crop"] = "image"  # what a class map covers
    view_resize: int = Field(256, ge=1)  # the train_crop view: Resize(view_resize) ...
    view_crop: int = Field(224, ge=1)  # ... + CenterCrop(view_crop)
    segments: Literal["regions", "classes"] = "regions"
    backbone: str = "vits14"  # encoder of the computed pairs
    weights: str | None = "hub"
    tiny: bool = False
    feature_size: int | None = Field(None, ge=14)  # None: the backbone's label_input_size
    neighbours: int = Field(5, ge=1)
    pair_search: Literal["exact", "ivf"] = "exact"
    min_area: float = Field(0.05, ge=0, lt=1)
    shard_size: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    decode_threads: int = Field(4, ge=1)
    lease_timeout: float = Field(120.0, gt=0)
    seed: int = 0  # seed of random-init (tiny) encoders, as in the labeling service

    @model_validator(mode="after")
    def _check(self) -> ImportConfig:
        given = [k for k in ("maps", "masks", "dataset") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of maps, masks, dataset (got {given or 'none'})")
        if not self.images:
            raise ValueError("images: the image folder (or, with dataset, its root) is required")
        if self.feature_size is None:  # 448 at /14, 512 at /16: a 32 x 32 grid, as labeling
            from shared.backbones import get_spec

            self.feature_size = get_spec(self.backbone).label_input_size
        if self.view_crop > self.view_resize:
            raise ValueError(f"view_crop ({self.view_crop}) must not exceed view_resize "
                             f"({self.view_resize})")
        return self


# Settings that change how an import runs, never what it writes.
OPERATIONAL_FIELDS = frozenset({"out", "batch_size", "decode_threads", "lease_timeout"})


def open_source(cfg: ImportConfig) -> Source:
    """The images and where each one's map is, from the configured kind of source."""
    if cfg.dataset:
        return dataset_source(cfg.dataset, cfg.images, cfg.split, cfg.ignore_index)
    return folder_source(cfg.images, cfg.maps or cfg.masks, cfg.masks is not None,
                         cfg.ignore_index)


def fingerprint(cfg: ImportConfig, source: Source, pairs_sha256: str | None) -> dict:
    """What the label set depends on: the settings (minus operational ones), the listing of
    images and maps, and the pairs file's bytes."""
    listing = "\n".join(f"{i}\t{u}\t{m}" for i, u, m in zip(
        source.image_ids, source.image_uris, source.map_uris, strict=True))
    return {"import": cfg.model_dump(mode="json", exclude=set(OPERATIONAL_FIELDS)),
            "listing_sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "num_images": len(source), "pairs_sha256": pairs_sha256}


def import_labels(cfg: ImportConfig, progress: bool = False, resume: bool = True) -> dict:
    """Import the configured labels into a label set at ``cfg.out``; returns the summary.

    Inputs are checked (listings, the pairs file) and the encoder is loaded before anything is
    written; a folder that is not a label set is never written into."""
    from labeling.pipeline import check_out, clear_labelset
    from labeling.stages import LabelingModels
    from shared.lease import Lease

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:  # seconds per step, as the service's summary reports them
        nonlocal clock
        now = time.perf_counter()
        seconds[name], clock = round(now - clock, 3), now

    source = open_source(cfg)
    pairs = read_pairs_file(cfg.pairs, source.image_ids) if cfg.pairs else None
    if source.unmatched:
        log.warning("%d maps have no image under %s and are left out, e.g. %s",
                    len(source.unmatched), source.images_root, ", ".join(source.unmatched[:3]))
    check_out(cfg.out)
    models = None if pairs else LabelingModels.load(cfg, segmenter=False)
    lap("inputs")
    lease = Lease(cfg.out, cfg.lease_timeout).acquire()
    try:
        if not resume:
            clear_labelset(cfg.out)
        writer = LabelSetWriter(cfg.out, fingerprint(cfg, source, pairs and pairs.sha256),
                                lease.run_id)
        num_shards = -(-len(source) // cfg.shard_size)
        _import_shards(writer, source, cfg, models, num_shards, progress)
        _check_some_imported(writer)
        lap("import")
        if not writer.has_table("pairs"):
            _write_pairs(writer, cfg, pairs)
        lap("pair")
        counts = _finish(writer, cfg, source, pairs, num_shards)
        lap("finish")
    finally:
        lease.release()
    return {"out": cfg.out, **counts, "seconds": seconds}


def _import_shards(writer: LabelSetWriter, source: Source, cfg: ImportConfig, models,
                   num_shards: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(source), desc="import", unit="img", disable=not progress) as bar:
        for shard in range(num_shards):
            rows = range(shard * cfg.shard_size, min((shard + 1) * cfg.shard_size, len(source)))
            import_shard(writer, source, cfg, models, shard, list(rows))
            bar.update(len(rows))


def _check_some_imported(writer: LabelSetWriter) -> None:
    """LabelImportError naming the first failure when not one image could be imported."""
    first = None
    for _, table in writer.iter_shard_tables("images", ["status", "error"]):
        status = table.column("status")
        if pc.any(pc.equal(status, "ok")).as_py():
            return
        first = first or table.column("error")[0].as_py()
    raise LabelImportError(f"{writer.uri}: no image could be imported; the first failed with "
                           f"{first}. Fix the input and rerun with --no-resume")


def _write_pairs(writer: LabelSetWriter, cfg: ImportConfig, pairs) -> None:
    """The pairs table: from the pairs file, or computed as the labeling service does."""
    if pairs is None:
        from shared.devices import default_device

        aggregate.pair(writer, cfg, default_device())
        return
    ok_ids = _ok_ids(writer)
    img, cls, area = _class_columns(writer, ok_ids)
    writer.write_columns("pairs", **to_pairs_columns(pairs.queries, pairs.positives, ok_ids,
                                                     img, cls, area))


def _ok_ids(writer: LabelSetWriter) -> pa.Array:
    parts = []
    for _, table in writer.iter_shard_tables("images", ["image_id", "status"]):
        parts.append(table.filter(pc.equal(table.column("status"), "ok")).column(0)
                     .combine_chunks())
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def _class_columns(writer: LabelSetWriter, ids: pa.Array
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classes table as (image index into ``ids``, class id, area) columns."""
    img, cls, area = [], [], []
    for _, table in writer.iter_shard_tables("classes"):
        index = pc.index_in(table.column("image_id"), value_set=ids)
        if index.null_count:
            raise LabelSetError(f"{writer.uri}: the classes table names images that are not "
                                "imported; remove the label set and import again")
        img.append(index.to_numpy(zero_copy_only=False).astype(np.int64))
        cls.append(table.column("class_id").to_numpy())
        area.append(table.column("area").to_numpy())
    empty = np.zeros(0, np.int64)
    return tuple(np.concatenate(x) if x else empty for x in (img, cls, area))


def _num_classes(writer: LabelSetWriter, cfg: ImportConfig, source: Source) -> int:
    if cfg.classes is not None:
        return cfg.classes
    if source.num_classes is not None:
        return source.num_classes
    high = -1
    for _, table in writer.iter_shard_tables("classes", ["class_id"]):
        if table.num_rows:
            high = max(high, int(pc.max(table.column("class_id")).as_py()))
    if high < 0:
        raise LabelImportError(f"{writer.uri}: the imported maps hold no class id (every pixel "
                               "is ignore); check ignore_index")
    return high + 1


def _finish(writer: LabelSetWriter, cfg: ImportConfig, source: Source, pairs,
            num_shards: int) -> dict[str, Any]:
    """``labelset.json``: config, K, ignore index, the source and the counts; written last."""
    k = _num_classes(writer, cfg, source)
    counts = aggregate.counts(writer, k, num_shards)
    table = writer.read_table("pairs")
    if pairs is not None:
        counts["pairs_file_lines"] = len(pairs.queries)
        counts["pairs_dropped"] = len(pairs.queries) - table.num_rows  # an image failed
        counts["pairs_without_shared_class"] = int(
            pc.sum(pc.equal(table.column("class_id"), -1)).as_py() or 0)
    counts["maps_without_image"] = len(source.unmatched)
    meta = {
        "config": json.loads(cfg.model_dump_json()),
        "backbone": None if pairs else cfg.backbone,
        "segmenter": f"import:{cfg.segments}",
        "num_classes": k, "ignore_index": source.ignore_index,
        "images_uri": source.images_root, "counts": counts,
        "source": {"kind": source.kind, "labels_uri": source.maps_root,
                   "dataset": cfg.dataset, "map_view": cfg.map_view if source.kind ==
                   "class_maps" else "image", "pairs_uri": cfg.pairs,
                   "pairs_sha256": pairs.sha256 if pairs else None,
                   "maps_without_image": source.unmatched[:20]},
        "centroids": None,
    }
    writer.finish(meta)
    return counts

