"""shared.storage on local paths and memory://: atomic writes, listings, retries, errors."""

from __future__ import annotations

import errno
import os
import uuid
from types import SimpleNamespace
from typing import TypeVar

import pyarrow as pa
import pytest

from shared import storage, storage_policy, storage_s3


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


def test_local_write_bytes_replaces_the_file_and_never_writes_into_it(tmp_path, monkeypatch):
    path = tmp_path / "marker.json"
    path.write_bytes(b"old")
    held = tmp_path / "held-by-a-reader"
    os.link(path, held)  # a reader that opened the old file: same inode, its bytes must stay
    storage.write_bytes(str(path), b"new")
    assert path.read_bytes() == b"new" and held.read_bytes() == b"old"
    assert os.stat(path).st_ino != os.stat(held).st_ino  # a new file was renamed into place

    def failing_fsync(fd):
        raise OSError(5, "disk failed while flushing")

    monkeypatch.setattr(os, "fsync", failing_fsync)  # the write fails after its bytes went out
    with pytest.raises(OSError, match="disk failed"):
        storage.write_bytes(str(path), b"newer")
    assert path.read_bytes() == b"new"  # the old object, whole
    assert sorted(os.listdir(tmp_path)) == ["held-by-a-reader", "marker.json"]  # no temp file


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


# --------------------------------------------------------------------------- bounds and budget


@pytest.fixture
def default_bounds(monkeypatch):
    """No DIP_STORAGE_* variable set: the built-in defaults apply."""
    for key in list(os.environ):
        if key.startswith("DIP_STORAGE_"):
            monkeypatch.delenv(key)


