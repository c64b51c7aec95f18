"""shared.storage against a real S3 endpoint on loopback (and the same checks on local disk)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pyarrow as pa
import pytest

from shared import storage, storage_policy

pytestmark = pytest.mark.integration

# what moto accepts; the stalled endpoint never checks them
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


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
    # the policy reads its defaults from its own module at every call
    monkeypatch.setattr(storage_policy, "DEFAULT_BASE_DELAY", 0.001)
    monkeypatch.setattr(storage_policy, "DEFAULT_ATTEMPTS", 3)
    fs, path = storage.url_to_fs(uri)
    calls = []

    def read():
        calls.append(1)
        return fs.cat_file(path)

    with pytest.raises(Exception) as info:
        storage.retry(read, sleep=lambda s: None)
    assert storage.is_transient(info.value)
    # botocore made the 3 attempts at the request; retry() does not repeat them
    assert storage.client_attempts(info.value) == 3 and len(calls) == 1
    with pytest.raises(storage.StorageError, match=r"s3://.*/k.bin.*gave up after 3 attempts"):
        storage.read_bytes(uri)
    # checks must not mistake an outage for "not there" (that would redo finished work)
    for check in (storage.exists, storage.isfile, storage.isdir):
        with pytest.raises(storage.StorageError, match="k.bin"):
            check(uri)
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"here"  # the real endpoint again


# --------------------------------------------------------------------------- bounded timeouts


@contextlib.contextmanager
def stalled_endpoint(lifetime: float = 30.0):
    """An endpoint on 127.0.0.1 that accepts connections and never answers; yields (url, conns)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def serve():
        end = time.monotonic() + lifetime  # stops by itself even if the test never returns
        while not done.is_set() and time.monotonic() < end:
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        done.set()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()
        server.close()


def _bounds(monkeypatch, **values):
    for name, value in values.items():
        monkeypatch.setenv(f"DIP_STORAGE_{name.upper()}", str(value))


@pytest.mark.parametrize("attempts, deadline", [
    (2, 6.0),  # the attempts run out first
    (20, 3.0),  # the deadline runs out first
])
def test_stalled_endpoint_fails_within_the_configured_bound(monkeypatch, attempts, deadline):
    for key, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    _bounds(monkeypatch, connect_timeout=1, read_timeout=1 if attempts == 2 else 0.5,
            attempts=attempts, deadline=deadline, base_delay=0.05)
    bound = storage.worst_case_seconds("s3://bucket/key")
    assert bound <= deadline
    with stalled_endpoint() as (url, accepted):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        start = time.monotonic()
        with pytest.raises(storage.StorageError, match="s3://bucket/key") as info:
            storage.read_bytes("s3://bucket/key")
        elapsed = time.monotonic() - start
    assert elapsed <= bound + 1.5  # the margin: client start-up and a loaded machine
    if attempts == 2:
        assert len(accepted) == 2  # each attempt one connection: no hidden retries
    else:
        assert 1 <= len(accepted) < attempts
    assert storage.is_environment_error(info.value)
    assert "timeout" in str(info.value).lower()


# --------------------------------------------------------------------------- fault proxy


@pytest.fixture
def proxied(s3_bucket, s3_proxy, monkeypatch):
    """Three objects in a fresh bucket, then the environment pointing at the fault proxy."""
    uris = [storage.join(s3_bucket, "images", f"img00{i}.jpg") for i in (1, 2, 3)]
    for uri in uris:
        storage.write_bytes(uri, uri.encode())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint)
    _bounds(monkeypatch, attempts=3, base_delay=0.01, connect_timeout=2, read_timeout=2)
    return s3_proxy, uris


def test_proxy_passes_everything_through(s3_bucket, s3_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint)
    folder = storage.join(s3_bucket, "via", "proxy")
    payload = bytes(range(256)) * 300
    storage.write_bytes(storage.join(folder, "a.bin"), payload)
    storage.write_json(storage.join(folder, "sub", "b.json"), {"k": 1})
    assert storage.read_bytes(storage.join(folder, "a.bin")) == payload
    assert storage.size(storage.join(folder, "a.bin")) == len(payload)
    assert storage.find(folder) == [storage.join(folder, "a.bin"),
                                    storage.join(folder, "sub", "b.json")]
    storage.remove(folder, recursive=True)
    assert not storage.exists(storage.join(folder, "a.bin"))
    assert s3_proxy.count(method="PUT") == 2 and s3_proxy.count(method="GET") >= 2
    assert s3_proxy.faulted == 0


