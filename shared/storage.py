"""One way to read, list, check and write any fsspec URI: local path, file://, s3://, memory://.

Every write is atomic: a reader sees the old object, the new object, or nothing, never a
half-written one. Local files are written to a temporary file in the same folder and renamed
into place; other stores get the finished bytes in a single put (S3: one PUT or one completed
multipart upload), so an exception while writing leaves no object behind.

S3 endpoint and credentials come only from the environment: the endpoint from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, credentials from the standard AWS chain
(``AWS_ACCESS_KEY_ID`` ..., profiles, instance roles). Nothing here writes or logs them;
``storage_environment()`` hands them to Ray workers (``runtime_env={"env_vars": ...}``).

Failures follow ``shared.storage_policy``: transient ones are retried within bounded
timeouts and a deadline (``DIP_STORAGE_*`` variables; on S3 by botocore, request by request,
see ``shared.storage_s3``), permanent ones are raised at once, and every error names the URI.
Its public names (``StorageError`` and subclasses, ``settings``, ``retry``, ``is_transient``,
``is_environment_error``, ...) are importable from here as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from shared import storage_s3

# Re-exported: callers write storage.StorageError, storage.retry, storage.settings() and so on.
# The policy reads its DEFAULT_* from its own module at every call: patch them there.
from shared.storage_policy import (  # noqa: F401
    CLIENT_ATTEMPTS_ATTRIBUTE,
    DEFAULT_ATTEMPTS,
    DEFAULT_BASE_DELAY,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DEADLINE,
    DEFAULT_MAX_DELAY,
    DEFAULT_READ_TIMEOUT,
    StorageConfigError,
    StorageCredentialsError,
    StorageError,
    StorageNotFoundError,
    StoragePermissionError,
    StorageSettings,
    botocore_backoff,
    client_attempts,
    is_environment_error,
    is_transient,
    retry,
    settings,
    storage_environment,
    worst_case_seconds,
)
from shared.storage_policy import call as _call

# --------------------------------------------------------------------------- filesystems


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of ``uri``; S3 endpoint and timeouts read now."""
    uri = str(uri)
    if fsspec.utils.get_protocol(uri) in ("s3", "s3a"):
        fs = storage_s3.filesystem()  # botocore retries its requests, within our deadline
        return fs, fs._strip_protocol(uri)
    return fsspec.core.url_to_fs(uri)


