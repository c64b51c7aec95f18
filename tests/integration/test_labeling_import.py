"""labeling.import: 224 x 224 ``.pt`` class maps with a pairs file (the authors' release format)
become a label set that trains; ground-truth masks become an oracle label set equal to the
masks; bad maps are recorded against their image by name; a bad pairs file is an error naming the
file and line; the CLI reports it in one line."""

from __future__ import annotations

import importlib
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from labeling.import_work import class_regions
from labeling.importing import ImportConfig, LabelImportError, import_labels
from shared import storage
from shared.images import decode_image, decode_png, resize_labels, train_geometry
from shared.labelset import LabelSet, LabelSetError
from shared.synthetic import CLASS_NAMES, write_synthetic_dataset
from training.config import TrainConfig
from training.episodes import crop_item
from training.run import run_training

MAP_SIDE = 224


def read_masks(root: str) -> dict[str, np.ndarray]:
    """The train masks of a synthetic dataset by image id."""
    uris = storage.glob(storage.join(root, "masks", "train", "*.png"))
    return {u.rsplit("/", 1)[1][:-4]: decode_png(storage.read_bytes(u)) for u in uris}


def write_pt_maps(folder, masks: dict[str, np.ndarray]) -> str:
    """One 224 x 224 int64 tensor of class ids per image, named after it (the released form)."""
    folder.mkdir(parents=True, exist_ok=True)
    for image_id, mask in masks.items():
        tensor = resize_labels(torch.from_numpy(mask.astype(np.int64)), (MAP_SIDE, MAP_SIDE))
        torch.save(tensor, folder / f"{image_id}.pt")
    return str(folder)


def write_pairs(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cyclic_pairs(ids: list[str]) -> list[str]:
    """``query.jpg: positive.jpg`` with image i's positive the next image."""
    return [f"{q}.jpg: {p}.jpg" for q, p in zip(ids, ids[1:] + ids[:1], strict=True)]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> str:
    """16 synthetic 64 x 64 scenes without ignore pixels."""
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("scenes") / "data"), num_train=16,
                                   num_val=0, size=(64, 64), seed=11)


@pytest.fixture(scope="module")
def bordered(tmp_path_factory) -> str:
    """24 synthetic 64 x 64 scenes whose masks mark a 1-pixel border at each edge as ignore."""
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("bordered") / "data"),
                                   num_train=24, num_val=0, size=(64, 64), seed=12,
                                   ignore_border=1)


def check_tables(labels: LabelSet, masks: dict[str, np.ndarray], ignore: int | None) -> None:
    """Label maps equal the masks; classes and segment maps are derived from them exactly."""
    assert sorted(labels.image_ids) == sorted(masks)
    for image_id, mask in masks.items():
        got = labels.label_map(image_id)
        np.testing.assert_array_equal(got, mask, err_msg=image_id)
        ids, counts = np.unique(mask, return_counts=True)
        keep = ids != ignore
        want = list(zip(ids[keep].tolist(), (counts[keep] / mask.size).tolist(), strict=True))
        got_classes = labels.classes(image_id)
        assert [c for c, _ in got_classes] == [c for c, _ in want]
        np.testing.assert_allclose([a for _, a in got_classes], [a for _, a in want], rtol=1e-6)
        seg = labels.segment_map(image_id).astype(np.int64)
        assert np.array_equal(np.unique(seg), np.arange(seg.max() + 1))
        # one class per segment, and as many segments as connected regions of one class
        assert len(np.unique(seg * 65536 + got)) == seg.max() + 1
        regions = sum(ndimage.label(got == c)[1] for c in np.unique(got))
        assert seg.max() + 1 == regions, image_id


def tiny_train(labels: str, out: str) -> TrainConfig:
    """Two steps of a tiny model on 56 x 56 crops (as tests/integration/test_training_run.py)."""
    return TrainConfig(labels=labels, out=out, backbone="vits14", tiny=True, weights=None,
                       head_dim=32, resize=64, crop=56, batch_size=8, micro_batch_size=8,
                       base_lr=1e-3 * 256 / 8, loader_workers=0, checkpoint_every=1000,
                       epochs=1)


