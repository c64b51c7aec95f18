"""The on-disk format of a label set: layout, table schemas, map encoding.

Used only by shared/labelset.py (writer) and shared/labelset_reader.py (reader); together they
are the only code that knows the layout. Under the label set URI (any fsspec URI):

    labelset.json                       meta (format version, config, counts, contents, ...);
                                        written LAST: its presence means the set is complete
    _progress.json                      fingerprint of the producing config, written at first open
    _lease.json                         the writing run (owner, heartbeat) while one runs
    tables/<name>/shard-00000.parquet   per-shard tables: images, segments, globals, classes,
                                        confusion (pseudo-labels against ground truth, if any)
    tables/<name>.parquet               global tables: centroids, pairs
    maps/<kind>/shard-00000.parquet     per-image maps of a shard, kind "segments" | "labels":
                                        columns image_id, png (lossless 16-bit greyscale PNG bytes)
    done/<stage>/shard-00000.json       a stage's commit marker for a shard, listing its files,
                                        the row count of each table it wrote and (optionally)
                                        the provenance of its writer (e.g. the segmenter's identity)

A shard's output counts only once its done-marker exists, and the marker is written after all
of its files. An exception inside ``writer.shard(...)`` removes every file written for it; a
crashed process's leftovers are overwritten when the shard is retried and are never read, since
readers go through the markers (the writer) or the contents recorded in ``labelset.json``.
Parquet is written deterministically, so a rerun produces the same bytes. Nothing here depends on
the encoder that will be trained on the set.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared import storage
from shared.images import decode_png

FORMAT_VERSION = 1
MAP_KINDS = ("segments", "labels")
RESERVED_META = ("format_version", "fingerprint", "contents")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_FEATURE = pa.list_(pa.float32())
SCHEMAS: dict[str, pa.Schema] = {
    "images": pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("width", pa.int32()),
                         ("height", pa.int32()), ("status", pa.string()), ("error", pa.string()),
                         ("shard", pa.int32())]),
    "segments": pa.schema([("image_id", pa.string()), ("segment_id", pa.int32()),
                           ("area", pa.float32()), ("feature", _FEATURE)]),
    "globals": pa.schema([("image_id", pa.string()), ("feature", _FEATURE)]),
    "classes": pa.schema([("image_id", pa.string()), ("class_id", pa.int32()),
                          ("area", pa.float32())]),
    "pairs": pa.schema([("query_id", pa.string()), ("positive_id", pa.string()),
                        ("class_id", pa.int32()), ("query_area", pa.float32()),
                        ("positive_area", pa.float32())]),
    "centroids": pa.schema([("class_id", pa.int32()), ("feature", _FEATURE)]),
    "confusion": pa.schema([("true_class", pa.int32()), ("pred_class", pa.int32()),
                            ("pixels", pa.int64())]),
}


class LabelSetError(Exception):
    """A label set is missing, incomplete, inconsistent, or was asked for something it lacks."""


# --------------------------------------------------------------------------- layout


def shard_name(shard: int) -> str:
    """``shard-00042``: zero-padded so that names sort in shard order."""
    return f"shard-{int(shard):05d}"


def table_path(name: str, shard: int | None = None) -> str:
    """Relative path of a global table (``shard=None``) or of one shard of a sharded table."""
    if shard is None:
        return f"tables/{name}.parquet"
    return f"tables/{name}/{shard_name(shard)}.parquet"


def maps_path(kind: str, shard: int) -> str:
    """Relative path of the object holding one shard's ``kind`` maps."""
    return f"maps/{kind}/{shard_name(shard)}.parquet"


def marker_path(stage: str, shard: int) -> str:
    """Relative path of the done-marker of (stage, shard)."""
    return f"done/{stage}/{shard_name(shard)}.json"