def _to_uri(template: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn an in-filesystem ``path`` back into a URI of the same style as ``template``."""
    if isinstance(fs, LocalFileSystem):
        return f"file://{path}" if str(template).startswith("file://") else path
    if isinstance(fs, MemoryFileSystem):  # its paths are rooted ("/x/y"); keep "memory://x/y"
        return f"memory://{path.lstrip('/')}"
    return fs.unstrip_protocol(path)


def resolve(uri: str) -> str:
    """``uri`` as listings name it: local paths made absolute, no trailing slash, same style."""
    fs, path = url_to_fs(uri)
    return _to_uri(uri, fs, path)


def join(uri: str, *parts: str) -> str:
    """``uri/part1/part2`` with exactly one slash between pieces."""
    out = str(uri).rstrip("/") if str(uri) not in ("/", "") else str(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if not out.endswith("/") else f"{out}{part}"
    return out



def _invalidate(fs: fsspec.AbstractFileSystem, path: str) -> None:
    fs.invalidate_cache(path)


# --------------------------------------------------------------------------- checks, listings


def exists(uri: str) -> bool:
    """Whether an object or folder exists at ``uri``."""
    fs, path = url_to_fs(uri)
    return _call("exists", uri, fs.exists, path)


def kind(uri: str) -> str | None:
    """"file", "directory" or None when nothing is there. Unlike fsspec's isfile/isdir, a
    failure other than not-found is raised (after retries), never reported as "not there"."""
    fs, path = url_to_fs(uri)
    try:
        return _call("info", uri, fs.info, path)["type"]
    except FileNotFoundError:
        return None


def isdir(uri: str) -> bool:
    """Whether ``uri`` is a folder (on S3: a prefix with objects under it, or a bucket)."""
    return kind(uri) == "directory"


def isfile(uri: str) -> bool:
    """Whether ``uri`` is an object / regular file."""
    return kind(uri) == "file"


def ls(uri: str) -> list[str]:
    """Sorted full URIs of the direct children of folder ``uri``; [] when it does not exist."""
    fs, path = url_to_fs(uri)
    try:
        names = _call("ls", uri, fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    own = path.rstrip("/")
    return sorted(_to_uri(uri, fs, n) for n in names if n.rstrip("/") != own)


def find(uri: str) -> list[str]:
    """Sorted full URIs of every file below folder ``uri`` (recursive); [] when it is missing.

    The URIs are built from the listed paths as they are, so S3 keys holding ``//`` or ``..``
    keep naming exactly their object.
    """
    fs, path = url_to_fs(uri)
    try:
        names = _call("find", uri, fs.find, path)
    except FileNotFoundError:
        return []
    return sorted(_to_uri(uri, fs, n) for n in names)


def glob(pattern_uri: str) -> list[str]:
    """Sorted full URIs matching a glob pattern (``*``, ``**``, ``?``, ``[..]``)."""
    fs, path = url_to_fs(pattern_uri)
    return sorted(_to_uri(pattern_uri, fs, n) for n in _call("glob", pattern_uri, fs.glob, path))


def makedirs(uri: str) -> None:
    """Create folder ``uri`` and its parents (no-op on object stores beyond the bucket)."""
    fs, path = url_to_fs(uri)
    _call("makedirs", uri, fs.makedirs, path, exist_ok=True)


def size(uri: str) -> int:
    """Size of the object at ``uri`` in bytes."""
    fs, path = url_to_fs(uri)
    return int(_call("size", uri, fs.size, path))


def remove(uri: str, recursive: bool = False) -> None:
    """Delete the object (or, with ``recursive``, the folder) at ``uri``; no error if missing."""
    fs, path = url_to_fs(uri)
    try:
        _call("remove", uri, fs.rm, path, recursive=recursive)
    except FileNotFoundError:
        pass
    finally:
        _invalidate(fs, path)


# --------------------------------------------------------------------------- reads


def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri``."""
    fs, path = url_to_fs(uri)
    return _call("read", uri, fs.cat_file, path)


def read_many(uris: list[str]) -> list[bytes]:
    """The objects at ``uris`` (same store), fetched concurrently where the store allows."""
    if not uris:
        return []
    fs, _ = url_to_fs(uris[0])
    paths = [url_to_fs(u)[1] for u in uris]
    out = _call("read", f"{uris[0]} (and {len(uris) - 1} more)", fs.cat, paths, on_error="raise")
    if not isinstance(out, dict):  # a single path comes back as bytes
        out = {paths[0]: out}
    return [out[p] for p in paths]


def read_text(uri: str) -> str:
    """The object at ``uri`` decoded as UTF-8."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StorageError(f"read {uri}: not UTF-8 text ({exc})") from exc


def read_json(uri: str) -> Any:
    """The JSON document at ``uri``."""
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"read {uri}: not valid JSON ({exc})") from exc


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The Parquet table at ``uri`` (optionally only ``columns``)."""
    data = read_bytes(uri)
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, ValueError) as exc:
        raise StorageError(f"read {uri}: not a readable Parquet file ({exc})") from exc


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[Any]:
    """Open ``uri`` for streaming binary reads (a Parquet footer, a hash of a large file)."""
    fs, path = url_to_fs(uri)
    handle = _call("open", uri, fs.open, path, "rb")
    with handle:
        yield handle


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_open(uri: str, mode: str = "wb") -> Iterator[Any]:
    """Write ``uri`` through a file object; the object appears only if the block succeeds."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    encoding = "utf-8" if mode == "w" else None
    fs, path = url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        folder, name = os.path.split(path)
        _call("makedirs", uri, os.makedirs, folder or ".", exist_ok=True)
        # same folder, so the rename is atomic; "x" respects the umask, unlike mkstemp's 0600
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with _call("write", uri, open, tmp, "x" + mode[1:], encoding=encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            _call("write", uri, os.replace, tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    # Other stores: spool to a local temp file, then one upload at the end.
    with tempfile.TemporaryDirectory(prefix="dip-upload-") as tmpdir:
        tmp = os.path.join(tmpdir, "object")
        with open(tmp, "x" + mode[1:], encoding=encoding) as handle:
            yield handle
        _call("write", uri, fs.put_file, tmp, path)
        _invalidate(fs, path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically."""
    fs, path = url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        with atomic_open(uri, "wb") as handle:
            handle.write(data)
        return
    _call("write", uri, fs.pipe_file, path, bytes(data))  # one PUT / one completed upload
    _invalidate(fs, path)


def write_text(uri: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``uri`` atomically."""
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``uri`` atomically; sorted keys give stable bytes."""
    write_text(uri, json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise ``table`` to Parquet deterministically (same table, same bytes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=True,
                   store_schema=True, use_dictionary=True)
    return sink.getvalue().to_pybytes()


def write_parquet(uri: str, table: pa.Table) -> None:
    """Write ``table`` to ``uri`` as Parquet, atomically and deterministically."""
    write_bytes(uri, parquet_bytes(table))
