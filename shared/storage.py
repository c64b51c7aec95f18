"""One way to read, list, check and write any fsspec URI: local path, file://, s3://, memory://.

Every write is atomic: a reader sees the old object, the new object, or nothing, never a
half-written one. Local files are written to a temporary file in the same folder and renamed
into place; other stores get the finished bytes in a single put (S3: one PUT or one completed
multipart upload), so an exception while writing leaves no object behind.

S3 endpoint and credentials come only from the environment: the endpoint from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, credentials from the standard AWS chain
(``AWS_ACCESS_KEY_ID`` ..., profiles, instance roles). Nothing here writes or logs them.

Transient failures (connection errors, timeouts, throttling, 5xx) are retried with exponential
backoff; permanent ones (not found, permission denied) are raised at once. Errors name the URI.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

T = TypeVar("T")

# Retry policy; the environment can change it (e.g. more attempts against a flaky endpoint).
DEFAULT_ATTEMPTS = int(os.environ.get("DIP_STORAGE_ATTEMPTS", "5"))
DEFAULT_BASE_DELAY = float(os.environ.get("DIP_STORAGE_BASE_DELAY", "0.2"))
DEFAULT_MAX_DELAY = float(os.environ.get("DIP_STORAGE_MAX_DELAY", "5.0"))

_TRANSIENT_ERRNOS = {
    errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ECONNREFUSED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH,
    getattr(errno, "EREMOTEIO", 121),
}
_TRANSIENT_S3_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "ServiceUnavailableException",
}
_TRANSIENT_CLASS_NAMES = {
    # botocore HTTPClientError family, aiohttp connection/payload errors, fsspec timeouts
    "HTTPClientError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
    "ConnectionClosedError", "ClientConnectionError", "ClientPayloadError",
    "ServerDisconnectedError",
    "FSTimeoutError", "IncompleteRead", "ResponseParserError",
}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              FileExistsError)


class StorageError(Exception):
    """A storage operation failed; the message names the URI and the cause."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or folder does not exist (also a FileNotFoundError)."""


class StoragePermissionError(StorageError, PermissionError):
    """Access was denied (also a PermissionError)."""


# --------------------------------------------------------------------------- filesystems


def _s3_endpoint() -> str | None:
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(key, "").strip()
        if value:
            return value
    return None


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of ``uri``; S3 endpoint read from the env now."""
    uri = str(uri)
    protocol = fsspec.utils.get_protocol(uri)
    if protocol in ("s3", "s3a"):
        # The endpoint is part of the constructor arguments, so fsspec's instance cache gives a
        # fresh filesystem when the environment points somewhere else. Listings are never cached:
        # another process may have written since. Retries are ours alone (see retry()).
        fs = fsspec.filesystem(
            "s3",
            client_kwargs={"endpoint_url": _s3_endpoint()},
            config_kwargs={"retries": {"total_max_attempts": 1},
                           "connect_timeout": 10, "read_timeout": 60},
            use_listings_cache=False,
        )
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
        return fs, fs._strip_protocol(uri)
    return fsspec.core.url_to_fs(uri)


def _to_uri(template: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn an in-filesystem ``path`` back into a URI of the same style as ``template``."""
    if isinstance(fs, LocalFileSystem):
        return f"file://{path}" if str(template).startswith("file://") else path
    if isinstance(fs, MemoryFileSystem):  # its paths are rooted ("/x/y"); keep "memory://x/y"
        return f"memory://{path.lstrip('/')}"
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    """``uri/part1/part2`` with exactly one slash between pieces."""
    out = str(uri).rstrip("/") if str(uri) not in ("/", "") else str(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}" if not out.endswith("/") else f"{out}{part}"
    return out