@pytest.mark.parametrize("code", ["ServiceUnavailable", "SlowDown"])
def test_proxy_503_is_retried_by_botocore_alone_then_an_environment_error(proxied, code):
    proxy, (first, second, third) = proxied
    rule = proxy.fail(method="GET", key_contains="img003", mode="503", code=code)
    assert storage.read_bytes(first) == first.encode()
    assert third in storage.ls(third.rsplit("/", 1)[0])  # listings pass: they name no key
    with pytest.raises(storage.StorageError, match=r"img003.jpg.*gave up after 3 attempts") as info:
        storage.read_bytes(third)
    assert storage.is_environment_error(info.value)
    # exactly the 3 attempts of botocore: neither s3fs nor retry() repeated them
    assert rule.hits == 3 == proxy.count(method="GET", key_contains="img003")
    proxy.clear()
    assert storage.read_bytes(third) == third.encode()
    assert storage.read_bytes(second) == second.encode()


@pytest.mark.parametrize("code, error", [
    ("AccessDenied", storage.StoragePermissionError),
    ("InvalidAccessKeyId", storage.StorageCredentialsError),
    ("SignatureDoesNotMatch", storage.StorageCredentialsError),
])
def test_proxy_403_is_a_permission_or_credential_error_tried_once(proxied, code, error):
    proxy, (_, _, third) = proxied
    proxy.fail(method="GET", key_contains="img003", mode="403", code=code)
    with pytest.raises(error, match="img003.jpg") as info:
        storage.read_bytes(third)
    assert isinstance(info.value, PermissionError)
    assert storage.is_environment_error(info.value)
    assert proxy.faulted == 1
    proxy.clear()
    assert storage.read_bytes(third) == third.encode()


@pytest.mark.parametrize("mode", ["reset", "stall"])
def test_proxy_dropped_and_stalled_requests_are_transient(proxied, monkeypatch, mode):
    proxy, (first, _, third) = proxied
    _bounds(monkeypatch, attempts=2, read_timeout=0.5, connect_timeout=0.5)
    proxy.fail(method="GET", key_contains="img003", mode=mode)
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="img003.jpg.*gave up after 2 attempts") as info:
        storage.read_bytes(third)
    assert time.monotonic() - start <= storage.worst_case_seconds(third) + 1.0
    assert storage.is_environment_error(info.value)
    # aiohttp resends an idempotent request once when a kept-alive connection drops
    # (RFC 9112 9.3.1); a stall is never resent, so a timeout is never paid twice per attempt
    assert proxy.faulted == 2 if mode == "stall" else 2 <= proxy.faulted <= 4
    assert storage.read_bytes(first) == first.encode()


def test_proxy_rule_with_times_fails_only_the_first_requests(proxied):
    proxy, (_, _, third) = proxied
    rule = proxy.fail(method="GET", key_contains="img003", mode="503", times=2)
    assert storage.read_bytes(third) == third.encode()  # attempt 3 of 3 passes
    assert rule.hits == 2 and proxy.count(method="GET", key_contains="img003") == 3


def test_one_failing_request_of_many_is_retried_alone(proxied):
    proxy, uris = proxied
    rule = proxy.fail(method="GET", key_contains="img002", mode="503", times=1)
    assert storage.read_many(uris) == [uri.encode() for uri in uris]
    assert rule.hits == 1 and proxy.count(method="GET", key_contains="img002") == 2
    # the other objects of the batch were fetched once: the request was retried, not the batch
    assert proxy.count(method="GET", key_contains="img001") == 1
    assert proxy.count(method="GET", key_contains="img003") == 1


def test_streaming_reads_are_retried_request_by_request(proxied):
    proxy, (first, _, _) = proxied
    with storage.open_read(first) as handle:
        rule = proxy.fail(method="GET", key_contains="img001", mode="503", times=1)
        assert handle.read() == first.encode()  # fetched after open_read returned
    assert rule.hits == 1


def test_a_body_broken_after_its_response_began_is_retried_by_us(proxied):
    proxy, (_, second, _) = proxied
    # botocore's retries end with the response headers; the broken body is retry()'s to redo
    rule = proxy.fail(method="GET", key_contains="img002", mode="truncate", times=1)
    assert storage.read_bytes(second) == second.encode()
    assert rule.hits == 1 and proxy.count(method="GET", key_contains="img002") == 2
    proxy.fail(method="GET", key_contains="img002", mode="truncate")
    with pytest.raises(storage.StorageError, match=r"img002.jpg.*gave up after 3 attempts"):
        storage.read_bytes(second)
