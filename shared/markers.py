"""Done-markers: how a unit of output (one shard) appears all at once or not at all.

A unit's files are written first and its marker, a small JSON document listing them, last: the
marker's presence means every file it lists is complete, and readers trust nothing without it.
A rerun skips the units whose marker is there (and, where the marker records what the unit was
made from, matches). A failed or stale unit loses its marker first, then its files, so a
half-removed unit never counts. The label sets (shared/labelset.py) and the evaluation memory
bank (evaluation/bank.py) commit their shards this way.
"""

from __future__ import annotations

import contextlib
from typing import Any

from shared import storage


class MarkedUnit:
    """The files of one unit under ``root`` and its marker at ``root/marker`` (relative paths).

    Claim each file before writing it, then :meth:`commit`; used as a context manager, an
    exception inside the block discards whatever the unit wrote.
    """

    def __init__(self, root: str, marker: str, where: str,
                 error: type[Exception] = ValueError):
        self.root, self.marker, self.where = str(root).rstrip("/"), marker, where
        self.error = error  # what a misuse raises: the caller's own error type
        self.files: list[str] = []

    def claim(self, rel: str) -> str:
        """The URI to write file ``rel`` of this unit to; a file is claimed once."""
        if rel in self.files:
            raise self.error(f"{self.where}: {rel} was already written in this shard")
        self.files.append(rel)
        return storage.join(self.root, rel)

    def commit(self, **fields: Any) -> dict:
        """Write the marker ({"files": the claimed files, sorted, **fields}) and return it."""
        marker = {**fields, "files": sorted(self.files)}
        storage.write_json(storage.join(self.root, self.marker), marker)
        return marker

    def discard(self) -> None:
        """Remove the marker, then the claimed files, ignoring failures.

        The marker first: its put may have landed even though the call raised. A file that
        cannot be removed now is harmless: without a marker nothing reads it, and a retry of
        the unit overwrites it.
        """
        for rel in [self.marker, *self.files]:
            with contextlib.suppress(Exception):
                storage.remove(storage.join(self.root, rel))

    def __enter__(self) -> MarkedUnit:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None:
            self.discard()  # the caller still sees the original exception


def read_marker(root: str, marker: str, **expected: Any) -> dict | None:
    """The marker at ``root/marker`` if it exists and records every ``expected`` field with
    that value, else None (missing, or made from something else)."""
    uri = storage.join(str(root).rstrip("/"), marker)
    if not storage.exists(uri):
        return None
    doc = storage.read_json(uri)
    return doc if all(doc.get(k) == v for k, v in expected.items()) else None
