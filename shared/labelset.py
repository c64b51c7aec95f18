"""Writer of label sets, the contract between labeling and training; the reader, re-exported
here, is shared/labelset_reader.py.

The layout, table schemas and map encoding are described in shared/labelset_format.py; these
three modules are the only code that knows them. Work is written per (stage, shard) and
committed by a done-marker written last; ``labelset.json``, written by
:meth:`LabelSetWriter.finish`, marks the set complete, and :class:`LabelSet` refuses a set
without it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from shared import lease, storage
from shared.images import encode_png
from shared.labelset_format import (
    FORMAT_VERSION,
    MAP_KINDS,
    RESERVED_META,
    SCHEMAS,
    LabelSetError,
    canonical,
    check_name,
    check_png16,
    check_shard,
    concat,
    conform,
    decode_map,
    diff,
    make_table,
    maps_path,
    maps_table,
    marker_path,
    read_maps_png,
    shard_name,
    table_path,
    to_uint16,
)
from shared.labelset_reader import LabelSet
from shared.markers import MarkedUnit

__all__ = ["FORMAT_VERSION", "MAP_KINDS", "SCHEMAS", "LabelSet", "LabelSetError", "LabelSetWriter",
           "ShardWriter", "is_labelset"]


def is_labelset(uri: str) -> bool:
    """Whether ``uri`` holds a label set, complete or in progress (its markers are there)."""
    return any(storage.exists(storage.join(uri, name))
               for name in ("labelset.json", "_progress.json"))


# --------------------------------------------------------------------------- writer


class ShardWriter:
    """Files of one (stage, shard); made by :meth:`LabelSetWriter.shard`, committed on exit."""

    def __init__(self, parent: LabelSetWriter, stage: str, shard: int):
        self._parent, self.stage, self.shard = parent, stage, shard
        self.rows: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self._where = f"{parent.uri} stage {stage!r} shard {shard}"
        # the shard's files and its done-marker (shared/markers.py: files first, marker last)
        self._unit = MarkedUnit(parent.uri, marker_path(stage, shard), self._where, LabelSetError)
        self.files = self._unit.files  # paths relative to the set, in the order written

    def _claim(self, rel: str) -> str:
        return self._unit.claim(rel)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write this shard's part of table ``name`` (images, segments, globals, classes, ...)."""
        check_name("table", name)
        if name == "images":
            table = self._with_shard_column(table)
        table = conform(name, table, self._where)
        storage.write_parquet(self._claim(table_path(name, self.shard)), table)
        self.rows[name] = table.num_rows

    def write_columns(self, name: str, **columns) -> None:
        """Write this shard's part of table ``name`` from NumPy columns (schema order, types)."""
        self.write_table(name, make_table(name, self._where, **columns))

    def count(self, name: str, value: int) -> None:
        """Record a count about this shard in its marker (e.g. images with ground truth)."""
        self.counts[check_name("count", name)] = int(value)

    def write_maps(self, kind: str, maps: dict[str, np.ndarray]) -> None:
        """Write per-image (H, W) maps with values in 0..65535 as 16-bit PNGs in one object."""
        pngs = {i: encode_png(to_uint16(i, m, self._where)) for i, m in maps.items()}
        self.write_maps_png(kind, pngs)

    def write_maps_png(self, kind: str, maps_png: dict[str, bytes]) -> None:
        """Like :meth:`write_maps` with maps already encoded as 16-bit greyscale PNG bytes."""
        if kind not in MAP_KINDS:
            raise LabelSetError(f"{self._where}: unknown map kind {kind!r}; known: {MAP_KINDS}")
        pngs = {str(i): check_png16(str(i), p, self._where) for i, p in maps_png.items()}
        storage.write_parquet(self._claim(maps_path(kind, self.shard)), maps_table(pngs))

    def _with_shard_column(self, table: pa.Table) -> pa.Table:
        if "shard" not in table.column_names:
            column = pa.array([self.shard] * table.num_rows, pa.int32())
            return table.append_column("shard", column)
        if any(s != self.shard for s in table.column("shard").to_pylist()):
            raise LabelSetError(f"{self._where}: images table has rows with another shard index")
        return table

    def _commit(self) -> None:
        self._parent.check_lease()
        marker = {"format_version": FORMAT_VERSION, "stage": self.stage, "shard": self.shard,
                  "rows": dict(sorted(self.rows.items())),
                  "counts": dict(sorted(self.counts.items()))}
        if self._parent.provenance is not None:
            marker["provenance"] = self._parent.provenance
        self._unit.commit(**marker)  # lists the files, sorted

    def _discard(self) -> None:
        self._unit.discard()  # the marker first, then the files; the caller sees the exception