class FakeClock:
    """A clock that moves only when told (by a slow attempt or a sleep)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_default_worst_case_of_a_stalled_operation_is_about_a_minute(default_bounds):
    s = storage.settings()
    assert (s.connect_timeout, s.read_timeout, s.attempts, s.deadline) == (5.0, 15.0, 5, 60.0)
    assert storage.worst_case_seconds() <= 65


def test_worst_case_is_the_smaller_of_attempts_and_deadline(monkeypatch, default_bounds):
    monkeypatch.setenv("DIP_STORAGE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("DIP_STORAGE_READ_TIMEOUT", "2")
    monkeypatch.setenv("DIP_STORAGE_ATTEMPTS", "2")
    monkeypatch.setenv("DIP_STORAGE_BASE_DELAY", "0.5")
    assert storage.worst_case_seconds() == pytest.approx(2 * 3 + 0.5)
    monkeypatch.setenv("DIP_STORAGE_DEADLINE", "4")
    assert storage.worst_case_seconds() == pytest.approx(4)


def test_settings_are_read_from_the_environment_at_call_time(monkeypatch, default_bounds):
    monkeypatch.setenv("DIP_STORAGE_ATTEMPTS", "2")
    fn = Flaky(5, TimeoutError("slow"))
    with pytest.raises(TimeoutError):
        storage.retry(fn, sleep=lambda s: None)
    assert fn.calls == 2
    monkeypatch.setenv("DIP_STORAGE_ATTEMPTS", "4")
    fn = Flaky(5, TimeoutError("slow"))
    with pytest.raises(TimeoutError):
        storage.retry(fn, sleep=lambda s: None)
    assert fn.calls == 4


@pytest.mark.parametrize("name, value", [
    ("DIP_STORAGE_CONNECT_TIMEOUT", "soon"), ("DIP_STORAGE_READ_TIMEOUT", "0"),
    ("DIP_STORAGE_ATTEMPTS", "2.5"), ("DIP_STORAGE_ATTEMPTS", "0"),
    ("DIP_STORAGE_DEADLINE", "-1"), ("DIP_STORAGE_DEADLINE", "inf"),
    ("DIP_STORAGE_READ_TIMEOUT", "nan"), ("DIP_STORAGE_BASE_DELAY", "-0.1"),
])
def test_invalid_settings_are_an_error_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(storage.StorageConfigError, match=name) as info:
        storage.read_bytes("memory://never/read")
    assert isinstance(info.value, ValueError)
    assert storage.is_environment_error(info.value)  # a broken setup, not a bad object


def test_zero_backoff_is_allowed(monkeypatch):
    monkeypatch.setenv("DIP_STORAGE_BASE_DELAY", "0")
    delays: list[float] = []
    fn = Flaky(2, TimeoutError("slow"))
    storage.retry(fn, attempts=3, sleep=delays.append)
    assert delays == [0.0, 0.0]


def test_retry_starts_no_attempt_that_would_end_after_the_deadline(monkeypatch, default_bounds):
    monkeypatch.setenv("DIP_STORAGE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("DIP_STORAGE_READ_TIMEOUT", "1")
    clock = FakeClock()

    def slow_failure():  # each attempt takes 10 s, longer than connect + read timeout
        clock.now += 10
        raise TimeoutError("slow")

    calls = []
    with pytest.raises(TimeoutError):
        storage.retry(lambda: calls.append(1) or slow_failure(), attempts=10, deadline=35,
                      base_delay=0.1, sleep=clock.sleep, clock=clock)
    # ends at 10, ~20.1, ~30.3; a fourth would end after 40 > 35
    assert len(calls) == 3 and clock.now <= 35


def test_deadline_counts_an_attempt_as_at_least_connect_plus_read(monkeypatch, default_bounds):
    monkeypatch.setenv("DIP_STORAGE_CONNECT_TIMEOUT", "5")
    monkeypatch.setenv("DIP_STORAGE_READ_TIMEOUT", "15")
    clock = FakeClock()
    calls = []

    def quick_failure():
        calls.append(clock.now)
        clock.now += 1
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(ConnectionResetError):
        storage.retry(quick_failure, attempts=10, deadline=25, base_delay=1.0, max_delay=1.0,
                      sleep=clock.sleep, clock=clock)
    # a retry needs 20 s of budget left: every attempt starts before 25 - 20 = 5 s
    assert all(start <= 5 for start in calls) and 2 <= len(calls) <= 4


def test_s3_filesystem_carries_the_timeouts_of_the_environment(monkeypatch, default_bounds):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9003")
    fs1, _ = storage.url_to_fs("s3://bucket/a")
    assert fs1.config_kwargs["connect_timeout"] == 5.0
    assert fs1.config_kwargs["read_timeout"] == 15.0
    # botocore retries each request (5 tries in all); s3fs's own loop would repeat them
    assert fs1.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 5}
    assert fs1.retries == 1
    monkeypatch.setenv("DIP_STORAGE_READ_TIMEOUT", "2.5")
    fs2, _ = storage.url_to_fs("s3://bucket/a")
    assert fs2 is not fs1 and fs2.config_kwargs["read_timeout"] == 2.5
    assert storage.url_to_fs("s3://bucket/b")[0] is fs2


def test_giving_up_names_the_uri_the_attempts_and_the_time(monkeypatch):
    monkeypatch.setenv("DIP_STORAGE_BASE_DELAY", "0.001")
    monkeypatch.setenv("DIP_STORAGE_ATTEMPTS", "3")
    fn = Flaky(9, TimeoutError("slow"))
    pattern = r"read s3://b/k failed \(gave up after 3 attempts in \d+\.\d s\): TimeoutError"
    with pytest.raises(storage.StorageError, match=pattern) as info:
        storage._call("read", "s3://b/k", fn)
    assert fn.calls == 3 and storage.is_environment_error(info.value)


# --------------------------------------------------------------------------- botocore's retries


def _botocore_retried(exc: BaseException, attempts: int) -> BaseException:
    setattr(exc, storage.CLIENT_ATTEMPTS_ATTRIBUTE, attempts)  # what bound_requests records
    return exc


def test_retry_does_not_repeat_a_request_botocore_already_retried():
    from s3fs.errors import translate_boto_error

    fn = Flaky(9, _botocore_retried(TimeoutError("slow"), 4))
    with pytest.raises(storage.StorageError, match=r"gave up after 4 attempts"):
        storage._call("read", "s3://b/k", fn)
    assert fn.calls == 1
    throttled = _client_error("SlowDown", 503)
    throttled.response["ResponseMetadata"]["RetryAttempts"] = 2  # as botocore returns it
    fn = Flaky(9, translate_boto_error(throttled))
    with pytest.raises(storage.StorageError, match=r"k failed \(gave up after 3 attempts"):
        storage._call("read", "s3://b/k", fn)
    assert fn.calls == 1 and storage.client_attempts(fn.exc) == 3
    # a transient failure botocore never saw (a body broken mid-way) is ours to retry
    fn = Flaky(2, _client_error("SlowDown", 503))
    assert storage.retry(fn, attempts=3, sleep=lambda s: None)[0] == "ok" and fn.calls == 3
    assert storage.client_attempts(fn.exc) is None


def _emitter_with_bounds():
    """A botocore event emitter as an S3 client has it: our bounds, then botocore's handler."""
    from botocore.hooks import HierarchicalEmitter

    events = HierarchicalEmitter()
    events.register("needs-retry.s3", lambda **kwargs: 0.25, unique_id="retry-config-s3")
    storage_s3.bound_requests(events)
    return events