def test_pt_maps_and_pairs_file_import_and_train(scenes, tmp_path):
    masks = read_masks(scenes)
    ids = sorted(masks)
    maps = write_pt_maps(tmp_path / "maps", masks)
    pairs = write_pairs(tmp_path / "pairs.txt", cyclic_pairs(ids) + [""])
    out = str(tmp_path / "labels")
    # weights "hub" would need the network: with a pairs file no encoder is loaded at all
    summary = import_labels(ImportConfig(images=f"{scenes}/images/train", maps=maps,
                                         pairs=pairs, out=out))
    assert summary["images_ok"] == 16 and summary["images_failed"] == 0
    assert summary["pairs"] == summary["pairs_file_lines"] == 16
    labels = LabelSet(out)
    # 64 -> 224 -> 64 nearest is the identity: the maps read back equal the masks
    check_tables(labels, masks, ignore=None)
    assert labels.num_classes == max(int(m.max()) for m in masks.values()) + 1
    assert labels.meta["source"]["kind"] == "class_maps"
    assert labels.meta["source"]["pairs_uri"] == pairs and labels.meta["ignore_index"] is None
    table = labels.pairs().to_pylist()
    assert [(r["query_id"], r["positive_id"]) for r in table] == list(
        zip(ids, ids[1:] + ids[:1], strict=True))
    for row in table:  # the class shared with the largest smaller area (background here)
        q, p = dict(labels.classes(row["query_id"])), dict(labels.classes(row["positive_id"]))
        best = max(min(q[c], p[c]) for c in set(q) & set(p))
        assert min(q[row["class_id"]], p[row["class_id"]]) == pytest.approx(best)
        assert row["query_area"] == pytest.approx(q[row["class_id"]])
    result = run_training(tiny_train(out, str(tmp_path / "run")))
    assert result.step == result.total_steps == 2 and math.isfinite(result.last_loss)


def test_train_crop_view_gives_training_back_the_map(tmp_path):
    # 300 x 400 images: the released 224 x 224 labels are their Resize(256) + CenterCrop(224)
    root = write_synthetic_dataset(str(tmp_path / "data"), num_train=2, num_val=0,
                                   size=(300, 400), seed=5)
    masks = read_masks(root)
    (tmp_path / "maps").mkdir()
    crops = {}
    for image_id, mask in masks.items():
        image = decode_image(storage.read_bytes(f"{root}/images/train/{image_id}.jpg"))
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        _, crops[image_id] = train_geometry(pixels, torch.from_numpy(mask.astype(np.int64)))
        torch.save(crops[image_id], tmp_path / "maps" / f"{image_id}.pt")
    ids = sorted(masks)
    out = str(tmp_path / "labels")
    import_labels(ImportConfig(images=f"{root}/images/train", maps=str(tmp_path / "maps"),
                               pairs=write_pairs(tmp_path / "p.txt", cyclic_pairs(ids)), out=out,
                               map_view="train_crop"))
    labels = LabelSet(out)
    for image_id in ids:
        stored = labels.label_map(image_id)
        assert stored.shape == (300, 400)
        pixels = torch.zeros(3, 300, 400, dtype=torch.uint8)
        _, seen = crop_item(pixels, stored, 256, 224)
        assert torch.equal(seen, crops[image_id]), image_id