class LabelSetWriter:
    """Writes a label set shard by shard; resumable; refuses a set made by another config."""

    def __init__(self, uri: str, fingerprint: dict, lease_id: str | None = None,
                 check: bool = True, provenance: dict | None = None):
        """Open (or start) the set at ``uri``. ``lease_id``: the run holding the output lease
        (shared/lease.py), checked before every commit. ``check=False`` attaches a worker to a
        set its driver has already opened and checked. ``provenance`` (plain JSON data, e.g.
        the identity of the models that made the output) is recorded in every shard marker
        this writer commits."""
        self.uri = str(uri).rstrip("/")
        self.fingerprint = canonical(fingerprint, self.uri)
        self.provenance = None if provenance is None else canonical(provenance, self.uri)
        self.lease_id = lease_id
        if not check:
            return
        progress = self._path("_progress.json")
        if not storage.exists(progress):
            storage.write_json(progress, {"format_version": FORMAT_VERSION,
                                          "fingerprint": self.fingerprint})
        stored = storage.read_json(progress).get("fingerprint")
        if stored != self.fingerprint:
            raise LabelSetError(
                f"{self.uri} holds a label set of another config (fingerprint differs at "
                f"{diff(stored, self.fingerprint)[:10]}); write to a new location or remove it")

    def _path(self, rel: str) -> str:
        return storage.join(self.uri, rel)

    def check_lease(self) -> None:
        """LeaseError if this writer's run no longer holds the output lease."""
        if self.lease_id is not None:
            lease.check(self.uri, self.lease_id)

    def reset_stage(self, stage: str, identity: dict, tables: tuple[str, ...] = ()) -> bool:
        """Record what ``stage``'s output depends on; if it was made from something else,
        discard its committed shards and global ``tables`` (and ``labelset.json``) first.

        Returns True when earlier output was discarded. Only files this set's markers list
        (or the named global tables) are removed."""
        identity = canonical(identity, self.uri)
        progress = self._path("_progress.json")
        doc = storage.read_json(progress)
        recorded = doc.get("stages", {}).get(check_name("stage", stage))
        if recorded == identity:
            return False
        stale = self._markers(stage)
        present = [t for t in tables if self.has_table(t)]
        if stale or present:
            self.check_lease()
            storage.remove(self._path("labelset.json"))
            for marker in stale:  # the marker first: a half-discarded shard no longer counts
                storage.remove(self._path(marker_path(stage, marker["shard"])))
                for rel in marker["files"]:
                    storage.remove(self._path(rel))
            for name in present:
                storage.remove(self._path(table_path(name)))
        doc.setdefault("stages", {})[stage] = identity
        storage.write_json(progress, doc)
        return bool(stale or present)

    def stage_rows(self, stage: str) -> dict[str, int]:
        """Rows written per table by the committed shards of ``stage`` (from the markers)."""
        total: dict[str, int] = {}
        for marker in self._markers(check_name("stage", stage)):
            for name, rows in marker.get("rows", {}).items():
                total[name] = total.get(name, 0) + int(rows)
        return total

    def iter_shard_tables(self, name: str, columns: list[str] | None = None
                          ) -> Iterator[tuple[int, pa.Table]]:
        """(shard, table) of every committed shard that wrote table ``name``, in shard order;
        one shard's table in memory at a time."""
        check_name("table", name)
        shards = sorted(m["shard"] for m in self._markers()
                        if table_path(name, m["shard"]) in m["files"])
        for shard in shards:
            yield shard, storage.read_parquet(self._path(table_path(name, shard)), columns)

    def is_done(self, stage: str, shard: int) -> bool:
        """Whether ``stage`` has committed ``shard``."""
        marker = marker_path(check_name("stage", stage), check_shard(shard))
        return storage.exists(self._path(marker))

    def done_shards(self, stage: str) -> list[int]:
        """Sorted indices of the shards ``stage`` has committed."""
        found = storage.glob(self._path(f"done/{check_name('stage', stage)}/shard-*.json"))
        return sorted(int(u.rsplit("shard-", 1)[1].split(".")[0]) for u in found)

    @contextlib.contextmanager
    def shard(self, stage: str, shard: int) -> Iterator[ShardWriter]:
        """Write one shard of ``stage``: all its files count on success, none on exception."""
        check_name("stage", stage)
        shard = check_shard(shard)
        if self.is_done(stage, shard):
            raise LabelSetError(f"{self.uri}: stage {stage!r} shard {shard} is already done "
                                "(check is_done before writing)")
        writer = ShardWriter(self, stage, shard)
        try:
            yield writer
            writer._commit()
        except BaseException:
            writer._discard()
            raise

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write a global (unsharded) table such as ``centroids`` or ``pairs``, atomically."""
        table = conform(check_name("table", name), table, f"{self.uri} global table")
        self.check_lease()
        storage.write_parquet(self._path(table_path(name)), table)

    def write_columns(self, name: str, **columns) -> None:
        """Write a global table from NumPy columns (see :meth:`ShardWriter.write_columns`)."""
        self.write_table(name, make_table(name, f"{self.uri} global table", **columns))

    def has_table(self, name: str) -> bool:
        """Whether the global table ``name`` has been written."""
        return storage.exists(self._path(table_path(check_name("table", name))))

    def _markers(self, stage: str = "*") -> list[dict]:
        uris = storage.glob(self._path(f"done/{stage}/shard-*.json"))
        return [json.loads(b) for b in storage.read_many(uris)]

    def markers(self, stage: str) -> list[dict]:
        """The commit markers of ``stage`` (shard, files, rows per table, counts), by shard."""
        return sorted(self._markers(check_name("stage", stage)), key=lambda m: m["shard"])

    def table_rows(self, name: str) -> int:
        """Row count of a global table from its Parquet footer (the rows are not read)."""
        import pyarrow.parquet as pq

        with storage.open_read(self._path(table_path(check_name("table", name)))) as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    def _committed(self, rel: str, shard: int) -> bool:
        found = storage.glob(self._path(f"done/*/{shard_name(shard)}.json"))
        return any(rel in json.loads(b)["files"] for b in storage.read_many(found))

    def read_table(self, name: str) -> pa.Table:
        """A global table, or a sharded one concatenated over its committed shards in order."""
        if self.has_table(name):
            return storage.read_parquet(self._path(table_path(name)))
        shards = sorted(m["shard"] for m in self._markers()
                        if table_path(name, m["shard"]) in m["files"])
        uris = [self._path(table_path(name, s)) for s in shards]
        return concat(name, [storage.read_parquet(u) for u in uris], self.uri)

    def read_shard_table(self, name: str, shard: int, columns: list[str] | None = None
                         ) -> pa.Table:
        """Table ``name`` (optionally only ``columns``) of one committed shard."""
        rel = table_path(check_name("table", name), check_shard(shard))
        if not self._committed(rel, shard):
            raise LabelSetError(
                f"{self.uri}: no finished stage wrote table {name!r} of shard {shard}")
        return storage.read_parquet(self._path(rel), columns)

    def read_maps_png(self, kind: str, shard: int) -> dict[str, bytes]:
        """PNG bytes by image id of a committed shard's ``kind`` maps."""
        rel = maps_path(check_name("map kind", kind), check_shard(shard))
        if not self._committed(rel, shard):
            raise LabelSetError(f"{self.uri}: no finished stage wrote {kind} maps of shard {shard}")
        return read_maps_png(self._path(rel))

    def read_maps(self, kind: str, shard: int) -> dict[str, np.ndarray]:
        """Decoded uint16 maps by image id of a committed shard."""
        return {i: decode_map(p, f"{self.uri} {kind} map {i}")
                for i, p in self.read_maps_png(kind, shard).items()}

    def finish(self, meta: dict) -> dict:
        """Write ``labelset.json`` (meta + format version + contents), marking the set complete."""
        clash = [k for k in RESERVED_META if k in meta]
        if clash:
            raise LabelSetError(f"{self.uri}: meta keys {clash} are reserved for the label set")
        contents: dict[str, Any] = {"stages": {}, "tables": {}, "maps": {}}
        owner: dict[str, str] = {}
        for m in sorted(self._markers(), key=lambda m: (m["stage"], m["shard"])):
            contents["stages"].setdefault(m["stage"], []).append(m["shard"])
            for rel in m["files"]:
                if rel in owner:
                    raise LabelSetError(f"{self.uri}: {rel} was written by stages {owner[rel]!r} "
                                        f"and {m['stage']!r}")
                owner[rel] = m["stage"]
                group, name = rel.split("/")[:2]
                contents[group].setdefault(name, []).append(m["shard"])
        if "images" not in contents["tables"]:
            raise LabelSetError(f"{self.uri}: cannot finish, no shard wrote the images table")
        for group in ("tables", "maps"):
            contents[group] = {k: sorted(v) for k, v in sorted(contents[group].items())}
        globals_ = storage.glob(self._path("tables/*.parquet"))
        contents["global_tables"] = sorted(u.rsplit("/", 1)[1].removesuffix(".parquet")
                                           for u in globals_)
        self.check_lease()
        created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        doc = {"created": created, "package_version": _package_version(),
               **meta, "format_version": FORMAT_VERSION,
               "fingerprint": self.fingerprint, "contents": contents}
        try:
            storage.write_json(self._path("labelset.json"), doc)
        except ValueError as exc:
            raise LabelSetError(f"{self.uri}: meta is not JSON serialisable: {exc}") from exc
        return doc


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dip")
    except PackageNotFoundError:
        return "unknown"
