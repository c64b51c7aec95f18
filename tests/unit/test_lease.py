"""The output lease: one live writer per folder, stale leases taken over, lost leases refused."""

from __future__ import annotations

import time

import pytest

from shared import lease, storage
from shared.lease import Lease, LeaseError


def test_a_live_lease_refuses_a_second_run_and_names_the_holder(tmp_path):
    first = Lease(str(tmp_path), timeout=30, settle=0).acquire()
    try:
        with pytest.raises(LeaseError) as err:
            Lease(str(tmp_path), timeout=30, settle=0).acquire()
        message = str(err.value)
        assert first.run_id in message and "pid" in message and "heartbeat" in message
    finally:
        first.release()
    assert not storage.exists(str(tmp_path / lease.LEASE_FILE))  # released: removed
    Lease(str(tmp_path), timeout=30, settle=0).acquire().release()  # and free again


def test_a_stale_lease_is_taken_over(tmp_path):
    storage.write_json(str(tmp_path / lease.LEASE_FILE),
                       {"run_id": "dead", "host": "h", "pid": 1, "started": 0,
                        "heartbeat": time.time() - 100, "timeout": 10})
    taken = Lease(str(tmp_path), timeout=10, settle=0).acquire()
    try:
        assert lease.read(str(tmp_path))["run_id"] == taken.run_id
        with pytest.raises(LeaseError, match="dead"):
            lease.check(str(tmp_path), "dead")  # the dead run's workers may not commit
        lease.check(str(tmp_path), taken.run_id)
    finally:
        taken.release()


def test_the_heartbeat_keeps_a_lease_fresh(tmp_path):
    held = Lease(str(tmp_path), timeout=0.4, settle=0).acquire()
    try:
        time.sleep(1.0)  # longer than the timeout: only the heartbeat keeps it live
        with pytest.raises(LeaseError, match="being written"):
            Lease(str(tmp_path), timeout=0.4, settle=0).acquire()
    finally:
        held.release()


def test_a_lease_taken_over_is_not_removed_by_its_old_holder(tmp_path):
    old = Lease(str(tmp_path), timeout=30, settle=0).acquire()
    old._stop.set()
    storage.write_json(str(tmp_path / lease.LEASE_FILE),
                       {"run_id": "new", "host": "h", "pid": 2, "started": 0,
                        "heartbeat": time.time(), "timeout": 30})
    old.release()
    assert lease.read(str(tmp_path))["run_id"] == "new"


def test_invalid_timeout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="timeout"):
        Lease(str(tmp_path), timeout=0)