def _attempt(events, clock: FakeClock, context: dict, attempts: int, seconds: float):
    """One failed attempt of ``seconds``; returns (botocore's verdict, the error)."""
    from botocore.hooks import first_non_none_response

    events.emit("request-created.s3.GetObject", request=SimpleNamespace(context=context),
                operation_name="GetObject")
    clock.now += seconds
    error = TimeoutError("read timeout")
    responses = events.emit("needs-retry.s3.GetObject", response=None, endpoint=None,
                            operation=None, attempts=attempts, caught_exception=error,
                            request_dict={"context": context})
    return first_non_none_response(responses), error


def test_botocore_retries_only_what_can_end_within_the_deadline(monkeypatch, default_bounds):
    monkeypatch.setenv("DIP_STORAGE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("DIP_STORAGE_READ_TIMEOUT", "1")
    monkeypatch.setenv("DIP_STORAGE_DEADLINE", "10")
    clock = FakeClock()
    monkeypatch.setattr(storage_s3, "time", SimpleNamespace(monotonic=clock))
    events, context = _emitter_with_bounds(), {}
    verdicts = []
    for attempts in (1, 2, 3):
        verdict, error = _attempt(events, clock, context, attempts, seconds=0.5)
        verdicts.append(verdict)
        assert storage.client_attempts(error) == attempts
        clock.sleep(storage.botocore_backoff(attempts - 1))  # botocore's longest wait
    # ends at 0.5 (+1 +2 <= 10), 2.0 (+2 +2 <= 10), 4.5 (+4 +2 > 10): botocore's delay twice
    assert verdicts == [0.25, 0.25, False]


def test_the_deadline_counts_the_longest_attempt_so_far(monkeypatch, default_bounds):
    monkeypatch.setenv("DIP_STORAGE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("DIP_STORAGE_READ_TIMEOUT", "1")
    monkeypatch.setenv("DIP_STORAGE_DEADLINE", "10")
    clock = FakeClock()
    monkeypatch.setattr(storage_s3, "time", SimpleNamespace(monotonic=clock))
    events = _emitter_with_bounds()
    assert _attempt(events, clock, {}, 1, seconds=4.0)[0] == 0.25  # 4 + 1 + 4 <= 10
    assert _attempt(events, clock, {}, 1, seconds=4.6)[0] is False  # 4.6 + 1 + 4.6 > 10
    assert _attempt(events, clock, {}, 1, seconds=0.1)[0] == 0.25  # a new request, a new budget


# --------------------------------------------------------------------------- environment or object


def _botocore(name: str, **fields):
    import botocore.exceptions

    return getattr(botocore.exceptions, name)(**fields)


def _raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        raise outer from cause
    except BaseException as exc:
        return exc


@pytest.mark.parametrize("exc, environment", [
    (_client_error("SlowDown", 503), True),
    (TimeoutError("slow"), True),
    (_botocore("NoCredentialsError"), True),
    (_botocore("PartialCredentialsError", provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), True),
    (_botocore("CredentialRetrievalError", provider="sso", error_msg="expired"), True),
    (_client_error("AccessDenied", 403), True),
    (_client_error("InvalidAccessKeyId", 403), True),
    (_client_error("SignatureDoesNotMatch", 403), True),
    (_client_error("ExpiredToken", 400), True),
    (_client_error("AllAccessDisabled", 403), True),
    (PermissionError(errno.EACCES, "denied"), True),
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EROFS, "Read-only file system"), True),
    (_client_error("NoSuchKey", 404), False),
    (_client_error("NoSuchBucket", 404), False),
    (FileNotFoundError(errno.ENOENT, "gone"), False),
    (_client_error("InvalidObjectState", 403), False),  # archived: the object's own state
    (_client_error("InvalidArgument", 400), False),
    (ValueError("cannot identify image file"), False),
    (OSError("image file is truncated"), False),
    (RuntimeError("bug"), False),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_environment_errors_are_told_from_the_objects_own(exc, environment):
    assert storage.is_environment_error(exc) is environment


def test_environment_error_is_found_through_the_cause_chain():
    from s3fs.errors import translate_boto_error

    full = _raised_from(storage.StorageError("write s3://b/k failed"), OSError(errno.ENOSPC, "x"))
    assert storage.is_environment_error(full)
    assert storage.is_environment_error(translate_boto_error(_client_error("AccessDenied", 403)))
    assert storage.is_environment_error(translate_boto_error(_client_error("ExpiredToken", 400)))
    assert not storage.is_environment_error(translate_boto_error(_client_error("NoSuchKey", 404)))
    gone = _raised_from(storage.StorageNotFoundError(errno.ENOENT, "read x: not found"),
                        FileNotFoundError("x"))
    assert not storage.is_environment_error(gone)
    garbage = _raised_from(storage.StorageError("read x: not valid JSON"), ValueError("json"))
    assert not storage.is_environment_error(garbage)
    # the verdict after an earlier timeout was "not there": the object is missing
    try:
        try:
            raise TimeoutError("slow")
        except TimeoutError:
            raise FileNotFoundError(errno.ENOENT, "gone")  # noqa: B904 (the context is the point)
    except FileNotFoundError as exc:
        missing = _raised_from(storage.StorageError("read x failed"), exc)
    assert not storage.is_environment_error(missing)


@pytest.mark.parametrize("name, fields", [
    ("NoCredentialsError", {}),
    ("PartialCredentialsError", {"provider": "env", "cred_var": "AWS_SECRET_ACCESS_KEY"}),
    ("CredentialRetrievalError", {"provider": "process", "error_msg": "token sk-hush-4242"}),
])
def test_credential_failures_are_a_storage_error_naming_the_uri(name, fields):
    fn = Flaky(5, _botocore(name, **fields))
    with pytest.raises(storage.StorageCredentialsError, match="s3://bkt/k.bin") as info:
        storage._call("read", "s3://bkt/k.bin", fn)
    assert fn.calls == 1  # retrying cannot help
    assert "credentials are missing or invalid" in str(info.value)
    assert "hush-4242" not in str(info.value)  # what a provider said is not repeated
    assert isinstance(info.value, PermissionError)
    assert storage.is_environment_error(info.value)


@pytest.fixture
def no_credentials(monkeypatch, default_bounds):
    """An environment with no AWS credentials anywhere, on a fresh S3 filesystem."""
    from shared.storage_s3 import BoundedS3FileSystem

    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role lookups
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # signing fails before any connection; a closed loopback port in case it ever did not
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9004")
    BoundedS3FileSystem.clear_instance_cache()
    yield
    BoundedS3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("partial", [False, True], ids=["none", "partial"])
def test_reading_s3_without_credentials_says_so(no_credentials, monkeypatch, partial):
    if partial:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLESECRET42")
    with pytest.raises(storage.StorageCredentialsError, match="s3://bucket/img.jpg") as info:
        storage.read_bytes("s3://bucket/img.jpg")
    assert "credentials" in str(info.value) and "AKIAEXAMPLESECRET42" not in str(info.value)
    assert storage.is_environment_error(info.value)


def test_storage_environment_holds_only_storage_variables(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("AWS_", "DIP_STORAGE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ca.pem")
    monkeypatch.setenv("DIP_STORAGE_READ_TIMEOUT", "3")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "")  # empty: would mask the worker's own
    monkeypatch.setenv("AWS_SOMETHING_ELSE", "x")
    monkeypatch.setenv("DIPSTORAGE", "x")
    assert storage.storage_environment() == {
        "AWS_ACCESS_KEY_ID": "id", "AWS_CA_BUNDLE": "/etc/ca.pem",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_SECRET_ACCESS_KEY": "secret",
        "DIP_STORAGE_READ_TIMEOUT": "3"}


def test_a_403_without_an_s3_code_is_a_permission_error():
    from s3fs.errors import translate_boto_error

    fn = Flaky(5, translate_boto_error(_client_error("403", 403)))  # how a HEAD's 403 arrives
    with pytest.raises(storage.StoragePermissionError, match="s3://bkt/k.bin"):
        storage._call("size", "s3://bkt/k.bin", fn)
    assert fn.calls == 1


# --------------------------------------------------------------------------- the policy module


def test_every_public_name_of_the_policy_is_the_same_object_in_storage():
    # callers catch storage.StorageError around errors the policy raises: a copy would miss them
    names = sorted(name for name, value in vars(storage_policy).items()
                   if not name.startswith("_") and not isinstance(value, TypeVar)
                   and (name.startswith("DEFAULT_")
                        or getattr(value, "__module__", None) == storage_policy.__name__))
    assert {"StorageError", "StorageSettings", "retry", "settings", "is_environment_error",
            "storage_environment", "worst_case_seconds", "DEFAULT_ATTEMPTS", "call"} <= set(names)
    for name in names:
        exported = storage._call if name == "call" else getattr(storage, name)
        assert exported is getattr(storage_policy, name), name
