"""One writer per output: a lease file with an owner and a heartbeat, taken over when stale.

A run that writes an output folder (any fsspec URI) holds ``<folder>/_lease.json``:

    {"run_id": "...", "host": "...", "pid": 123, "started": <unix s>, "heartbeat": <unix s>,
     "timeout": <s>}

The holder rewrites the heartbeat every ``timeout / 4`` seconds from a background thread. A second
run that finds a lease whose heartbeat is younger than its ``timeout`` is refused with a message
naming the holder; an older one belonged to a run that died and is taken over. Object stores have
no exclusive create, so taking a lease is "write, wait ``settle`` seconds, read back": of two runs
that start together, the one whose write landed last keeps the lease and the other is refused.
Workers of the holding run check the lease before committing work (:func:`check`), so a run whose
lease was taken over cannot overwrite the new holder's output.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from typing import Any

from shared import storage

LEASE_FILE = "_lease.json"
DEFAULT_TIMEOUT = 120.0  # seconds without a heartbeat after which a lease is stale


class LeaseError(RuntimeError):
    """The output is held by another live run, or this run's lease was taken over."""


def _describe(doc: dict[str, Any], now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(doc.get("started", 0)))
    beat = now - float(doc.get("heartbeat", 0))
    return (f"run {doc.get('run_id', '?')} on host {doc.get('host', '?')} pid {doc.get('pid', '?')}"
            f", started {started}, last heartbeat {beat:.0f} s ago")


def read(folder: str) -> dict[str, Any] | None:
    """The lease document of ``folder``, or None when nobody holds it."""
    try:
        return storage.read_json(storage.join(folder, LEASE_FILE))
    except FileNotFoundError:
        return None
    except storage.StorageError as exc:
        if storage.is_environment_error(exc):
            raise
        return None  # an unreadable lease (torn by a crash on a non-atomic store) is stale


def check(folder: str, run_id: str) -> None:
    """Raise LeaseError unless ``run_id`` still holds the lease of ``folder``."""
    doc = read(folder)
    if doc is None or doc.get("run_id") != run_id:
        holder = "nobody" if doc is None else _describe(doc, time.time())
        raise LeaseError(f"{folder}: this run ({run_id}) no longer holds the output lease "
                         f"(now held by {holder}); its work was not committed")


class Lease:
    """The lease of one output folder for this process; a context manager."""

    def __init__(self, folder: str, timeout: float = DEFAULT_TIMEOUT, settle: float = 0.5):
        if timeout <= 0:
            raise ValueError(f"lease timeout must be > 0 seconds, got {timeout}")
        self.folder = str(folder).rstrip("/")
        self.uri = storage.join(self.folder, LEASE_FILE)
        self.timeout = float(timeout)
        self.settle = settle
        self.run_id = uuid.uuid4().hex[:16]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._doc = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.time(), "timeout": self.timeout}

    def _write(self) -> None:
        storage.write_json(self.uri, {**self._doc, "heartbeat": time.time()})

    def acquire(self) -> Lease:
        """Take the lease (or a stale one); LeaseError naming the holder if a live run has it."""
        now = time.time()
        current = read(self.folder)
        if current is not None and now - float(current.get("heartbeat", 0)) < float(
                current.get("timeout", self.timeout)):
            raise LeaseError(
                f"{self.folder} is being written by another run: {_describe(current, now)}. "
                f"Wait for it to finish; if it died, its lease goes stale "
                f"{current.get('timeout', self.timeout):.0f} s after its last heartbeat")
        self._write()
        time.sleep(self.settle)
        won = read(self.folder)
        if won is None or won.get("run_id") != self.run_id:
            holder = "an unreadable lease" if won is None else _describe(won, time.time())
            raise LeaseError(f"{self.folder}: another run took the output lease at the same "
                             f"time: {holder}")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            with contextlib.suppress(Exception):  # a missed beat is retried; staleness is the limit
                doc = read(self.folder)
                if doc is not None and doc.get("run_id") == self.run_id:
                    self._write()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            doc = read(self.folder)
            if doc is not None and doc.get("run_id") == self.run_id:
                storage.remove(self.uri)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
