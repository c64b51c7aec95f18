"""shared.storage against a real S3 endpoint on loopback (and the same checks on local disk)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from shared import storage

pytestmark = pytest.mark.integration


def test_round_trip_and_listing(storage_root):
    root = storage_root
    storage.write_bytes(storage.join(root, "d", "b.bin"), b"\x00\x01\x02")
    storage.write_text(storage.join(root, "d", "a.txt"), "héllo")
    storage.write_json(storage.join(root, "d", "sub", "c.json"), {"k": [1, 2]})
    table = pa.table({"id": ["x", "y"], "n": pa.array([3, 4], pa.int32())})
    storage.write_parquet(storage.join(root, "t.parquet"), table)

    assert storage.read_bytes(storage.join(root, "d", "b.bin")) == b"\x00\x01\x02"
    assert storage.read_text(storage.join(root, "d", "a.txt")) == "héllo"
    assert storage.read_json(storage.join(root, "d", "sub", "c.json")) == {"k": [1, 2]}
    assert storage.read_parquet(storage.join(root, "t.parquet")).equals(table)
    assert storage.size(storage.join(root, "d", "b.bin")) == 3

    d = storage.join(root, "d")
    assert storage.ls(d) == [storage.join(d, "a.txt"), storage.join(d, "b.bin"),
                             storage.join(d, "sub")]
    assert storage.glob(storage.join(d, "*.*")) == [storage.join(d, "a.txt"),
                                                   storage.join(d, "b.bin")]
    assert storage.isdir(storage.join(d, "sub")) and not storage.isfile(storage.join(d, "sub"))
    assert storage.isfile(storage.join(d, "a.txt"))
    assert storage.ls(storage.join(root, "missing")) == []

    storage.remove(d, recursive=True)
    assert not storage.exists(storage.join(d, "a.txt"))
    assert storage.ls(d) == []
    storage.remove(d, recursive=True)  # already gone: no error


def test_listing_is_fresh_after_writes_and_removes(storage_root):
    folder = storage.join(storage_root, "fresh")
    assert storage.ls(folder) == []
    storage.write_bytes(storage.join(folder, "1"), b"1")
    assert storage.ls(folder) == [storage.join(folder, "1")]
    storage.write_bytes(storage.join(folder, "2"), b"2")
    assert storage.ls(folder) == [storage.join(folder, "1"), storage.join(folder, "2")]
    storage.remove(storage.join(folder, "1"))
    assert storage.ls(folder) == [storage.join(folder, "2")]
    assert not storage.exists(storage.join(folder, "1"))


@pytest.mark.parametrize("mode, payload", [("wb", b"x" * 1000), ("w", "text")],
                         ids=["bytes", "text"])
def test_exception_inside_atomic_open_leaves_no_object(storage_root, mode, payload):
    uri = storage.join(storage_root, "atomic", "obj")
    with pytest.raises(RuntimeError, match="interrupted"):
        with storage.atomic_open(uri, mode) as handle:
            handle.write(payload)
            raise RuntimeError("interrupted")
    assert not storage.exists(uri)
    assert storage.ls(storage.join(storage_root, "atomic")) == []

    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(uri, mode) as handle:
            handle.write(payload)
            raise RuntimeError("interrupted")
    assert storage.read_bytes(uri) == b"old"
    with storage.atomic_open(uri, mode) as handle:
        handle.write(payload)
    expected = payload if mode == "wb" else payload.encode()
    assert storage.read_bytes(uri) == expected


def test_s3_missing_key_is_permanent_and_not_retried(s3_bucket):
    uri = storage.join(s3_bucket, "no", "such.key")
    fs, path = storage.url_to_fs(uri)
    calls = []

    def read():
        calls.append(1)
        return fs.cat_file(path)

    with pytest.raises(FileNotFoundError):
        storage.retry(read, attempts=5, sleep=lambda s: None)
    assert len(calls) == 1
    with pytest.raises(storage.StorageNotFoundError, match="no/such.key"):
        storage.read_bytes(uri)


def test_s3_unreachable_endpoint_is_retried_then_named(s3_bucket, monkeypatch):
    uri = storage.join(s3_bucket, "k.bin")
    storage.write_bytes(uri, b"here")
    # the endpoint is read from the environment on every call: point it at a closed port
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(storage, "DEFAULT_BASE_DELAY", 0.001)
    monkeypatch.setattr(storage, "DEFAULT_ATTEMPTS", 3)
    fs, path = storage.url_to_fs(uri)
    calls = []

    def read():
        calls.append(1)
        return fs.cat_file(path)

    with pytest.raises(Exception) as info:
        storage.retry(read, sleep=lambda s: None)
    assert storage.is_transient(info.value)
    assert len(calls) == 3
    with pytest.raises(storage.StorageError, match=r"s3://.*/k.bin.*gave up after 3 attempts"):
        storage.read_bytes(uri)
    # checks must not mistake an outage for "not there" (that would redo finished work)
    for check in (storage.exists, storage.isfile, storage.isdir):
        with pytest.raises(storage.StorageError, match="k.bin"):
            check(uri)
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"here"  # the real endpoint again
