"""shared/synthetic.py: deterministic scenes, shapes and textures, the on-disk dataset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from shared.images import decode_image, decode_png
from shared.synthetic import (
    CLASS_NAMES,
    IGNORE_INDEX,
    add_ignore_border,
    checkerboard,
    dots,
    make_scene,
    scene_seed,
    shape_mask,
    stripes,
    value_noise,
    waves,
    write_synthetic_dataset,
)

NUM_CLASSES = len(CLASS_NAMES)


def test_class_list():
    assert CLASS_NAMES[0] == "background"
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) >= 6


def test_same_seed_same_scene_and_different_seeds_differ():
    image_a, mask_a = make_scene(7, (40, 56))
    image_b, mask_b = make_scene(7, (40, 56))
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_array_equal(mask_a, mask_b)
    image_c, mask_c = make_scene(8, (40, 56))
    assert not np.array_equal(image_a, image_c)
    assert image_a.shape == (40, 56, 3) and image_a.dtype == np.uint8
    assert mask_a.shape == (40, 56) and mask_a.dtype == np.uint8


def test_masks_hold_valid_ids_and_every_class_appears():
    seen = np.zeros(NUM_CLASSES, dtype=int)
    for seed in range(30):
        _, mask = make_scene(seed, (64, 64))
        values = np.unique(mask)
        assert values.max() < NUM_CLASSES
        seen[values] += 1
    assert (seen > 0).all(), f"classes never drawn: {np.flatnonzero(seen == 0)}"
    assert seen[0] == 30  # objects never cover a whole scene


def _instance_colours(seeds):
    """Mean RGB of each (scene, class) region with at least 50 pixels."""
    colours, classes = [], []
    for seed in seeds:
        image, mask = make_scene(seed, (96, 96))
        for cls in range(1, NUM_CLASSES):
            region = mask == cls
            if region.sum() >= 50:
                colours.append(image[region].mean(axis=0))
                classes.append(cls)
    return np.array(colours), np.array(classes)


def test_colour_alone_does_not_identify_the_class():
    train_x, train_y = _instance_colours(range(0, 60))
    test_x, test_y = _instance_colours(range(1000, 1060))
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in range(1, NUM_CLASSES)])
    dist = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)  # (N, C-1)
    accuracy = (dist.argmin(axis=1) + 1 == test_y).mean()
    chance = 1.0 / (NUM_CLASSES - 1)
    assert accuracy < chance + 0.2, f"nearest colour centroid reaches {accuracy:.2f}"
    # instance colours spread widely within every class
    for cls in range(1, NUM_CLASSES):
        assert train_x[train_y == cls].std(axis=0).min() > 25


def _area(cls, radius, param, step=0.25):
    """Pixel-counted area of a shape on a fine grid (units of pixels squared)."""
    coords = np.arange(-1.3 * radius, 1.3 * radius, step) + step / 2
    u, v = np.meshgrid(coords, coords, indexing="xy")
    return shape_mask(cls, u, v, radius, param).sum() * step * step


@pytest.mark.parametrize(
    "name, param, expected",
    [
        ("striped_disc", 0.0, np.pi * 40**2),
        ("checkered_square", 0.0, (2 * 0.8 * 40) ** 2),
        ("dotted_triangle", 0.0, 3 * np.sqrt(3) / 4 * 40**2),
        ("noisy_ring", 0.5, np.pi * 40**2 * (1 - 0.5**2)),
        ("wavy_bar", 0.4, np.pi * 40 * (0.4 * 40)),
    ],
)
def test_shape_areas_match_their_formulas(name, param, expected):
    assert _area(CLASS_NAMES.index(name), 40.0, param) == pytest.approx(expected, rel=0.01)


def test_triangle_vertices_lie_on_the_circumcircle():
    cls = CLASS_NAMES.index("dotted_triangle")
    angles = -np.pi / 2 + 2 * np.pi * np.arange(3) / 3  # opposite the edge normals
    u, v = 0.99 * 10 * np.cos(angles), 0.99 * 10 * np.sin(angles)
    assert shape_mask(cls, u, v, 10.0, 0.0).all()
    assert not shape_mask(cls, -u, -v, 10.0, 0.0).any()  # the opposite points are outside


def test_textures_hand_values():
    u = np.arange(8, dtype=np.float64) + 0.5
    np.testing.assert_array_equal(stripes(u, 4.0, 0.0), [1, 1, 0, 0, 1, 1, 0, 0])
    grid_u, grid_v = np.meshgrid(u[:4], u[:4], indexing="xy")
    board = checkerboard(grid_u, grid_v, 2.0)
    np.testing.assert_array_equal(board[:2, :2], 0)
    np.testing.assert_array_equal(board[:2, 2:], 1)
    np.testing.assert_array_equal(board[2:, :2], 1)
    np.testing.assert_array_equal(board[2:, 2:], 0)
    fine = np.arange(0, 100, 0.1) + 0.05
    fu, fv = np.meshgrid(fine, fine, indexing="xy")
    # dots of radius 0.3 p cover pi 0.3^2 of each cell
    assert dots(fu, fv, 10.0).mean() == pytest.approx(np.pi * 0.09, rel=0.01)
    wave = waves(fu, fv, 10.0)
    assert wave.min() >= 0.0 and wave.max() <= 1.0 and wave.mean() == pytest.approx(0.5, abs=0.01)


def test_value_noise_interpolates_its_lattice_by_smoothstep():
    # cell 1/2: every pixel centre lies on a lattice point, which it reproduces exactly
    lattice = np.random.default_rng(3).random((2 * 5 + 1, 2 * 7 + 1, 2), dtype=np.float32)
    on_points = value_noise(np.random.default_rng(3), 5, 7, cell=0.5, channels=2)
    np.testing.assert_array_equal(on_points, lattice[1::2, 1::2][:5, :7])
    # cell 1: every pixel centre is the middle of a lattice square, smoothstep(1/2) = 1/2
    lattice = np.random.default_rng(4).random((6, 8, 1), dtype=np.float32)
    middle = value_noise(np.random.default_rng(4), 5, 7, cell=1.0)
    corners = (lattice[:-1, :-1] + lattice[1:, :-1] + lattice[:-1, 1:] + lattice[1:, 1:]) / 4
    np.testing.assert_allclose(middle, corners, atol=1e-6)
    # cell 2: centres a quarter into a square, weight smoothstep(1/4) = 5/32 (linear: 8/32)
    lattice = np.random.default_rng(5).random((4, 5, 1), dtype=np.float32)  # ceil(6/2)+1, ceil(8/2)+1
    quarter = value_noise(np.random.default_rng(5), 6, 8, cell=2.0)
    w = np.array([5 / 32, 27 / 32] * 4, np.float32)  # row / column i: weight of the next point
    i = np.arange(8) // 2
    expected = ((1 - w[:6, None]) * ((1 - w[None]) * lattice[i[:6]][:, i, 0]
                                     + w[None] * lattice[i[:6]][:, i + 1, 0])
                + w[:6, None] * ((1 - w[None]) * lattice[i[:6] + 1][:, i, 0]
                                 + w[None] * lattice[i[:6] + 1][:, i + 1, 0]))
    np.testing.assert_allclose(quarter[..., 0], expected, atol=1e-6)


def test_value_noise_is_smooth_and_bounded():
    rng = np.random.default_rng(0)
    field = value_noise(rng, 64, 80, cell=16.0, channels=2)
    assert field.shape == (64, 80, 2) and field.dtype == np.float32
    assert field.min() >= 0.0 and field.max() <= 1.0  # convex weights of uniform values
    # neighbours on a 16-pixel lattice differ far less than independent uniforms (mean 1/3)
    assert np.abs(np.diff(field, axis=1)).mean() < 0.05
    again = value_noise(np.random.default_rng(0), 64, 80, cell=16.0, channels=2)
    np.testing.assert_array_equal(field, again)


def test_ignore_border_hand_example():
    mask = np.zeros((5, 5), dtype=np.uint8)
    mask[2, 2] = 3
    expected = np.zeros((5, 5), dtype=np.uint8)
    expected[1:4, 1:4] = IGNORE_INDEX
    np.testing.assert_array_equal(add_ignore_border(mask, 1), expected)
    np.testing.assert_array_equal(add_ignore_border(mask, 0), mask)


def test_scene_ignore_border_only_near_boundaries():
    _, plain = make_scene(3, (64, 64))
    _, bordered = make_scene(3, (64, 64), ignore_border=1)
    ignored = bordered == IGNORE_INDEX
    assert ignored.any() and ignored.mean() < 0.25
    np.testing.assert_array_equal(bordered[~ignored], plain[~ignored])


def test_scene_seeds_depend_on_split_and_index():
    seeds = {scene_seed(0, split, i) for split in ("train", "val") for i in range(50)}
    assert len(seeds) == 100
    assert scene_seed(0, "train", 3) == scene_seed(0, "train", 3) != scene_seed(1, "train", 3)


def _files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def test_written_dataset_layout_and_contents(tmp_path):
    root = str(tmp_path / "synth")
    assert write_synthetic_dataset(root, num_train=3, num_val=2, size=(48, 64), seed=5) == root
    assert _files(root) == sorted(
        ["classes.json"]
        + [f"images/train/{i:06d}.jpg" for i in range(3)]
        + [f"masks/train/{i:06d}.png" for i in range(3)]
        + [f"images/val/{i:06d}.jpg" for i in range(3, 5)]
        + [f"masks/val/{i:06d}.png" for i in range(3, 5)]
    )
    meta = json.loads((tmp_path / "synth" / "classes.json").read_text())
    assert meta == {"classes": CLASS_NAMES, "ignore_index": 255}
    for split, index, name in (("train", 1, "000001"), ("val", 0, "000003")):
        image_path = tmp_path / "synth" / "images" / split / f"{name}.jpg"
        image = decode_image(image_path.read_bytes(), name=str(image_path))
        mask = decode_png((tmp_path / "synth" / "masks" / split / f"{name}.png").read_bytes())
        expected_image, expected_mask = make_scene(scene_seed(5, split, index), (48, 64))
        assert image.shape == (48, 64, 3) and mask.shape == (48, 64) and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, expected_mask)  # PNG is lossless
        assert np.abs(image.astype(int) - expected_image.astype(int)).mean() < 4  # JPEG q95, 4:4:4


def test_same_seed_writes_identical_bytes(tmp_path):
    roots = [str(tmp_path / name) for name in ("a", "b", "c")]
    write_synthetic_dataset(roots[0], num_train=2, num_val=1, size=(32, 32), seed=1)
    write_synthetic_dataset(roots[1], num_train=2, num_val=1, size=(32, 32), seed=1)
    write_synthetic_dataset(roots[2], num_train=2, num_val=1, size=(32, 32), seed=2)
    files = _files(roots[0])
    assert files == _files(roots[1]) == _files(roots[2])

    def read(root, name):
        with open(os.path.join(root, name), "rb") as handle:
            return handle.read()

    assert all(read(roots[0], f) == read(roots[1], f) for f in files)
    assert any(read(roots[0], f) != read(roots[2], f) for f in files if f.endswith(".png"))


@pytest.mark.integration
def test_dataset_on_any_storage(storage_root):
    from shared import storage

    root = storage.join(storage_root, "synth")
    write_synthetic_dataset(root, num_train=2, num_val=1, size=(32, 40), seed=0)
    masks = storage.ls(storage.join(root, "masks", "train"))
    assert [m.rsplit("/", 1)[-1] for m in masks] == ["000000.png", "000001.png"]
    mask = decode_png(storage.read_bytes(masks[1]), name=masks[1])
    np.testing.assert_array_equal(mask, make_scene(scene_seed(0, "train", 1), (32, 40))[1])
    image_uri = storage.join(root, "images", "val", "000002.jpg")
    assert decode_image(storage.read_bytes(image_uri), name=image_uri).shape == (32, 40, 3)
    assert storage.read_json(storage.join(root, "classes.json"))["classes"] == CLASS_NAMES
