"""shared.storage on local paths and memory://: atomic writes, listings, retries, errors."""

from __future__ import annotations

import errno
import os
import uuid

import pyarrow as pa
import pytest

from shared import storage


@pytest.fixture
def memroot():
    root = f"memory://test-{uuid.uuid4().hex[:8]}"
    yield root
    storage.remove(root, recursive=True)


class Flaky:
    """Fails ``failures`` times with ``exc``, then returns ``value``."""

    def __init__(self, failures: int, exc: BaseException, value="ok"):
        self.failures, self.exc, self.value, self.calls = failures, exc, value, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return (self.value, args, kwargs)


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


# --------------------------------------------------------------------------- paths


def test_join_puts_exactly_one_slash_between_parts():
    assert storage.join("s3://b/x/", "/y/", "z.json") == "s3://b/x/y/z.json"
    assert storage.join("/tmp/a", "b", "") == "/tmp/a/b"
    assert storage.join("memory://r", "a/b") == "memory://r/a/b"


def test_listing_keeps_the_uri_style_of_the_input(tmp_path, memroot):
    storage.write_text(str(tmp_path / "d" / "b.txt"), "b")
    storage.write_text(str(tmp_path / "d" / "a.txt"), "a")
    assert storage.ls(str(tmp_path / "d")) == [str(tmp_path / "d" / "a.txt"),
                                               str(tmp_path / "d" / "b.txt")]
    assert storage.ls(f"file://{tmp_path}/d") == [f"file://{tmp_path}/d/a.txt",
                                                  f"file://{tmp_path}/d/b.txt"]
    storage.write_bytes(storage.join(memroot, "x", "1.bin"), b"1")
    assert storage.glob(storage.join(memroot, "x", "*.bin")) == [f"{memroot}/x/1.bin"]
    assert storage.read_bytes(storage.glob(storage.join(memroot, "x", "*.bin"))[0]) == b"1"


