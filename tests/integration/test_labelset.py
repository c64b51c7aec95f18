"""shared.labelset on local disk and on the loopback S3 endpoint: write, resume, read back."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from shared import labelset_reader, storage
from shared.labelset import LabelSet, LabelSetError, LabelSetWriter

pytestmark = pytest.mark.integration

K = 4  # pseudo-classes
FINGERPRINT = {"config": {"classes": K, "segmenter": "diffcut"}, "listing_sha256": "abc"}
# shard -> (image id, width, height); width 0 marks an image that failed to decode
SHARDS = {0: [("img-a", 5, 4), ("img-b", 3, 6), ("img-bad", 0, 0)],
          1: [("img-c", 4, 4), ("img-d", 2, 7)]}
CENTROIDS = np.arange(K * 3, dtype=np.float32).reshape(K, 3) / 7


class Boom(RuntimeError):
    pass


def segments_of(image_id: str, width: int, height: int) -> np.ndarray:
    """A segment map that uses the full 16-bit range (a value of 65535 must survive)."""
    rng = np.random.default_rng(sum(map(ord, image_id)))
    seg = rng.integers(0, 6, size=(height, width)).astype(np.uint16)
    seg[0, 0] = 65535
    return seg


def labels_of(seg: np.ndarray) -> np.ndarray:
    return (seg % K).astype(np.uint16)


def classes_of(labels: np.ndarray) -> list[tuple[int, float]]:
    ids, counts = np.unique(labels, return_counts=True)
    return [(int(i), float(np.float32(c / labels.size))) for i, c in zip(ids, counts, strict=True)]


def write_segments(writer: LabelSetWriter, shard: int, fail: bool = False) -> None:
    rows = SHARDS[shard]
    ok = [(i, w, h) for i, w, h in rows if w]
    images = pa.table({
        "image_id": [i for i, _, _ in rows],
        "uri": [f"s3://images/{i}.jpg" for i, _, _ in rows],
        "width": [w for _, w, _ in rows],  # int64 on purpose: the writer casts to the schema
        "height": [h for _, _, h in rows],
        "status": ["ok" if w else "error" for _, w, _ in rows],
        "error": [None if w else "cannot identify image file" for _, w, _ in rows],
    })
    segs = {i: segments_of(i, w, h) for i, w, h in ok}
    segments = pa.table({
        "image_id": [i for i in segs for _ in range(2)],
        "segment_id": [s for _ in segs for s in range(2)],
        "area": [0.25, 0.75] * len(segs),
        "feature": [[float(s), 1.0] for _ in segs for s in range(2)],
    })
    with writer.shard("segments", shard) as out:
        out.write_table("images", images)
        out.write_table("segments", segments)
        out.write_maps("segments", segs)
        if fail:
            raise Boom("worker lost mid-shard")
        out.write_table("globals", pa.table({"image_id": list(segs),
                                             "feature": [[1.0, 0.0]] * len(segs)}))


def write_labels(writer: LabelSetWriter, shard: int) -> None:
    images = writer.read_shard_table("images", shard)
    segs = writer.read_maps("segments", shard)
    ok = [i for i, s in zip(images["image_id"].to_pylist(), images["status"].to_pylist(),
                            strict=True) if s == "ok"]
    assert sorted(segs) == sorted(ok)
    labels = {i: labels_of(segs[i]) for i in ok}
    rows = [(i, c, a) for i in ok for c, a in classes_of(labels[i])]
    classes = pa.table({"image_id": [r[0] for r in rows], "class_id": [r[1] for r in rows],
                        "area": [r[2] for r in rows]})
    with writer.shard("labels", shard) as out:
        out.write_table("classes", classes)
        out.write_maps("labels", labels)


PAIRS = pa.table({"query_id": ["img-a", "img-c"], "positive_id": ["img-c", "img-d"],
                  "class_id": pa.array([1, 2], pa.int32()),
                  "query_area": pa.array([0.5, 0.25], pa.float32()),
                  "positive_area": pa.array([0.125, 0.375], pa.float32())})


def write_all(uri: str, fail_shard: int | None = None) -> LabelSetWriter:
    writer = LabelSetWriter(uri, FINGERPRINT)
    for shard in SHARDS:
        if not writer.is_done("segments", shard):
            write_segments(writer, shard)
    writer.write_table("centroids", pa.table({"class_id": list(range(K)),
                                              "feature": CENTROIDS.tolist()}))
    for shard in SHARDS:
        if not writer.is_done("labels", shard):
            write_labels(writer, shard)
    writer.write_table("pairs", PAIRS)
    writer.finish({"num_classes": K, "backbone": "vits14", "segmenter": "diffcut",
                   "counts": {"images": 5}})
    return writer


# --------------------------------------------------------------------------- round trip


def test_written_shard_by_shard_and_read_back(storage_root):
    uri = storage.join(storage_root, "set")
    write_all(uri)
    ls = LabelSet(uri)
    assert ls.meta["backbone"] == "vits14" and ls.meta["counts"] == {"images": 5}
    assert ls.meta["fingerprint"] == FINGERPRINT
    assert ls.meta["contents"]["stages"] == {"labels": [0, 1], "segments": [0, 1]}
    assert ls.num_classes == K
    assert ls.image_ids == ["img-a", "img-b", "img-c", "img-d"]
    assert ls.shards() == [0, 1]
    assert ls.shard_image_ids(0) == ["img-a", "img-b"] and ls.shard_image_ids(1) == ["img-c", "img-d"]

    images = ls.images()
    assert images.schema.field("width").type == pa.int32()
    assert images["status"].to_pylist() == ["ok", "ok", "error", "ok", "ok"]
    assert images["shard"].to_pylist() == [0, 0, 0, 1, 1]
    assert images["error"].to_pylist()[2] == "cannot identify image file"

    for rows in SHARDS.values():
        for image_id, w, h in rows:
            if not w:
                continue
            seg = ls.segment_map(image_id)
            assert seg.dtype == np.uint16 and seg.shape == (h, w)
            np.testing.assert_array_equal(seg, segments_of(image_id, w, h))
            np.testing.assert_array_equal(ls.label_map(image_id), labels_of(seg))
            assert ls.classes(image_id) == classes_of(labels_of(seg))

    assert ls.table("segments").num_rows == 8
    assert ls.table("globals")["image_id"].to_pylist() == ["img-a", "img-b", "img-c", "img-d"]
    assert ls.pairs().equals(PAIRS)
    np.testing.assert_array_equal(ls.centroids(), CENTROIDS)
    maps = ls.shard_maps("labels", 1)
    assert sorted(maps) == ["img-c", "img-d"]

    with pytest.raises(LabelSetError, match="img-bad.*failed during labeling.*cannot identify"):
        ls.segment_map("img-bad")
    with pytest.raises(LabelSetError, match="'nope' is not in label set"):
        ls.label_map("nope")
    with pytest.raises(LabelSetError, match="no table 'depth'"):
        ls.table("depth")


def test_maps_are_plain_16_bit_greyscale_pngs(tmp_path):
    uri = str(tmp_path / "set")
    write_all(uri)
    # the layout is part of the contract: any tool can pull a PNG out and view it
    table = storage.read_parquet(storage.join(uri, "maps", "segments", "shard-00001.parquet"))
    assert table["image_id"].to_pylist() == ["img-c", "img-d"]
    image = Image.open(io.BytesIO(table["png"][0].as_py()))
    assert image.format == "PNG" and image.mode == "I;16" and image.size == (4, 4)
    np.testing.assert_array_equal(np.asarray(image), segments_of("img-c", 4, 4))


# --------------------------------------------------------------------------- failures and reruns


def _shard_files(uri: str, shard: int) -> list[str]:
    return storage.glob(storage.join(uri, "**", f"shard-{shard:05d}*"))


def test_failed_shard_leaves_no_trace_and_a_retry_completes_it(storage_root):
    uri = storage.join(storage_root, "set")
    writer = LabelSetWriter(uri, FINGERPRINT)
    write_segments(writer, 0)
    with pytest.raises(Boom):
        write_segments(writer, 1, fail=True)
    assert _shard_files(uri, 1) == []
    assert not writer.is_done("segments", 1) and writer.is_done("segments", 0)
    assert writer.done_shards("segments") == [0]
    assert writer.read_table("images")["shard"].to_pylist() == [0, 0, 0]
    with pytest.raises(LabelSetError, match="shard 1"):
        writer.read_maps("segments", 1)

    write_segments(writer, 1)
    assert writer.is_done("segments", 1)
    assert writer.read_table("images")["shard"].to_pylist() == [0, 0, 0, 1, 1]
    assert sorted(writer.read_maps("segments", 1)) == ["img-c", "img-d"]
    with pytest.raises(LabelSetError, match="already done"):
        write_segments(writer, 1)


def test_a_crashed_process_leftovers_are_ignored_then_overwritten(tmp_path):
    uri = str(tmp_path / "set")
    writer = LabelSetWriter(uri, FINGERPRINT)
    write_segments(writer, 0)
    # a process died after writing a file of shard 1 and before its done-marker
    leftover = storage.join(uri, "tables", "images", "shard-00001.parquet")
    storage.write_bytes(leftover, b"truncated garbage")
    assert writer.read_table("images").num_rows == 3
    with pytest.raises(LabelSetError, match="table 'images' of shard 1"):
        writer.read_shard_table("images", 1)
    write_segments(writer, 1)
    assert writer.read_shard_table("images", 1)["image_id"].to_pylist() == ["img-c", "img-d"]


def test_rerun_produces_byte_identical_parquet(storage_root):
    first, second = storage.join(storage_root, "a"), storage.join(storage_root, "b")
    write_all(first)
    writer = LabelSetWriter(second, FINGERPRINT)
    with pytest.raises(Boom):
        write_segments(writer, 1, fail=True)
    write_all(second)  # resumes: retries the failed shard, writes the rest

    def files(root: str) -> dict[str, bytes]:
        found = storage.glob(storage.join(root, "**", "*.parquet"))
        found += storage.glob(storage.join(root, "done", "**", "*.json"))
        return {u[len(root):]: storage.read_bytes(u) for u in found}

    a, b = files(first), files(second)
    assert len(a) == 2 * 3 + 2 * 1 + 2 * 2 + 2 + 4  # 3+1 tables x 2 shards, 2 globals, 4 markers
    assert a == b
    # a full rerun at the same place skips every shard and leaves the bytes alone
    write_all(first)
    assert files(first) == a


def test_a_different_fingerprint_is_refused(storage_root):
    uri = storage.join(storage_root, "set")
    writer = LabelSetWriter(uri, FINGERPRINT)
    write_segments(writer, 0)
    other = {**FINGERPRINT, "config": {"classes": 1000, "segmenter": "diffcut"}}
    with pytest.raises(LabelSetError, match=r"another config.*config\.classes"):
        LabelSetWriter(uri, other)
    again = LabelSetWriter(uri, dict(reversed(FINGERPRINT.items())))  # same content: resumes
    assert again.is_done("segments", 0)


def test_an_incomplete_set_is_refused_by_the_reader(storage_root):
    uri = storage.join(storage_root, "set")
    with pytest.raises(LabelSetError, match="labelset.json is missing"):
        LabelSet(uri)
    writer = LabelSetWriter(uri, FINGERPRINT)
    for shard in SHARDS:
        write_segments(writer, shard)
    with pytest.raises(LabelSetError, match=rf"{uri} is not a complete label set"):
        LabelSet(uri)


# --------------------------------------------------------------------------- contract checks


def test_tables_and_maps_are_checked_against_the_contract(tmp_path):
    writer = LabelSetWriter(str(tmp_path / "set"), FINGERPRINT)
    with pytest.raises(LabelSetError, match=r"'classes' lacks columns \['area'\]"):
        with writer.shard("labels", 0) as out:
            out.write_table("classes", pa.table({"image_id": ["a"], "class_id": [1]}))
    with pytest.raises(LabelSetError, match="column 'class_id'"):
        with writer.shard("labels", 0) as out:
            out.write_table("classes", pa.table({"image_id": ["a"], "class_id": ["x"],
                                                 "area": [1.0]}))
    with pytest.raises(LabelSetError, match="values outside 0..65535"):
        with writer.shard("labels", 0) as out:
            out.write_maps("labels", {"a": np.full((2, 2), 70000)})
    with pytest.raises(LabelSetError, match="expected 16-bit greyscale"):
        with writer.shard("labels", 0) as out:
            out.write_maps_png("labels", {"a": _png8()})
    with pytest.raises(LabelSetError, match="unknown map kind"):
        with writer.shard("labels", 0) as out:
            out.write_maps("depth", {"a": np.zeros((2, 2), np.uint16)})
    with pytest.raises(LabelSetError, match="invalid stage name"):
        writer.is_done("../escape", 0)
    with pytest.raises(LabelSetError, match="reserved"):
        writer.finish({"contents": {}})
    assert storage.glob(storage.join(str(tmp_path / "set"), "**", "shard-*")) == []


def _png8() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reader_caches_a_few_shard_objects(tmp_path, monkeypatch):
    uri = str(tmp_path / "set")
    write_all(uri)
    reads: list[str] = []
    real = labelset_reader.read_maps_png
    monkeypatch.setattr(labelset_reader, "read_maps_png", lambda u: reads.append(u) or real(u))
    ls = LabelSet(uri, cache_shards=1)
    ls.label_map("img-a")
    ls.label_map("img-b")  # same shard: no new read
    assert len(reads) == 1
    ls.label_map("img-c")  # shard 1 evicts shard 0
    ls.label_map("img-a")
    assert [r.rsplit("/", 1)[1] for r in reads] == ["shard-00000.parquet", "shard-00001.parquet",
                                                    "shard-00000.parquet"]
    clone = pickle.loads(pickle.dumps(ls))  # data-loader workers get a copy with empty caches
    np.testing.assert_array_equal(clone.label_map("img-d"), ls.label_map("img-d"))
