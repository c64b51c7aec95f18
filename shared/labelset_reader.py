"""Reader of complete label sets: tables, per-image maps, pairs, centroids.

The layout is described in shared/labelset_format.py; the writer is shared/labelset.py. A set
without ``labelset.json`` (labeling has not finished) is refused.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from shared import storage
from shared.labelset_format import (
    FORMAT_VERSION,
    LabelSetError,
    concat,
    decode_map,
    maps_path,
    read_maps_png,
    table_path,
)


class LabelSet:
    """Read access to a complete label set: tables, per-image maps, pairs, centroids."""

    def __init__(self, uri: str, cache_shards: int = 4):
        self.uri = str(uri).rstrip("/")
        self._cache_shards = cache_shards
        meta_uri = storage.join(self.uri, "labelset.json")
        try:
            self.meta: dict = storage.read_json(meta_uri)
        except FileNotFoundError:
            raise LabelSetError(
                f"{self.uri} is not a complete label set: {meta_uri} is missing (labeling has not "
                "finished there, or the URI does not point at a label set)") from None
        if self.meta.get("format_version") != FORMAT_VERSION or "contents" not in self.meta:
            raise LabelSetError(f"{meta_uri}: unsupported label set format version "
                                f"{self.meta.get('format_version')!r} (expected {FORMAT_VERSION})")
        self._contents = self.meta["contents"]
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._maps_lru: OrderedDict[tuple[str, int], dict[str, bytes]] = OrderedDict()
        self._images: pa.Table | None = None
        self._index: dict[str, tuple[int, str, str | None]] | None = None
        self._classes: dict[str, list[tuple[int, float]]] | None = None

    def __getstate__(self) -> dict:  # picklable for data-loader workers: caches are rebuilt
        return {"uri": self.uri, "_cache_shards": self._cache_shards, "meta": self.meta,
                "_contents": self._contents}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def num_classes(self) -> int:
        """K, the number of pseudo-classes."""
        for key in ("num_classes", "K"):
            if key in self.meta:
                return int(self.meta[key])
        return int(self.centroids().shape[0])

    def table(self, name: str) -> pa.Table:
        """Table ``name``: global, or concatenated over shards in shard order."""
        if name in self._contents["global_tables"]:
            return storage.read_parquet(storage.join(self.uri, table_path(name)))
        if name not in self._contents["tables"]:
            known = sorted([*self._contents["tables"], *self._contents["global_tables"]])
            raise LabelSetError(f"label set {self.uri} has no table {name!r}; it has {known}")
        shards = self._contents["tables"][name]
        uris = [storage.join(self.uri, table_path(name, s)) for s in shards]
        return concat(name, [storage.read_parquet(u) for u in uris], self.uri)

    def images(self) -> pa.Table:
        """image_id, uri, width, height, status, error, shard (every listed image)."""
        if self._images is None:
            self._images = self.table("images")
        return self._images

    def _image_index(self) -> dict[str, tuple[int, str, str | None]]:
        if self._index is None:
            t = self.images()
            self._index = {i: (s, st, e) for i, s, st, e in zip(
                t.column("image_id").to_pylist(), t.column("shard").to_pylist(),
                t.column("status").to_pylist(), t.column("error").to_pylist(), strict=True)}
        return self._index

    @property
    def image_ids(self) -> list[str]:
        """Ids of the images labelled successfully (status "ok"), in shard order."""
        return [i for i, (_, status, _) in self._image_index().items() if status == "ok"]

    def shards(self) -> list[int]:
        """Indices of the shards."""
        return list(self._contents["tables"]["images"])

    def shard_image_ids(self, shard: int) -> list[str]:
        """Ids of the successfully labelled images of ``shard``."""
        return [i for i, (s, status, _) in self._image_index().items()
                if s == shard and status == "ok"]

    def _shard_maps(self, kind: str, shard: int) -> dict[str, bytes]:
        key = (kind, shard)
        with self._lock:
            if key in self._maps_lru:
                self._maps_lru.move_to_end(key)
                return self._maps_lru[key]
        if shard not in self._contents["maps"].get(kind, []):
            raise LabelSetError(f"label set {self.uri} has no {kind} maps for shard {shard}")
        maps = read_maps_png(storage.join(self.uri, maps_path(kind, shard)))
        with self._lock:
            self._maps_lru[key] = maps
            while len(self._maps_lru) > self._cache_shards:
                self._maps_lru.popitem(last=False)
        return maps

    def map(self, kind: str, image_id: str) -> np.ndarray:
        """The ``kind`` map ("segments" | "labels") of one image: uint16 (H, W)."""
        entry = self._image_index().get(image_id)
        if entry is None:
            raise LabelSetError(f"image {image_id!r} is not in label set {self.uri}")
        shard, status, error = entry
        if status != "ok":
            raise LabelSetError(f"image {image_id!r} of label set {self.uri} failed during "
                                f"labeling ({error}); it has no maps")
        maps = self._shard_maps(kind, shard)
        if image_id not in maps:
            raise LabelSetError(
                f"label set {self.uri}: {kind} maps of shard {shard} lack {image_id!r}")
        return decode_map(maps[image_id], f"{self.uri} {kind} map {image_id}")

    def segment_map(self, image_id: str) -> np.ndarray:
        """Class-agnostic segment ids per pixel, uint16 (H, W) at the image's own size."""
        return self.map("segments", image_id)

    def label_map(self, image_id: str) -> np.ndarray:
        """Pseudo-class id per pixel, uint16 (H, W) at the image's own size."""
        return self.map("labels", image_id)

    def shard_maps(self, kind: str, shard: int) -> dict[str, np.ndarray]:
        """All ``kind`` maps of one shard, by image id (one object read)."""
        return {i: decode_map(p, f"{self.uri} {kind} map {i}")
                for i, p in self._shard_maps(kind, shard).items()}

    def classes(self, image_id: str) -> list[tuple[int, float]]:
        """(class_id, area fraction) of the pseudo-classes present in one image."""
        if self._classes is None:
            t = self.table("classes")
            index: dict[str, list[tuple[int, float]]] = {}
            for i, c, a in zip(t.column("image_id").to_pylist(), t.column("class_id").to_pylist(),
                               t.column("area").to_pylist(), strict=True):
                index.setdefault(i, []).append((c, a))
            self._classes = index
        if image_id not in self._image_index():
            raise LabelSetError(f"image {image_id!r} is not in label set {self.uri}")
        return list(self._classes.get(image_id, []))

    def pairs(self) -> pa.Table:
        """query_id, positive_id, class_id, query_area, positive_area."""
        return self.table("pairs")

    def centroids(self) -> np.ndarray:
        """Pseudo-class centroids, float32 (K, D), row k = class k."""
        t = self.table("centroids").sort_by("class_id")
        ids = t.column("class_id").to_pylist()
        if ids != list(range(len(ids))):
            raise LabelSetError(f"label set {self.uri}: centroid class ids are not 0..K-1")
        return np.asarray(t.column("feature").to_pylist(), dtype=np.float32).reshape(len(ids), -1)
