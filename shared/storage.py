"""One way to read, list, check and write any fsspec URI: local path, file://, s3://, memory://.

Every write is atomic: a reader sees the old object, the new object, or nothing, never a
half-written one. Local files are written to a temporary file in the same folder and renamed
into place; other stores get the finished bytes in a single put (S3: one PUT or one completed
multipart upload), so an exception while writing leaves no object behind.

S3 endpoint and credentials come only from the environment: the endpoint from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, credentials from the standard AWS chain
(``AWS_ACCESS_KEY_ID`` ..., profiles, instance roles). Nothing here writes or logs them;
``storage_environment()`` hands them to Ray workers (``runtime_env={"env_vars": ...}``).

Transient failures (connection errors, timeouts, throttling, 5xx) are retried with exponential
backoff; permanent ones (not found, permission denied) are raised at once. Errors name the URI.
``is_environment_error`` tells a failure of the environment (network, throttling, credentials,
disk) from a failure of the object itself (missing, undecodable).

Bounds, read from the environment at every call (workers and tests may change them):

- ``DIP_STORAGE_CONNECT_TIMEOUT`` (5 s): opening a connection. A healthy endpoint answers in
  milliseconds; 5 s still covers two lost SYNs (Linux resends after 1 s and 3 s).
- ``DIP_STORAGE_READ_TIMEOUT`` (15 s): the longest silence while waiting for response bytes.
  It does not limit a whole transfer, so large objects are unaffected; S3's first byte
  typically comes within 100-200 ms. 5 s and 15 s are also s3fs's own defaults.
- ``DIP_STORAGE_ATTEMPTS`` (5): tries per operation, enough to ride out a burst of throttling.
- ``DIP_STORAGE_DEADLINE`` (60 s): the budget of one operation, attempts and backoff together.
  A retry starts only if it can end within the budget, counting one attempt as the larger of
  connect + read timeout and the longest attempt so far. A stalled endpoint thus fails an
  operation after about 46 s (three 15 s silences; a fourth could not end in time) and never
  after more than 60 s, where the old fixed 60 s x 5 attempts took five minutes.
  ``worst_case_seconds()`` computes the bound of the current settings.
- ``DIP_STORAGE_BASE_DELAY`` (0.2 s), ``DIP_STORAGE_MAX_DELAY`` (5 s): the backoff.

The bounds hold per HTTP request: an operation of many requests (a recursive listing, a
multipart upload) is bounded request by request, and a server that sends a byte within every
read timeout is never cut off.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

T = TypeVar("T")

# Used when the matching DIP_STORAGE_* variable is unset (see the module docstring).
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 15.0
DEFAULT_ATTEMPTS = 5
DEFAULT_DEADLINE = 60.0
DEFAULT_BASE_DELAY = 0.2
DEFAULT_MAX_DELAY = 5.0

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
# Credentials that are missing, malformed, expired or refused by the server.
_CREDENTIAL_CLASS_NAMES = {
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "NoAuthTokenError", "TokenRetrievalError", "UnauthorizedSSOTokenError", "SSOTokenLoadError",
    "InvalidConfigError", "ProfileNotFound",
}
_CREDENTIAL_S3_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException",
    "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId", "UnrecognizedClientException",
    "RequestExpired", "AuthFailure", "MissingAuthenticationToken", "InvalidSecurity",
    "RequestTimeTooSkewed",
}
_DENIED_S3_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "NotSignedUp"}
# 403s that are about the object itself: an archived object must be restored first.
_OBJECT_S3_CODES = {"InvalidObjectState"}
_NOT_FOUND_S3_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NoSuchUpload", "NotFound",
                       "404"}
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EMFILE, errno.ENFILE}
# What Ray workers need to reach the same storage as the driver (see storage_environment).
_FORWARDED_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
    "AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE",
)


class StorageError(Exception):
    """A storage operation failed; the message names the URI and the cause."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or folder does not exist (also a FileNotFoundError)."""


class StoragePermissionError(StorageError, PermissionError):
    """Access was denied (also a PermissionError)."""


class StorageCredentialsError(StoragePermissionError):
    """Storage credentials are missing, incomplete, expired or refused."""


