"""The labeling service end to end on a local Ray with tiny models: local disk and loopback S3,
a corrupt input, an interrupted run resumed without redoing finished shards, a new K that
keeps the segments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from labeling.pipeline import LabelingRun, run_labeling
from shared import storage
from shared.images import decode_png
from shared.labelset import LabelSet, LabelSetError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM_IMAGES = 10


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_local, tiny_labeling):
    root = tmp_path_factory.mktemp("labeling")
    images = tiny_labeling.images(str(root / "data"))
    cfg = tiny_labeling.config(images, str(root / "labels"))
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


def test_the_label_set_records_the_models_that_made_it(local_run):
    import torch

    from labeling.stages import build_segmenter

    cfg, _ = local_run
    meta = LabelSet(cfg.out).meta
    torch.manual_seed(cfg.seed)
    # the identity a segmenter built from the same config reports, as the workers built it
    expected = json.loads(json.dumps(build_segmenter(cfg, torch.device("cpu")).identity()))
    assert meta["segmenter"] == "diffcut" and meta["segmenter_identity"] == expected
    assert meta["segmenter_identity"]["tau"] == cfg.diffcut.tau
    random_init = {"source": "random", "seed": cfg.seed}  # tiny models: weights from the seed
    assert meta["backbone"] == "vits14" and meta["backbone_weights"] == random_init
    assert meta["segmenter_weights"] == random_init
    assert meta["stage_identities"]["segments"]["weights"] == {"backbone": random_init,
                                                              "segmenter": random_init}
    assert meta["config"]["feature_size"] == cfg.feature_size == 56


def test_rerun_of_a_finished_set_changes_nothing(local_run, tiny_labeling):
    cfg, _ = local_run
    before = tiny_labeling.table_bytes(cfg.out)
    run_labeling(cfg, progress=False)
    assert tiny_labeling.table_bytes(cfg.out) == before


def _files(root: str, folder: str) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of every file below ``root/folder``."""
    base = Path(root) / folder
    return {str(p.relative_to(base)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(base.rglob("*")) if p.is_file()}


def test_interrupted_run_resumes_without_redoing_shards(local_run, tmp_path, s3_bucket,
                                                        s3_proxy, monkeypatch, tiny_labeling):
    ref_cfg, _ = local_run
    images = tiny_labeling.images(f"{s3_bucket}/data")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.endpoint)
    monkeypatch.setenv("DIP_STORAGE_ATTEMPTS", "1")
    cfg = ref_cfg.model_copy(update={"images": images, "out": str(tmp_path / "labels")})
    run = LabelingRun(cfg, progress=False)
    try:
        run.segment()
        run.cluster()
        s3_proxy.fail(method="GET", key_contains="000006.jpg", mode="reset")  # shard 1
        with pytest.raises(Exception, match="000006.jpg"):
            run.label()
    finally:
        run.close()
    with pytest.raises(LabelSetError, match="labelset.json"):
        LabelSet(cfg.out)
    segments = _files(cfg.out, "done/segments")
    labelled = _files(cfg.out, "done/labels")
    assert len(segments) == 3 and 0 < len(labelled) < 3
    s3_proxy.clear()
    run_labeling(cfg, progress=False)
    assert _files(cfg.out, "done/segments") == segments  # stage 2 was not redone
    assert {k: v for k, v in _files(cfg.out, "done/labels").items() if k in labelled} == labelled
    # the same label set as the run from local disk, but for where the images were read from
    ref, ours = (tiny_labeling.table_bytes(c.out) for c in (ref_cfg, cfg))
    assert ref.keys() == ours.keys()
    assert {k: v for k, v in ours.items() if "/images/" not in k} == \
        {k: v for k, v in ref.items() if "/images/" not in k}
    assert LabelSet(cfg.out).images().drop_columns(["uri", "error"]).equals(
        LabelSet(ref_cfg.out).images().drop_columns(["uri", "error"]))


