"""Label-set writer: column writers, per-stage identities, marker counts, the lease on commit."""

from __future__ import annotations

import numpy as np
import pytest

from shared import storage
from shared.labelset import LabelSetError, LabelSetWriter, is_labelset
from shared.labelset_format import feature_matrix
from shared.lease import Lease, LeaseError


def _segments(writer: LabelSetWriter, shard: int, n: int = 3) -> None:
    with writer.shard("segments", shard) as out:
        out.write_columns("images", image_id=[f"s{shard}i{i}" for i in range(n)],
                          uri=[f"/x/{i}.jpg" for i in range(n)], width=np.full(n, 4),
                          height=np.full(n, 4), status=["ok"] * n, error=[None] * n,
                          shard=np.full(n, shard))
        out.write_columns("globals", image_id=[f"s{shard}i{i}" for i in range(n)],
                          feature=np.full((n, 2), shard, np.float32))


def test_columns_in_counts_in_markers_out(storage_root):
    writer = LabelSetWriter(storage_root, {"v": 1})
    assert is_labelset(storage_root)
    for shard in range(3):
        _segments(writer, shard)
    assert writer.stage_rows("segments") == {"images": 9, "globals": 9}
    assert [m["shard"] for m in writer.markers("segments")] == [0, 1, 2]
    shards = [(s, feature_matrix(t.column("feature"))[0, 0])
              for s, t in writer.iter_shard_tables("globals")]
    assert shards == [(0, 0.0), (1, 1.0), (2, 2.0)]
    writer.write_columns("centroids", class_id=np.arange(4), feature=np.eye(4, 2))
    assert writer.table_rows("centroids") == 4


def test_a_changed_stage_identity_discards_only_that_stage(tmp_path):
    uri = str(tmp_path / "set")
    writer = LabelSetWriter(uri, {"v": 1})
    assert not writer.reset_stage("labels", {"k": 3})  # nothing to discard the first time
    _segments(writer, 0)
    with writer.shard("labels", 0) as out:
        out.write_columns("classes", image_id=["s0i0"], class_id=[1], area=[1.0])
    writer.write_columns("centroids", class_id=np.arange(2), feature=np.eye(2))
    writer.finish({})
    segment_files = {p: p.read_bytes() for p in (tmp_path / "set" / "tables" / "images").iterdir()}
    assert not writer.reset_stage("labels", {"k": 3})  # same identity: kept
    assert writer.is_done("labels", 0)
    assert writer.reset_stage("labels", {"k": 4}, tables=("centroids",))
    assert not writer.is_done("labels", 0) and not writer.has_table("centroids")
    assert not storage.exists(storage.join(uri, "labelset.json"))
    assert not (tmp_path / "set" / "tables" / "classes").exists() or not any(
        (tmp_path / "set" / "tables" / "classes").iterdir())
    assert writer.is_done("segments", 0)
    assert {p: p.read_bytes() for p in (tmp_path / "set" / "tables" / "images").iterdir()} \
        == segment_files
    # the new identity is recorded: a writer opened later keeps the stage
    again = LabelSetWriter(uri, {"v": 1})
    assert not again.reset_stage("labels", {"k": 4})


def test_a_commit_needs_the_lease(tmp_path):
    uri = str(tmp_path / "set")
    held = Lease(uri, timeout=30, settle=0).acquire()
    try:
        writer = LabelSetWriter(uri, {"v": 1}, lease_id=held.run_id)
        _segments(writer, 0)
        stranger = LabelSetWriter(uri, {"v": 1}, lease_id="someone-else", check=False)
        with pytest.raises(LeaseError, match="no longer holds"):
            _segments(stranger, 1)
        assert not stranger.is_done("segments", 1)
        with pytest.raises(LeaseError):
            stranger.write_columns("centroids", class_id=[0], feature=np.ones((1, 2)))
    finally:
        held.release()


def test_column_writers_check_the_schema(tmp_path):
    writer = LabelSetWriter(str(tmp_path / "set"), {"v": 1})
    with pytest.raises(LabelSetError, match="takes columns"):
        writer.write_columns("centroids", class_id=[0])