# --------------------------------------------------------------------------- retries


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: connection drops, timeouts, throttling, 5xx."""
    if isinstance(exc, _PERMANENT):
        return False
    for err in _chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and "Error" in response:  # botocore ClientError
            code = str(response["Error"].get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in _TRANSIENT_S3_CODES or int(status) >= 500
        if isinstance(err, (TimeoutError, ConnectionError)):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(err).__mro__):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def retry(
    fn: Callable[..., T],
    *args: Any,
    attempts: int | None = None,
    base_delay: float | None = None,
    max_delay: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)``; retry transient errors with exponential backoff and jitter.

    Delay before retry i (0-based) is ``min(max_delay, base_delay * 2**i)`` times U(0.5, 1).
    Permanent errors and the last transient error are raised unchanged.
    """
    attempts = DEFAULT_ATTEMPTS if attempts is None else attempts
    base_delay = DEFAULT_BASE_DELAY if base_delay is None else base_delay
    max_delay = DEFAULT_MAX_DELAY if max_delay is None else max_delay
    if attempts < 1:
        raise ValueError(f"retry attempts must be >= 1, got {attempts}")
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if i == attempts - 1 or not is_transient(exc):
                raise
            sleep(min(max_delay, base_delay * 2**i) * (0.5 + 0.5 * random.random()))
    raise AssertionError("unreachable")


def _call(op: str, uri: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``retry(fn, ...)`` with failures re-raised as StorageError subclasses naming ``uri``."""
    try:
        return retry(fn, *args, **kwargs)
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageNotFoundError(errno.ENOENT, f"{op} {uri}: not found") from exc
    except PermissionError as exc:
        message = f"{op} {uri}: permission denied ({exc})"
        raise StoragePermissionError(errno.EACCES, message) from exc
    except Exception as exc:
        if isinstance(exc, OSError) or is_transient(exc):
            extra = f" (gave up after {DEFAULT_ATTEMPTS} attempts)" if is_transient(exc) else ""
            raise StorageError(f"{op} {uri} failed{extra}: {type(exc).__name__}: {exc}") from exc
        raise


def _invalidate(fs: fsspec.AbstractFileSystem, path: str) -> None:
    fs.invalidate_cache(path)


# --------------------------------------------------------------------------- checks, listings


def exists(uri: str) -> bool:
    """Whether an object or folder exists at ``uri``."""
    fs, path = url_to_fs(uri)
    return _call("exists", uri, fs.exists, path)


def _kind(uri: str) -> str | None:
    """"file", "directory" or None when nothing is there. Unlike fsspec's isfile/isdir, a
    failure other than not-found is raised (after retries), never reported as "not there"."""
    fs, path = url_to_fs(uri)
    try:
        return _call("info", uri, fs.info, path)["type"]
    except FileNotFoundError:
        return None


def isdir(uri: str) -> bool:
    """Whether ``uri`` is a folder (on S3: a prefix with objects under it, or a bucket)."""
    return _kind(uri) == "directory"


def isfile(uri: str) -> bool:
    """Whether ``uri`` is an object / regular file."""
    return _kind(uri) == "file"


def ls(uri: str) -> list[str]:
    """Sorted full URIs of the direct children of folder ``uri``; [] when it does not exist."""
    fs, path = url_to_fs(uri)
    try:
        names = _call("ls", uri, fs.ls, path, detail=False)
    except FileNotFoundError:
        return []
    own = path.rstrip("/")
    return sorted(_to_uri(uri, fs, n) for n in names if n.rstrip("/") != own)


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
def open_read(uri: str, mode: str = "rb") -> Iterator[Any]:
    """Open ``uri`` for streaming reads (``"rb"`` or ``"r"``); writes go through atomic_open."""
    if mode not in ("rb", "r"):
        raise ValueError(f"open_read mode must be 'rb' or 'r', got {mode!r}; "
                         "write with atomic_open")
    fs, path = url_to_fs(uri)
    handle = _call("open", uri, fs.open, path, "rb")
    with handle:
        yield io.TextIOWrapper(handle, encoding="utf-8") if mode == "r" else handle


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
