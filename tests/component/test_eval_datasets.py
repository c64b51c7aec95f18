"""Every evaluation dataset reader on a tiny fake copy of its standard layout, written here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from evaluation.datasets import DatasetLayoutError, open_dataset
from evaluation.datasets.cocostuff import fine_to_coarse
from evaluation.datasets.lowshot import class_presence
from shared import storage
from shared.images import encode_jpeg, encode_png
from shared.synthetic import write_synthetic_dataset

H, W = 12, 16


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _jpg(uri: str, seed: int = 0) -> None:
    storage.write_bytes(uri, encode_jpeg(_rgb(seed)))


def _rgb_png(uri: str, seed: int = 0) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(seed)).save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())


def _mask(uri: str, values) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    for i, v in enumerate(values):
        mask[i * 2 : i * 2 + 2] = v
    storage.write_bytes(uri, encode_png(mask))
    return mask


def _palette_mask(uri: str, values) -> None:
    mask = np.zeros((H, W), dtype=np.uint8)
    for i, v in enumerate(values):
        mask[i * 2 : i * 2 + 2] = v
    image = Image.fromarray(mask, mode="P")
    image.putpalette([c for i in range(256) for c in (i, 255 - i, (7 * i) % 256)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "data")
    return f"memory://evaldata-{tmp_path.name}"


def test_voc_trainaug_and_val(root):
    j = storage.join
    storage.write_text(j(root, "VOC2012/ImageSets/Segmentation/train_aug.txt"), "a\nb\n")
    storage.write_text(j(root, "VOC2012/ImageSets/Segmentation/val.txt"), "c\n")
    for i, name in enumerate("abc"):
        _jpg(j(root, f"VOC2012/JPEGImages/{name}.jpg"), i)
    _mask(j(root, "VOC2012/SegmentationClassAug/a.png"), [0, 15, 255])
    _mask(j(root, "VOC2012/SegmentationClassAug/b.png"), [3])
    _palette_mask(j(root, "VOC2012/SegmentationClass/c.png"), [20, 255, 1])
    train = open_dataset("voc", root, "train")
    assert train.image_ids == ["a", "b"] and train.num_classes == 21
    image, target = train.load(0)
    assert image.shape == (H, W, 3) and set(np.unique(target)) == {0, 15, 255}
    val = open_dataset("voc", root, "val")
    assert set(np.unique(val.load(0)[1])) == {0, 1, 20, 255}  # palette indices, not colours
    presence = class_presence(train)
    assert presence.shape == (2, 21)
    assert np.flatnonzero(presence[0]).tolist() == [0, 15]


@pytest.mark.parametrize("nested", ["", "ADEChallengeData2016/"])
def test_ade20k_shifts_labels_and_ignores_zero(root, nested):
    j = storage.join
    for split in ("training", "validation"):
        _jpg(j(root, f"{nested}images/{split}/ADE_{split}_00000001.jpg"))
        _mask(j(root, f"{nested}annotations/{split}/ADE_{split}_00000001.png"), [0, 1, 150, 7])
    ds = open_dataset("ade20k", root, "val")
    assert ds.num_classes == 150 and ds.image_ids == ["ADE_validation_00000001"]
    assert sorted(np.unique(ds.load(0)[1]).tolist()) == [0, 6, 149, 255]


def test_pcontext_keeps_background_as_class_zero(root):
    j = storage.join
    storage.write_text(j(root, "ImageSets/SegmentationContext/val.txt"), "2008_000001\n")
    _jpg(j(root, "JPEGImages/2008_000001.jpg"))
    _mask(j(root, "SegmentationClassContext/2008_000001.png"), [0, 59, 255])
    ds = open_dataset("pcontext", root, "val")
    assert ds.num_classes == 60
    assert sorted(np.unique(ds.load(0)[1]).tolist()) == [0, 59, 255]


@pytest.mark.parametrize("kind", ["labelTrainIds", "labelIds"])
def test_cityscapes_train_ids(root, kind):
    j = storage.join
    for split in ("train", "val"):
        base = f"{split}/aachen/aachen_000000_000019"
        _rgb_png(j(root, f"leftImg8bit/{base}_leftImg8bit.png"))
        values = [0, 18, 255] if kind == "labelTrainIds" else [7, 33, 1, 26]
        _mask(j(root, f"gtFine/{base}_gtFine_{kind}.png"), values)
    _mask(j(root, "gtFine/val/aachen/aachen_000000_000019_gtFine_color.png"), [9])  # ignored
    ds = open_dataset("cityscapes", root, "val")
    assert ds.image_ids == ["aachen_000000_000019"] and ds.num_classes == 19
    expected = [0, 18, 255] if kind == "labelTrainIds" else [0, 13, 18, 255]
    assert sorted(np.unique(ds.load(0)[1]).tolist()) == expected


def test_acdc_reads_every_condition(root):
    j = storage.join
    for cond in ("fog", "night"):
        base = f"{cond}/val/GOPR0475/GOPR0475_frame_000041"
        _rgb_png(j(root, f"rgb_anon/{base}_rgb_anon.png"))
        _mask(j(root, f"gt/{base}_gt_labelTrainIds.png"), [2, 255])
    ds = open_dataset("acdc", root, "val")
    assert len(ds) == 2 and ds.num_classes == 19
    assert sorted(np.unique(ds.load(1)[1]).tolist()) == [0, 2, 255]


def test_cocostuff_maps_fine_to_27_coarse_classes(root):
    j = storage.join
    _jpg(j(root, "images/val2017/000000000139.jpg"))
    _mask(j(root, "annotations/val2017/000000000139.png"), [0, 2, 118, 119, 181, 255])
    ds = open_dataset("cocostuff", root, "val")
    assert ds.num_classes == 27
    # person, car -> vehicle, flower -> plant, fog -> water, wood -> solid, unlabelled
    assert sorted(np.unique(ds.load(0)[1]).tolist()) == [9, 11, 22, 24, 26, 255]


def test_cocostuff_table_landmarks():
    table = fine_to_coarse()
    assert len(table) == 182 and set(table.values()) == set(range(27))
    # stored value = COCO-Stuff id - 1
    assert table[71] == 0  # tv -> electronic
    assert table[77] == 1  # microwave -> appliance
    assert table[91] == 17  # banner -> textile
    assert table[100] == 13  # carpet -> floor
    assert table[101] == 12  # ceiling-other -> ceiling
    assert table[105] == 23  # clouds -> sky
    assert table[170] == 18  # wall-brick -> wall
    assert table[179] == 19  # window-blind -> window


def test_nyu_depth_in_metres(root):
    j = storage.join
    _jpg(j(root, "official_splits/test/bathroom/rgb_00045.jpg"))
    depth = np.zeros((H, W), dtype=np.uint16)
    depth[0, 0], depth[0, 1], depth[0, 2] = 1500, 12000, 0  # 1.5 m, beyond 10 m, missing
    storage.write_bytes(j(root, "official_splits/test/bathroom/sync_depth_00045.png"),
                        encode_png(depth))
    ds = open_dataset("nyu", root, "val")
    assert ds.task == "depth" and ds.image_ids == ["bathroom/00045"]
    target = ds.load(0)[1]
    assert target.dtype == np.float32
    assert target[0, :3].tolist() == [1.5, 0.0, 0.0]


def test_synthetic_scenes(root):
    write_synthetic_dataset(root, num_train=3, num_val=2, size=(28, 28))
    ds = open_dataset("synthetic", root, "train")
    assert len(ds) == 3 and ds.classes[0] == "background"
    image, target = ds.load(2)
    assert image.shape == (28, 28, 3) and target.shape == (28, 28)


@pytest.mark.parametrize("name, expected", [
    ("voc", "JPEGImages"), ("ade20k", "images/validation"), ("pcontext", "JPEGImages"),
    ("cityscapes", "leftImg8bit/val"), ("acdc", "rgb_anon"), ("cocostuff", "images/val2017"),
    ("nyu", "official_splits/test"), ("synthetic", "classes.json"),
])
def test_wrong_layout_names_what_was_expected(tmp_path, name, expected):
    root = str(tmp_path / "not-a-dataset")
    _jpg(storage.join(root, "some/photo.jpg"))
    with pytest.raises(DatasetLayoutError) as err:
        open_dataset(name, root, "val")
    assert expected in str(err.value) and root in str(err.value)


def test_empty_split_list_and_unknown_split(tmp_path):
    root = str(tmp_path / "voc")
    storage.write_text(storage.join(root, "ImageSets/Segmentation/val.txt"), "\n")
    storage.makedirs(storage.join(root, "JPEGImages"))
    storage.makedirs(storage.join(root, "SegmentationClass"))
    _jpg(storage.join(root, "JPEGImages/x.jpg"))
    _mask(storage.join(root, "SegmentationClass/x.png"), [0])
    with pytest.raises(DatasetLayoutError, match="empty"):
        open_dataset("voc", root, "val")
    with pytest.raises(ValueError, match="unknown split"):
        open_dataset("voc", root, "test")
    with pytest.raises(KeyError, match="known datasets"):
        open_dataset("imagenet", root, "val")


def _depth_png(uri: str) -> None:
    storage.write_bytes(uri, encode_png(np.full((H, W), 1500, dtype=np.uint16)))


def _write_val_split(root: str, name: str) -> list[str]:
    """Three val images with their targets in ``name``'s layout; returns the target URIs."""
    j = storage.join
    ids = ["a", "b", "c"]
    if name == "synthetic":
        write_synthetic_dataset(root, num_train=1, num_val=3, size=(H, W))
        return storage.glob(j(root, "masks/val/*.png"))
    layouts = {  # name -> (image path, target path); {} is the image id
        "voc": ("JPEGImages/{}.jpg", "SegmentationClass/{}.png"),
        "pcontext": ("JPEGImages/{}.jpg", "SegmentationClassContext/{}.png"),
        "ade20k": ("images/validation/{}.jpg", "annotations/validation/{}.png"),
        "cocostuff": ("images/val2017/{}.jpg", "annotations/val2017/{}.png"),
        "cityscapes": ("leftImg8bit/val/aachen/{}_leftImg8bit.png",
                       "gtFine/val/aachen/{}_gtFine_labelTrainIds.png"),
        "acdc": ("rgb_anon/fog/val/GOPR0475/{}_rgb_anon.png",
                 "gt/fog/val/GOPR0475/{}_gt_labelTrainIds.png"),
        "nyu": ("official_splits/test/bathroom/rgb_{}.jpg",
                "official_splits/test/bathroom/sync_depth_{}.png"),
    }
    image_path, target_path = layouts[name]
    lists = {"voc": "ImageSets/Segmentation/val.txt",
             "pcontext": "ImageSets/SegmentationContext/val.txt"}
    if name in lists:
        storage.write_text(j(root, lists[name]), "\n".join(ids) + "\n")
    targets = []
    for seed, image_id in enumerate(ids):
        image_uri = j(root, image_path.format(image_id))
        (_rgb_png if image_uri.endswith(".png") else _jpg)(image_uri, seed)
        targets.append(j(root, target_path.format(image_id)))
        if name == "nyu":
            _depth_png(targets[-1])
        else:
            _mask(targets[-1], [1])
    return targets


