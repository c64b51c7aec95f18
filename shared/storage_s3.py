"""The S3 filesystem of shared.storage: s3fs, with every request retried by botocore in bounds.

botocore retries each S3 request itself, in its ``standard`` mode: ``DIP_STORAGE_ATTEMPTS``
tries in all, on connection errors, timeouts, throttling and 5xx, with jittered exponential
backoff and a per-client retry quota. That is the same job as ``storage_policy.retry``, done
where it belongs: one failed page of a listing or part of a multipart upload is sent again
alone, not the whole operation. botocore has no time budget, so two event handlers on every
client add the storage deadline: one notes when a request's attempts begin, the other, run
before botocore's own retry handler, refuses a retry that could not end in time and records
the attempt count on the error (for its message, and so that ``retry`` does not repeat it).
s3fs's retry loop stays off: it would repeat all of botocore's attempts for each of its own.

Why ``standard`` and not ``adaptive``: adaptive adds a client-side rate limiter (a token bucket
that slows down after throttling) which holds requests back before they are sent, a wait that no
deadline here can bound.
"""

from __future__ import annotations

import os
import time
from typing import Any

import s3fs
from fsspec.asyn import sync_wrapper

from shared.storage_policy import (
    CLIENT_ATTEMPTS_ATTRIBUTE,
    StorageSettings,
    botocore_backoff,
    settings,
)

# Kept in botocore's per-request context, one dict shared by all attempts of a request.
_FIRST_BEGAN, _ATTEMPT_BEGAN, _LONGEST = "dip_first_began", "dip_attempt_began", "dip_longest"


def client_config(s: StorageSettings) -> dict[str, Any]:
    """botocore ``Config`` arguments: standard retries, ``attempts`` tries per request, timeouts."""
    return {"retries": {"mode": "standard", "total_max_attempts": s.attempts},
            "connect_timeout": s.connect_timeout, "read_timeout": s.read_timeout}


def _attempt_began(request: Any, **_: Any) -> None:
    """``request-created``: note when the request's first attempt and this attempt began."""
    now = time.monotonic()
    request.context.setdefault(_FIRST_BEGAN, now)
    request.context[_ATTEMPT_BEGAN] = now


def retry_fits_deadline(attempts: int, request_dict: dict, caught_exception=None,
                        **_: Any) -> bool | None:
    """``needs-retry``: False (no retry) when one more attempt could end after the deadline.

    The rule of ``storage_policy.retry``: the wait at its longest plus one attempt, counted as
    the larger of connect + read timeout and the longest attempt so far, must fit in the budget
    left. None leaves the decision, and the delay, to botocore's handler that runs next.
    """
    if caught_exception is not None:
        setattr(caught_exception, CLIENT_ATTEMPTS_ATTRIBUTE, attempts)
    context, s, now = request_dict["context"], settings(), time.monotonic()
    longest = max(context.get(_LONGEST, s.attempt_seconds), now - context.get(_ATTEMPT_BEGAN, now))
    context[_LONGEST] = longest
    elapsed = now - context.get(_FIRST_BEGAN, now)
    return False if elapsed + botocore_backoff(attempts - 1) + longest > s.deadline else None


def bound_requests(events: Any) -> None:
    """Hold the retries of a botocore S3 client (its ``client.meta.events``) to the deadline."""
    events.register("request-created.s3", _attempt_began, unique_id="dip-attempt-began")
    # first: the first handler that answers decides, and botocore's would answer with a delay
    events.register_first("needs-retry.s3", retry_fits_deadline, unique_id="dip-deadline")


class BoundedS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose botocore clients carry ``bound_requests``, with s3fs's own retries off."""

    retries = 1  # tries of s3fs's own loop (a class attribute, not a constructor argument)

    async def set_session(self, refresh: bool = False, kwargs: dict | None = None):
        """s3fs's client, with the deadline handlers on it (once per client it makes)."""
        client = await super().set_session(refresh=refresh, kwargs=kwargs or {})
        if getattr(self, "_bounded_client", None) is not client:
            bound_requests(client.meta.events)
            self._bounded_client = client
        return client

    _connect = set_session
    connect = sync_wrapper(set_session)


def _endpoint() -> str | None:
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(key, "").strip()
        if value:
            return value
    return None


def filesystem() -> BoundedS3FileSystem:
    """The S3 filesystem of the environment now (endpoint, timeouts and attempts read now).

    They are constructor arguments, so fsspec's instance cache gives a fresh filesystem when the
    environment changes them. Listings are never cached: another process may have written since.
    """
    return BoundedS3FileSystem(client_kwargs={"endpoint_url": _endpoint()},
                               config_kwargs=client_config(settings()),
                               use_listings_cache=False)
