"""The labeling service end to end on a local Ray with tiny models: local disk and loopback S3,
a corrupt input, an interrupted run resumed without redoing finished shards."""

from __future__ import annotations

import numpy as np
import pytest

from labeling.config import LabelConfig
from labeling.pipeline import LabelingRun, run_labeling
from shared import storage
from shared.labelset import LabelSet, LabelSetError
from shared.synthetic import write_synthetic_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM_IMAGES = 10


def tiny_config(images: str, out: str, **kw) -> LabelConfig:
    base = dict(images=images, out=out, tiny=True, classes=6, shard_size=4, batch_size=4,
                actors=1, feature_size=56, kmeans_niter=10)
    base["diffcut"] = {"resolution": 128}
    base.update(kw)
    return LabelConfig.model_validate(base)


def make_images(root: str, corrupt: bool = True) -> str:
    write_synthetic_dataset(root, num_train=NUM_IMAGES, num_val=0, size=(64, 80), seed=3)
    images = storage.join(root, "images", "train")
    if corrupt:
        storage.write_bytes(storage.join(images, "zz_corrupt.jpg"), b"\xff\xd8\xff\xe0 not a jpeg")
    return images


def table_bytes(uri: str) -> dict[str, bytes]:
    """Every Parquet object of a label set, by relative path."""
    fs, base = storage.url_to_fs(uri)
    out = {}
    for path in sorted(fs.find(base)):
        if path.endswith(".parquet"):
            out[path[len(base):]] = fs.cat_file(path)
    return out


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("labeling")
    images = make_images(str(root / "data"))
    cfg = tiny_config(images, str(root / "labels"))
    summary = run_labeling(cfg, progress=False)
    return cfg, summary


def test_local_run_writes_a_complete_label_set(local_run):
    cfg, summary = local_run
    assert summary["images"] == NUM_IMAGES + 1
    assert summary["images_failed"] == 1
    ls = LabelSet(cfg.out)
    images = ls.images().to_pylist()
    bad = [r for r in images if r["image_id"] == "zz_corrupt"]
    assert bad and bad[0]["status"] == "error" and "zz_corrupt.jpg" in bad[0]["error"]
    assert len(ls.image_ids) == NUM_IMAGES
    for iid in ls.image_ids:
        seg = ls.segment_map(iid)
        lab = ls.label_map(iid)
        assert seg.shape == lab.shape == (64, 80)
        assert seg.dtype == np.uint16 and lab.dtype == np.uint16
        # ids contiguous from 0; each segment carries one pseudo-class
        assert np.array_equal(np.unique(seg), np.arange(seg.max() + 1))
        for s in np.unique(seg):
            assert len(np.unique(lab[seg == s])) == 1
        areas = dict(ls.classes(iid))
        assert abs(sum(areas.values()) - 1.0) < 1e-4
        assert set(areas) == set(np.unique(lab).tolist())
    assert ls.centroids().shape[0] == cfg.classes
    pairs = ls.pairs().to_pylist()
    for p in pairs:
        assert p["query_id"] != p["positive_id"]
        assert p["query_area"] > cfg.min_area and p["positive_area"] > cfg.min_area
        assert dict(ls.classes(p["query_id"]))[p["class_id"]] == pytest.approx(p["query_area"])
    assert summary["pairs"] == len(pairs)


def test_rerun_of_a_finished_set_changes_nothing(local_run):
    cfg, _ = local_run
    before = table_bytes(cfg.out)
    run_labeling(cfg, progress=False)
    assert table_bytes(cfg.out) == before


def test_interrupted_run_resumes_without_redoing_shards(local_run, tmp_path, monkeypatch):
    ref_cfg, _ = local_run
    cfg = ref_cfg.model_copy(update={"out": str(tmp_path / "labels")})
    calls = {"labels": 0, "segments": 0}
    write_labels = LabelingRun._write_labels
    write_segments = LabelingRun._write_segments

    def failing_labels(self, shard, rows):
        calls["labels"] += 1
        if calls["labels"] == 2:
            raise RuntimeError("simulated crash after one shard")
        return write_labels(self, shard, rows)

    monkeypatch.setattr(LabelingRun, "_write_labels", failing_labels)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_labeling(cfg, progress=False)
    with pytest.raises(LabelSetError, match="labelset.json"):
        LabelSet(cfg.out)

    def counting_segments(self, shard, rows):
        calls["segments"] += 1
        return write_segments(self, shard, rows)

    monkeypatch.setattr(LabelingRun, "_write_labels", write_labels)
    monkeypatch.setattr(LabelingRun, "_write_segments", counting_segments)
    run_labeling(cfg, progress=False)
    assert calls["segments"] == 0  # stage 2 was finished before the crash
    assert table_bytes(cfg.out) == table_bytes(ref_cfg.out)


def test_other_config_at_same_uri_is_refused_before_work(local_run):
    cfg, _ = local_run
    other = cfg.model_copy(update={"classes": 5})
    with pytest.raises(LabelSetError, match="classes"):
        LabelingRun(other, progress=False)


def test_missing_and_empty_inputs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LabelingRun(tiny_config(str(tmp_path / "nope"), str(tmp_path / "out")), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        LabelingRun(tiny_config(str(tmp_path / "empty"), str(tmp_path / "out")), progress=False)
    images = make_images(str(tmp_path / "data"), corrupt=False)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(storage.StorageError, match="not writable"):
        LabelingRun(tiny_config(images, str(tmp_path / "a_file" / "labels")), progress=False)


def test_s3_in_and_out(s3_bucket, ray_local):
    images = make_images(f"{s3_bucket}/data", corrupt=False)
    cfg = tiny_config(images, f"{s3_bucket}/labels")
    summary = run_labeling(cfg, progress=False)
    ls = LabelSet(cfg.out)
    assert summary["images_failed"] == 0
    assert len(ls.image_ids) == NUM_IMAGES
    assert ls.label_map(ls.image_ids[0]).shape == (64, 80)


def test_synthetic_default_reports_quality(tmp_path, ray_local):
    cfg = tiny_config("synthetic", str(tmp_path / "labels"), synthetic_images=8,
                      synthetic_size=64)
    summary = run_labeling(cfg, progress=False)
    quality = summary["quality"]
    assert quality["images"] == 8
    assert 0.0 <= quality["hungarian_miou"] <= 1.0
    assert 0.0 <= quality["majority_miou"] <= 1.0
    assert LabelSet(cfg.out).meta["counts"]["quality"] == quality