DATASET_NAMES = ["voc", "pcontext", "ade20k", "cocostuff", "cityscapes", "acdc", "nyu",
                 "synthetic"]


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_a_missing_target_fails_at_open_naming_the_file(root, name):
    targets = _write_val_split(root, name)
    assert len(open_dataset(name, root, "val")) == 3  # complete: opens
    storage.remove(targets[1])
    with pytest.raises(DatasetLayoutError) as err:
        open_dataset(name, root, "val")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name}: 1 of 3 val images have no ")
    assert message.endswith(targets[1]), message
    storage.remove(targets[2])
    assert "2 of 3" in str(pytest.raises(DatasetLayoutError, open_dataset, name, root, "val").value)


def test_a_listed_image_that_is_missing_is_named(root):
    _write_val_split(root, "voc")
    gone = storage.join(root, "JPEGImages/b.jpg")
    storage.remove(gone)
    with pytest.raises(DatasetLayoutError, match="1 of 3 val images listed for the split are "
                                                 "missing") as err:
        open_dataset("voc", root, "val")
    assert str(err.value).endswith(gone)


def test_targets_are_found_under_a_relative_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    targets = _write_val_split("data", "cityscapes")
    assert len(open_dataset("cityscapes", "data", "val")) == 3
    storage.remove(targets[0])
    with pytest.raises(DatasetLayoutError, match="aachen/a_gtFine_labelTrainIds.png"):
        open_dataset("cityscapes", "data", "val")
