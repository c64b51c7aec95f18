"""The failure policy of shared.storage: errors, bounds, retries, and what a failure means.

Transient failures (connection errors, timeouts, throttling, 5xx) are retried with exponential
backoff; permanent ones (not found, permission denied) are raised at once. Errors name the URI.
``is_environment_error`` tells a failure of the environment (network, throttling, credentials,
disk) from a failure of the object itself (missing, undecodable).

Who retries: on S3, botocore, request by request (``standard`` mode, see shared.storage_s3), so
one throttled page of a listing or part of an upload is sent again alone; its retry quota stops
retrying when most requests of a client fail. It has no time budget: shared.storage_s3 adds the
deadline below as a ``needs-retry`` handler. s3fs's loop stays off (it would repeat botocore's
attempts). ``retry`` covers what botocore never sees: other stores, and an S3 body that breaks
after its response began; it never repeats a request botocore retried.

Bounds, read from the environment at every call (workers and tests may change them):

- ``DIP_STORAGE_CONNECT_TIMEOUT`` (5 s): opening a connection. A healthy endpoint answers in
  milliseconds; 5 s still covers two lost SYNs (Linux resends after 1 s and 3 s).
- ``DIP_STORAGE_READ_TIMEOUT`` (15 s): the longest silence while waiting for response bytes.
  It does not limit a whole transfer, so large objects are unaffected; S3's first byte
  typically comes within 100-200 ms. 5 s and 15 s are also s3fs's own defaults.
- ``DIP_STORAGE_ATTEMPTS`` (5): tries per request (S3: botocore's ``total_max_attempts``) and
  per operation of ``retry``, enough to ride out a burst of throttling.
- ``DIP_STORAGE_DEADLINE`` (60 s): the budget of one S3 request or one ``retry`` operation,
  attempts and backoff together. A retry starts only if it can end within the budget, counting
  one attempt as the larger of connect + read timeout and the longest attempt so far, and the
  wait before it at its longest. A stalled endpoint thus fails a request after about 46 s
  (three 15 s silences; a fourth could not end in time) and never after more than 60 s, where
  the old fixed 60 s x 5 attempts took five minutes. ``worst_case_seconds()`` computes the
  bound of the current settings.
- ``DIP_STORAGE_BASE_DELAY`` (0.2 s), ``DIP_STORAGE_MAX_DELAY`` (5 s): the backoff of ``retry``.
  botocore waits U(0, 1) x min(2**i, 20) s before its retry i (0-based); it has no setting.

The bounds hold per HTTP request: an operation of many requests (a recursive listing, a
multipart upload) is bounded request by request, and a server that sends a byte within every
read timeout is never cut off.
"""

from __future__ import annotations

import errno
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# Used when the matching DIP_STORAGE_* variable is unset (see the module docstring). Read from
# this module at every call, so a test that changes them patches them here.
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


def worst_case_seconds(uri: str | None = None) -> float:
    """How long one single-request operation can take at most against a stalled endpoint.

    Each attempt ends within connect + read timeout; with backoff at its largest, A attempts
    take ``A * attempt + sum(delays)``; and no retry starts unless it ends within the deadline.
    The delays are botocore's for an ``s3://`` ``uri``, ``retry``'s otherwise.
    """
    s = settings()
    if uri is not None and str(uri).startswith(("s3://", "s3a://")):
        backoff = sum(botocore_backoff(i) for i in range(s.attempts - 1))
    else:
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


# --------------------------------------------------------------------------- S3 requests

# Set by shared.storage_s3 on an exception botocore's retry loop saw: the request's attempts.
CLIENT_ATTEMPTS_ATTRIBUTE = "dip_request_attempts"


def botocore_backoff(i: int) -> float:
    """The longest wait of botocore's standard retry mode before its retry ``i`` (0-based)."""
    return min(20.0, 2.0**i)


def client_attempts(exc: BaseException) -> int | None:
    """How many attempts botocore made at the request that failed with ``exc``; None when the
    failure never went through its retry loop (not S3, or an S3 body that broke mid-way)."""
    for err in _chain(exc):
        if getattr(err, CLIENT_ATTEMPTS_ATTRIBUTE, None) is not None:
            return int(getattr(err, CLIENT_ATTEMPTS_ATTRIBUTE))
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
            if retries is not None:
                return int(retries) + 1
    return None


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
    arguments come from ``settings()``. Permanent errors, the last transient error and an
    error of a request botocore already retried (``client_attempts``) are raised unchanged.
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
            if (i == attempts - 1 or over_budget or not is_transient(exc)
                    or client_attempts(exc) is not None):
                raise
            sleep(delay)
    raise AssertionError("unreachable")


def call(op: str, uri: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``retry(fn, ...)`` with failures re-raised as StorageError subclasses naming ``uri``.

    Every operation of shared.storage goes through it; ``op`` names the operation in errors.
    """
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
                tries = client_attempts(exc) or tries
                extra = f" (gave up after {tries} attempt{'s' * (tries != 1)} in {elapsed:.1f} s)"
            raise StorageError(f"{op} {uri} failed{extra}: {type(exc).__name__}: {exc}") from exc
        raise