def test_oracle_from_masks_equals_the_ground_truth(bordered, tmp_path):
    masks = read_masks(bordered)
    assert any((m == 255).any() for m in masks.values())
    out = str(tmp_path / "oracle")
    summary = import_labels(ImportConfig(
        masks=f"{bordered}/masks/train", images=f"{bordered}/images/train", out=out,
        backbone="vits14", weights=None, tiny=True, feature_size=112))
    assert summary["images_ok"] == 24
    labels = LabelSet(out)
    check_tables(labels, masks, ignore=255)
    assert labels.meta["ignore_index"] == 255 and labels.meta["source"]["kind"] == "ground_truth"
    assert labels.num_classes == max(int(m[m != 255].max()) for m in masks.values()) + 1
    assert labels.table("globals").num_rows == 24  # pairs computed with the tiny encoder
    pairs = labels.pairs().to_pylist()
    assert 0 < len(pairs) <= 5 * 24
    for row in pairs:  # the service's rule: a class covering more than 5% of both images
        assert row["query_id"] != row["positive_id"]
        q, p = dict(labels.classes(row["query_id"])), dict(labels.classes(row["positive_id"]))
        assert q[row["class_id"]] > 0.05 and p[row["class_id"]] > 0.05
    # the same scenes read through their dataset layout: K is the dataset's class count
    by_layout = str(tmp_path / "by_layout")
    import_labels(ImportConfig(dataset="synthetic", images=bordered, out=by_layout,
                               backbone="vits14", weights=None, tiny=True, feature_size=112))
    other = LabelSet(by_layout)
    assert other.num_classes == len(CLASS_NAMES)
    check_tables(other, masks, ignore=255)
    assert other.pairs().to_pylist() == pairs  # same images, same encoder, same pairs


class NotATensor:
    """A pickled object that torch.load(weights_only=True) must refuse to build."""