class StorageConfigError(StorageError, ValueError):
    """A DIP_STORAGE_* variable holds an unusable value (also a ValueError)."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class StorageSettings:
    """Timeouts (seconds) and retry budget of storage operations."""

    connect_timeout: float
    read_timeout: float
    attempts: int
    deadline: float
    base_delay: float
    max_delay: float

    @property
    def attempt_seconds(self) -> float:
        """The longest one request can take before a timeout ends it."""
        return self.connect_timeout + self.read_timeout


def _env_number(name: str, default: float, whole: bool = False, zero_ok: bool = False) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = "a whole number" if whole else "a number of seconds"
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise StorageConfigError(f"{name}={raw!r} is not {kind}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise StorageConfigError(f"{name}={raw!r} must be {kind} {'>= 0' if zero_ok else '> 0'}")
    return value


def settings() -> StorageSettings:
    """The storage settings of this process now: DIP_STORAGE_* variables, else the defaults."""
    return StorageSettings(
        connect_timeout=_env_number("DIP_STORAGE_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT),
        read_timeout=_env_number("DIP_STORAGE_READ_TIMEOUT", DEFAULT_READ_TIMEOUT),
        attempts=_env_number("DIP_STORAGE_ATTEMPTS", DEFAULT_ATTEMPTS, whole=True),
        deadline=_env_number("DIP_STORAGE_DEADLINE", DEFAULT_DEADLINE),
        base_delay=_env_number("DIP_STORAGE_BASE_DELAY", DEFAULT_BASE_DELAY, zero_ok=True),
        max_delay=_env_number("DIP_STORAGE_MAX_DELAY", DEFAULT_MAX_DELAY, zero_ok=True),
    )


def worst_case_seconds() -> float:
    """How long one single-request operation can take at most against a stalled endpoint.

    Each attempt ends within connect + read timeout; with backoff at its largest, A attempts
    take ``A * attempt + sum(delays)``; and no retry starts unless it ends within the deadline.
    """
    s = settings()
    backoff = sum(min(s.max_delay, s.base_delay * 2**i) for i in range(s.attempts - 1))
    return min(s.attempts * s.attempt_seconds + backoff, max(s.attempt_seconds, s.deadline))


def storage_environment() -> dict[str, str]:
    """The storage variables set in this process (credentials, region, endpoint, DIP_STORAGE_*).

    Meant for ``runtime_env={"env_vars": storage_environment()}`` so that Ray workers reach the
    same storage as the driver. Holds secrets: never log or write it. Empty values are left out
    so that they cannot mask a worker's own configuration.
    """
    return {key: value for key, value in sorted(os.environ.items())
            if value and (key in _FORWARDED_VARIABLES or key.startswith("DIP_STORAGE_"))}


# --------------------------------------------------------------------------- filesystems


def _s3_endpoint() -> str | None:
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(key, "").strip()
        if value:
            return value
    return None


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of ``uri``; S3 endpoint and timeouts read now."""
    uri = str(uri)
    protocol = fsspec.utils.get_protocol(uri)
    if protocol in ("s3", "s3a"):
        # Endpoint and timeouts are constructor arguments, so fsspec's instance cache gives a
        # fresh filesystem when the environment changes them. Listings are never cached:
        # another process may have written since. Retries are ours alone (see retry()).
        s = settings()
        fs = fsspec.filesystem(
            "s3",
            client_kwargs={"endpoint_url": _s3_endpoint()},
            config_kwargs={"retries": {"total_max_attempts": 1},
                           "connect_timeout": s.connect_timeout, "read_timeout": s.read_timeout},
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


# --------------------------------------------------------------------------- classification


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _named(exc: BaseException, names: set[str]) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def _s3_error(exc: BaseException) -> tuple[str, int] | None:
    """(code, HTTP status) of the first botocore ClientError in the cause chain, if any."""
    for err in _chain(exc):
        response = getattr(err, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return str(response["Error"].get("Code", "")), int(status)
    return None


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
        if _named(err, _TRANSIENT_CLASS_NAMES):
            return True
        if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def _is_credential_error(exc: BaseException) -> bool:
    s3 = _s3_error(exc)
    if s3 is not None:
        return s3[0] in _CREDENTIAL_S3_CODES
    return any(_named(err, _CREDENTIAL_CLASS_NAMES) for err in _chain(exc))


def _is_denied(exc: BaseException) -> bool:
    """Credentials or permissions refused the operation (not the object's own state)."""
    s3 = _s3_error(exc)
    if s3 is not None:
        code, status = s3
        if code in _OBJECT_S3_CODES:
            return False
        return code in _CREDENTIAL_S3_CODES | _DENIED_S3_CODES or status in (401, 403)
    return any(isinstance(err, PermissionError) or _named(err, _CREDENTIAL_CLASS_NAMES)
               for err in _chain(exc))


def _is_not_found(exc: BaseException) -> bool:
    s3 = _s3_error(exc)
    if s3 is not None and (s3[0] in _NOT_FOUND_S3_CODES or s3[1] == 404):
        return True
    return any(isinstance(err, FileNotFoundError) for err in _chain(exc))


def is_environment_error(exc: BaseException) -> bool:
    """True when a failure is not the object's own fault, so a rerun may well succeed.

    Transient failures (``is_transient``), missing/invalid/expired credentials, denied access,
    a full disk or quota, a read-only filesystem, unusable DIP_STORAGE_* settings, and
    StorageErrors caused by any of them. False for not-found and for failures that are not
    storage failures (e.g. a decoder's ValueError).
    """
    if _is_not_found(exc):
        return False
    if is_transient(exc) or _is_denied(exc):
        return True
    return any(isinstance(err, StorageConfigError)
               or (isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS)
               for err in _chain(exc))


# --------------------------------------------------------------------------- retries


def retry(
    fn: Callable[..., T],
    *args: Any,
    attempts: int | None = None,
    base_delay: float | None = None,
    max_delay: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    **kwargs: Any,
) -> T:
    """Call ``fn(*args, **kwargs)``; retry transient errors with exponential backoff and jitter.

    Delay before retry i (0-based) is ``min(max_delay, base_delay * 2**i)`` times U(0.5, 1).
    A retry starts only if it can end within ``deadline`` seconds of the first call, counting
    it as long as the larger of connect + read timeout and the longest attempt so far. Unset
    arguments come from ``settings()``. Permanent errors and the last transient error are
    raised unchanged.
    """
    s = settings()
    attempts = s.attempts if attempts is None else attempts
    base_delay = s.base_delay if base_delay is None else base_delay
    max_delay = s.max_delay if max_delay is None else max_delay
    deadline = s.deadline if deadline is None else deadline
    if attempts < 1:
        raise ValueError(f"retry attempts must be >= 1, got {attempts}")
    start = clock()
    longest = s.attempt_seconds
    for i in range(attempts):
        began = clock()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            now = clock()
            longest = max(longest, now - began)
            delay = min(max_delay, base_delay * 2**i) * (0.5 + 0.5 * random.random())
            over_budget = now - start + delay + longest > deadline
            if i == attempts - 1 or over_budget or not is_transient(exc):
                raise
            sleep(delay)
    raise AssertionError("unreachable")


def _call(op: str, uri: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``retry(fn, ...)`` with failures re-raised as StorageError subclasses naming ``uri``."""
    tries = 0

    def attempt() -> T:
        nonlocal tries
        tries += 1
        return fn(*args, **kwargs)

    start = time.monotonic()
    try:
        return retry(attempt)
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageNotFoundError(errno.ENOENT, f"{op} {uri}: not found") from exc
    except Exception as exc:
        if _is_credential_error(exc):
            # only the kind of failure: credential errors may quote what they were given
            s3 = _s3_error(exc)
            reason = s3[0] if s3 is not None else type(exc).__name__
            message = (f"{op} {uri}: storage credentials are missing or invalid ({reason}); "
                       "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, "
                       "AWS_PROFILE or the instance role")
            raise StorageCredentialsError(errno.EACCES, message) from exc
        if isinstance(exc, PermissionError) or _is_denied(exc):  # a HEAD's 403 has no code
            message = f"{op} {uri}: permission denied ({exc})"
            raise StoragePermissionError(errno.EACCES, message) from exc
        if isinstance(exc, OSError) or is_transient(exc):
            extra = ""
            if is_transient(exc):
                elapsed = time.monotonic() - start
                extra = f" (gave up after {tries} attempt{'s' * (tries != 1)} in {elapsed:.1f} s)"
            raise StorageError(f"{op} {uri} failed{extra}: {type(exc).__name__}: {exc}") from exc
        raise


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