def test_checks_and_missing_folder(tmp_path):
    path = str(tmp_path / "a" / "f.bin")
    assert storage.ls(str(tmp_path / "missing")) == []
    assert not storage.exists(path)
    storage.write_bytes(path, b"12345")
    assert storage.exists(path) and storage.isfile(path) and not storage.isdir(path)
    assert storage.isdir(str(tmp_path / "a"))
    assert storage.size(path) == 5
    storage.remove(path)
    storage.remove(path)  # missing: no error
    assert not storage.exists(path)


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_interrupted_write_leaves_nothing_and_keeps_old_content(kind, tmp_path, memroot):
    root = str(tmp_path) if kind == "local" else memroot
    uri = storage.join(root, "out", "obj.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.atomic_open(uri) as handle:
            handle.write(b"half")
            raise RuntimeError("boom")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(uri) as handle:
            handle.write(b"new but unfinished")
            raise RuntimeError("boom")
    assert storage.read_bytes(uri) == b"old"
    assert storage.ls(storage.join(root, "out")) == [uri]  # no temporary file left over


def test_local_atomic_write_is_a_rename_into_place(tmp_path):
    uri = str(tmp_path / "f.txt")
    with storage.atomic_open(uri, "w") as handle:
        handle.write("héllo")
        # while writing, the target does not exist and only a hidden temporary file does
        assert not os.path.exists(uri)
        assert [n for n in os.listdir(tmp_path) if n.startswith(".f.txt.")]
    assert storage.read_text(uri) == "héllo"
    assert os.listdir(tmp_path) == ["f.txt"]
    assert os.stat(uri).st_mode & 0o044  # umask-respecting mode, not mkstemp's 0600


def test_json_and_parquet_round_trip_and_parquet_is_deterministic(memroot, tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    storage.write_json(storage.join(memroot, "o.json"), obj)
    assert storage.read_json(storage.join(memroot, "o.json")) == obj
    table = pa.table({"id": ["a", "b"], "v": pa.array([1.5, -2.0], pa.float32())})
    first, second = str(tmp_path / "1.parquet"), str(tmp_path / "2.parquet")
    storage.write_parquet(first, table)
    storage.write_parquet(second, table)
    assert storage.read_parquet(first).equals(table)
    assert storage.read_parquet(first, columns=["v"]).column_names == ["v"]
    assert storage.read_bytes(first) == storage.read_bytes(second)


def test_reading_garbage_names_the_uri(tmp_path):
    uri = str(tmp_path / "bad.json")
    storage.write_text(uri, "{not json")
    with pytest.raises(storage.StorageError, match="bad.json"):
        storage.read_json(uri)
    with pytest.raises(storage.StorageError, match="Parquet"):
        storage.read_parquet(uri)


def test_modes_other_than_write_are_refused(tmp_path):
    with pytest.raises(ValueError, match="atomic_open mode"):
        with storage.atomic_open(str(tmp_path / "x"), "ab"):
            pass


# --------------------------------------------------------------------------- errors


def test_missing_object_is_a_file_not_found_naming_the_uri(tmp_path):
    uri = str(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin") as info:
        storage.read_bytes(uri)
    assert isinstance(info.value, storage.StorageError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_folder_is_a_permission_error_naming_the_uri(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(storage.StoragePermissionError, match="ro/f.bin"):
            storage.write_bytes(str(folder / "f.bin"), b"x")
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------- retries


def test_transient_error_is_retried_with_exponential_backoff():
    fn = Flaky(2, ConnectionResetError(errno.ECONNRESET, "reset by peer"))
    delays: list[float] = []
    out = storage.retry(fn, 7, attempts=5, base_delay=0.1, max_delay=10.0, sleep=delays.append,
                        key="v")
    assert out == ("ok", (7,), {"key": "v"})
    assert fn.calls == 3
    # delay i lies in [0.5, 1] x base * 2**i
    assert 0.05 <= delays[0] <= 0.1 and 0.1 <= delays[1] <= 0.2


def test_backoff_is_capped_and_the_last_error_is_raised():
    fn = Flaky(10, TimeoutError("slow"))
    delays: list[float] = []
    with pytest.raises(TimeoutError, match="slow"):
        storage.retry(fn, attempts=4, base_delay=1.0, max_delay=1.5, sleep=delays.append)
    assert fn.calls == 4 and len(delays) == 3
    assert all(d <= 1.5 for d in delays) and delays[2] >= 0.75


@pytest.mark.parametrize("exc", [FileNotFoundError("gone"), PermissionError("denied"),
                                 ValueError("bug"), _client_error("AccessDenied", 403)])
def test_permanent_error_is_not_retried(exc):
    fn = Flaky(1, exc)
    with pytest.raises(type(exc)):
        storage.retry(fn, attempts=5, sleep=lambda s: None)
    assert fn.calls == 1


@pytest.mark.parametrize("exc, transient", [
    (_client_error("SlowDown", 503), True),
    (_client_error("InternalError", 500), True),
    (_client_error("NoSuchKey", 404), False),
    (_client_error("InvalidArgument", 400), False),
    (OSError(errno.EBUSY, "SlowDown"), True),
    (OSError(errno.ENOSPC, "disk full"), False),
    (TimeoutError(), True),
    (FileNotFoundError(errno.ENOENT, "x"), False),
])
def test_classification_of_errors(exc, transient):
    assert storage.is_transient(exc) is transient


def test_s3fs_translated_errors_are_classified_by_their_cause():
    from s3fs.errors import translate_boto_error

    assert storage.is_transient(translate_boto_error(_client_error("SlowDown", 503)))
    assert storage.is_transient(translate_boto_error(_client_error("WeirdServerThing", 502)))
    assert not storage.is_transient(translate_boto_error(_client_error("WeirdClientThing", 400)))
    assert not storage.is_transient(translate_boto_error(_client_error("NoSuchKey", 404)))


def test_endpoint_connection_errors_are_transient():
    from botocore.exceptions import EndpointConnectionError

    assert storage.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))


# --------------------------------------------------------------------------- S3 configuration


def test_s3_endpoint_comes_from_the_environment_at_call_time(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9001")
    fs1, path = storage.url_to_fs("s3://bucket/a/b.json")
    assert path == "bucket/a/b.json"
    assert fs1.client_kwargs["endpoint_url"] == "http://127.0.0.1:9001"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9002")  # the S3-specific one wins
    fs2, _ = storage.url_to_fs("s3://bucket/a")
    assert fs2.client_kwargs["endpoint_url"] == "http://127.0.0.1:9002"
    assert fs2 is not fs1
    assert storage.url_to_fs("s3://other")[0] is fs2  # same environment, same cached instance
    assert "key" not in fs2.storage_options and "secret" not in fs2.storage_options


def test_failures_are_rewrapped_naming_the_uri_and_permanent_ones_tried_once():
    denied = Flaky(5, PermissionError(errno.EACCES, "Access Denied"))
    with pytest.raises(storage.StoragePermissionError, match="s3://bkt/k.bin") as info:
        storage._call("write", "s3://bkt/k.bin", denied)
    assert isinstance(info.value, PermissionError) and denied.calls == 1
    gone = Flaky(5, FileNotFoundError(errno.ENOENT, "NoSuchKey"))
    with pytest.raises(storage.StorageNotFoundError, match="s3://bkt/k.bin"):
        storage._call("read", "s3://bkt/k.bin", gone)
    assert gone.calls == 1