def test_a_new_k_redoes_kmeans_labels_and_pairs_only(local_run, tmp_path, tiny_labeling):
    ref_cfg, _ = local_run
    out = tmp_path / "labels"
    shutil.copytree(ref_cfg.out, out)
    segments = _files(str(out), "tables/segments")
    maps = _files(str(out), "maps/segments")
    cfg = ref_cfg.model_copy(update={"out": str(out), "classes": 5})
    summary = run_labeling(cfg, progress=False)
    assert _files(str(out), "tables/segments") == segments and \
        _files(str(out), "maps/segments") == maps
    ls = LabelSet(cfg.out)
    assert ls.centroids().shape[0] == 5 and ls.meta["num_classes"] == 5
    assert max(c for i in ls.image_ids for c, _ in ls.classes(i)) < 5
    assert summary["images"] == NUM_IMAGES + 1


def test_a_config_that_changes_the_segments_is_refused_before_work(local_run):
    cfg, _ = local_run
    other = cfg.model_copy(update={"diffcut": cfg.diffcut.model_copy(update={"tau": 0.4})})
    with pytest.raises(LabelSetError, match="diffcut"):
        LabelingRun(other, progress=False)


def test_missing_and_empty_inputs_fail_clearly(tmp_path, tiny_labeling):
    config = tiny_labeling.config
    with pytest.raises(FileNotFoundError, match="not found"):
        LabelingRun(config(str(tmp_path / "nope"), str(tmp_path / "out")), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        LabelingRun(config(str(tmp_path / "empty"), str(tmp_path / "out")), progress=False)
    images = tiny_labeling.images(str(tmp_path / "data"), corrupt=False)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(storage.StorageError, match="not writable"):
        LabelingRun(config(images, str(tmp_path / "a_file" / "labels")), progress=False)


def test_s3_in_and_out(s3_bucket, ray_local, tiny_labeling):
    images = tiny_labeling.images(f"{s3_bucket}/data", corrupt=False)
    cfg = tiny_labeling.config(images, f"{s3_bucket}/labels")
    summary = run_labeling(cfg, progress=False)
    ls = LabelSet(cfg.out)
    assert summary["images_failed"] == 0
    assert len(ls.image_ids) == NUM_IMAGES
    assert ls.label_map(ls.image_ids[0]).shape == (64, 80)


def test_synthetic_default_reports_quality(tmp_path, ray_local, tiny_labeling):
    cfg = tiny_labeling.config("synthetic", str(tmp_path / "labels"), synthetic_images=8,
                      synthetic_size=64)
    summary = run_labeling(cfg, progress=False)
    quality = summary["quality"]
    assert quality["images"] == 8
    ls = LabelSet(cfg.out)
    masks = Path(ls.meta["images_uri"]).parents[1] / "masks" / "train"
    truth = {i: decode_png((masks / f"{i}.png").read_bytes()) for i in ls.image_ids}
    hungarian, majority = _unsupervised_mious(truth, {i: ls.label_map(i) for i in ls.image_ids},
                                              ls.num_classes)
    assert quality["hungarian_miou"] == pytest.approx(hungarian, abs=6e-5)  # rounded to 4 places
    assert quality["majority_miou"] == pytest.approx(majority, abs=6e-5)
    assert ls.meta["counts"]["quality"] == quality


def _unsupervised_mious(truth: dict, pred: dict, num_classes: int) -> tuple[float, float]:
    """(Hungarian, majority) mIoU over the true classes present, computed from the maps."""
    from scipy.optimize import linear_sum_assignment

    t = np.concatenate([truth[i].reshape(-1) for i in truth]).astype(np.int64)
    p = np.concatenate([pred[i].reshape(-1) for i in truth]).astype(np.int64)
    t, p = t[t != 255], p[t != 255]
    conf = np.zeros((t.max() + 1, num_classes), np.int64)  # conf[true, pseudo] pixels
    np.add.at(conf, (t, p), 1)

    def miou(assign: dict[int, list[int]]) -> float:  # true class -> the pseudo-classes read as it
        ious = []
        for c in np.flatnonzero(conf.sum(1)):
            cols = assign.get(int(c), [])
            tp = conf[c, cols].sum()
            ious.append(tp / (conf[c].sum() + conf[:, cols].sum() - tp))
        return float(np.mean(ious))

    rows, cols = linear_sum_assignment(-conf)
    one_to_one = {int(r): [int(c)] for r, c in zip(rows, cols, strict=True)}
    many_to_one: dict[int, list[int]] = {}
    for j in np.flatnonzero(conf.sum(0)):
        many_to_one.setdefault(int(conf[:, j].argmax()), []).append(int(j))
    return miou(one_to_one), miou(many_to_one)