def test_bad_maps_are_recorded_against_their_image_by_name(scenes, tmp_path):
    masks = read_masks(scenes)
    ids = sorted(masks)
    folder = tmp_path / "maps"
    write_pt_maps(folder, masks)
    torch.save(torch.zeros(MAP_SIDE, MAP_SIDE), folder / f"{ids[0]}.pt")  # float
    torch.save(torch.zeros(1, MAP_SIDE, MAP_SIDE, dtype=torch.long), folder / f"{ids[1]}.pt")
    (folder / f"{ids[2]}.pt").write_bytes(pickle.dumps(NotATensor(), protocol=2))
    torch.save({"labels": NotATensor()}, folder / f"{ids[3]}.pt")
    (folder / f"{ids[4]}.pt").unlink()
    (folder / f"{ids[4]}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # undecodable
    (folder / f"{ids[5]}.pt").unlink()  # no map at all
    (folder / f"{ids[6]}.png").write_bytes((folder / f"{ids[4]}.png").read_bytes())  # two maps
    torch.save(torch.full((MAP_SIDE, MAP_SIDE), -3), folder / f"{ids[7]}.pt")
    torch.save(torch.zeros(4, 4, dtype=torch.long), folder / "ghost.pt")  # no such image
    out = str(tmp_path / "labels")
    summary = import_labels(ImportConfig(
        images=f"{scenes}/images/train", maps=str(folder), out=out,
        pairs=write_pairs(tmp_path / "pairs.txt", cyclic_pairs(ids))))
    assert summary["images_failed"] == 8 and summary["images_ok"] == 8
    assert summary["maps_without_image"] == 1
    labels = LabelSet(out)
    assert labels.meta["source"]["maps_without_image"] == [str(folder / "ghost.pt")]
    errors = dict(zip(labels.images().column("image_id").to_pylist(),
                      labels.images().column("error").to_pylist(), strict=True))
    expected = {0: ("dtype torch.float32",), 1: ("shape (1, 224, 224)",),
                2: ("weights_only=True",), 3: ("weights_only=True",),
                4: (".png", "not a readable image"), 5: ("no map", f"{ids[5]}.pt or .png"),
                6: ("two maps",), 7: ("negative value -3",)}
    for k, words in expected.items():
        error = errors[ids[k]]
        named = ids[k] + (".png" if k == 4 else ".pt" if k in (0, 1, 2, 3, 7) else "")
        assert error and named in error and all(w in error for w in words), (k, error)
    assert all(errors[i] is None for i in ids[8:]) and labels.image_ids == ids[8:]
    kept = labels.pairs().to_pylist()
    assert summary["pairs_dropped"] == 16 - len(kept) == 9  # each pair naming a failed image
    assert {r["query_id"] for r in kept} | {r["positive_id"] for r in kept} <= set(ids[8:])


def test_a_malformed_pairs_file_is_an_error_naming_the_file_and_line(scenes, tmp_path):
    masks = read_masks(scenes)
    ids = sorted(masks)
    maps = write_pt_maps(tmp_path / "maps", {i: masks[i] for i in ids})
    base = dict(images=f"{scenes}/images/train", maps=maps, out=str(tmp_path / "out"))
    bad = write_pairs(tmp_path / "bad.txt", [f"{ids[0]}.jpg: {ids[1]}.jpg",
                                             f"{ids[1]}.jpg {ids[2]}.jpg"])
    with pytest.raises(LabelImportError, match=rf"pairs file {bad} line 2: expected"):
        import_labels(ImportConfig(pairs=bad, **base))
    unknown = write_pairs(tmp_path / "unknown.txt", [f"{ids[0]}.jpg: elsewhere.jpg"])
    with pytest.raises(LabelImportError, match=rf"{unknown} line 1: 'elsewhere.jpg' is not an "
                                               "image of the image folder"):
        import_labels(ImportConfig(pairs=unknown, **base))
    assert not storage.exists(base["out"])  # refused before anything was written
    cli = importlib.import_module("labeling.import")
    result = CliRunner().invoke(cli.app, ["--images", base["images"], "--maps", maps,
                                          "--pairs", bad, "--out", base["out"], "--quiet"])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("labeling.import: error: pairs file ") and "line 2" in line
    assert not storage.exists(base["out"])


def test_rerun_resumes_and_a_changed_setting_is_refused(scenes, tmp_path):
    masks = read_masks(scenes)
    ids = sorted(masks)
    cfg = ImportConfig(images=f"{scenes}/images/train", maps=write_pt_maps(tmp_path / "m", masks),
                       pairs=write_pairs(tmp_path / "p.txt", cyclic_pairs(ids)),
                       out=str(tmp_path / "labels"), shard_size=5)
    first = import_labels(cfg)
    assert first["shards"] == 4
    again = import_labels(cfg)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in first.items() if k != "seconds"}
    with pytest.raises(LabelSetError, match="another config"):
        import_labels(cfg.model_copy(update={"segments": "classes"}))
    redone = import_labels(cfg.model_copy(update={"segments": "classes"}), resume=False)
    assert redone["segments"] < first["segments"]  # one segment per class, not per region


def test_an_encoder_failing_on_every_image_fails_the_shard(scenes, tmp_path, monkeypatch):
    from labeling.stages import LabelingModels, ShardEnvironmentError

    def broken(self, images):
        raise RuntimeError("device lost")

    monkeypatch.setattr(LabelingModels, "encode", broken)
    out = str(tmp_path / "labels")
    with pytest.raises(ShardEnvironmentError, match="every image failed in the models"):
        import_labels(ImportConfig(masks=f"{scenes}/masks/train", images=f"{scenes}/images/train",
                                   out=out, weights=None, tiny=True, feature_size=112))
    assert not storage.exists(storage.join(out, "done"))  # nothing committed: a rerun retries


def test_class_regions_are_the_connected_regions_of_one_value():
    labels = np.array([[1, 1, 2, 1],
                       [2, 1, 2, 1],
                       [2, 2, 1, 1]])
    regions, count = class_regions(labels)
    assert count == 4
    assert regions.tolist() == [[0, 0, 1, 2],
                                [3, 0, 1, 2],
                                [3, 3, 2, 2]]  # diagonal neighbours do not connect


def test_the_command_line_help_runs():
    done = subprocess.run([sys.executable, "-m", "labeling.import", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--maps" in done.stdout and "--pairs" in done.stdout and "--masks" in done.stdout