def check_name(what: str, name: str) -> str:
    """``name`` if it is safe as one path component, else LabelSetError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise LabelSetError(f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def check_shard(shard: int) -> int:
    """``shard`` as an int if it is a non-negative integer, else LabelSetError."""
    if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or shard < 0:
        raise LabelSetError(f"shard index must be a non-negative integer, got {shard!r}")
    return int(shard)


# --------------------------------------------------------------------------- tables and maps


def conform(name: str, table: pa.Table, where: str) -> pa.Table:
    """Check a known table against its schema and cast its columns; extra columns are kept."""
    schema = SCHEMAS.get(name)
    if schema is None:
        return table
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise LabelSetError(f"{where}: table {name!r} lacks columns {missing} (schema: {schema})")
    columns, fields = [], []
    for field in schema:
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise LabelSetError(f"{where}: table {name!r} column {field.name!r} has type "
                                    f"{column.type}, expected {field.type}: {exc}") from exc
        columns.append(column)
        fields.append(pa.field(field.name, column.type))
    for extra in [c for c in table.column_names if c not in schema.names]:
        columns.append(table.column(extra))
        fields.append(table.schema.field(extra))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def feature_column(features: np.ndarray) -> pa.ListArray:
    """(N, D) float32 rows as a list<float32> column, without a Python object per row."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise LabelSetError(f"features must be (N, D), got shape {x.shape}")
    offsets = np.arange(x.shape[0] + 1, dtype=np.int64) * x.shape[1]  # row i: [i*D, (i+1)*D)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(x.reshape(-1))).cast(_FEATURE)


def feature_matrix(column: pa.ChunkedArray | pa.Array, where: str = "features") -> np.ndarray:
    """A list<float32> column of equal-length rows as a float32 (N, D) array (one copy at most)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.list_value_length(column)
    low, high = pc.min_max(lengths).values()
    if low.as_py() != high.as_py() or column.null_count:
        raise LabelSetError(f"{where}: rows have different lengths ({low}..{high}) or nulls")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, np.float32).reshape(len(column), int(high.as_py()))


def make_table(name: str, where: str, **columns: Any) -> pa.Table:
    """Table ``name`` of the contract from NumPy / list columns; 2-D arrays fill feature columns."""
    schema = SCHEMAS[name]
    if set(columns) != set(schema.names):
        raise LabelSetError(f"{where}: table {name!r} takes columns {schema.names}, "
                            f"got {sorted(columns)}")
    arrays = []
    for field in schema:
        value = columns[field.name]
        if field.type == _FEATURE:
            arrays.append(feature_column(value))
        elif isinstance(value, (pa.Array, pa.ChunkedArray)):
            arrays.append(value.cast(field.type))
        else:
            arrays.append(pa.array(value, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def check_png16(image_id: str, data: bytes, where: str) -> bytes:
    """Check that ``data`` starts like a 16-bit greyscale PNG (IHDR bit depth 16, colour type 0)."""
    data = bytes(data)
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise LabelSetError(f"{where}: map of image {image_id!r} is not PNG data")
    if data[24] != 16 or data[25] != 0:
        raise LabelSetError(f"{where}: map of image {image_id!r} is a PNG with bit depth "
                            f"{data[24]} and colour type {data[25]}; expected 16-bit greyscale")
    return data


def to_uint16(image_id: str, array: np.ndarray, where: str) -> np.ndarray:
    """A 2-D integer map with values in 0..65535 as uint16, else LabelSetError."""
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype.kind not in "ui":
        raise LabelSetError(f"{where}: map of image {image_id!r} must be a 2-D integer array, "
                            f"got shape {array.shape} dtype {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) > 65535):
        raise LabelSetError(f"{where}: map of image {image_id!r} has values outside 0..65535")
    return array.astype(np.uint16)


def maps_table(maps_png: dict[str, bytes]) -> pa.Table:
    """The maps object of a shard: columns image_id, png; rows sorted by image id."""
    ids = sorted(maps_png)  # fixed row order: same maps, same bytes
    return pa.table({"image_id": pa.array(ids, pa.string()),
                     "png": pa.array([maps_png[i] for i in ids], pa.binary())})


def read_maps_png(uri: str) -> dict[str, bytes]:
    """PNG bytes by image id from one maps object."""
    table = storage.read_parquet(uri)
    return dict(zip(table.column("image_id").to_pylist(), table.column("png").to_pylist(),
                    strict=True))


def decode_map(data: bytes, name: str) -> np.ndarray:
    """A stored map back as uint16 (H, W)."""
    return decode_png(data, name=name).astype(np.uint16, copy=False)


def concat(name: str, tables: list[pa.Table], where: str) -> pa.Table:
    """Shard tables concatenated in the given order; the empty schema table if none."""
    if tables:
        return pa.concat_tables(tables, promote_options="permissive")
    if name in SCHEMAS:
        return SCHEMAS[name].empty_table()
    raise LabelSetError(f"{where}: no finished shard wrote table {name!r}")


def canonical(fingerprint: dict, uri: str) -> dict:
    """The fingerprint as it reads back from JSON, so stored and given ones compare equal."""
    try:
        return json.loads(json.dumps(fingerprint, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise LabelSetError(f"{uri}: fingerprint must be plain JSON data: {exc}") from exc


def diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "<root>"]
