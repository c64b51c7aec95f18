"""labeling/render.py: the fixed class palette, overlays, outlines, regions, tiles and rows."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps

from labeling import render


def test_the_first_ten_classes_take_the_tab10_colours():
    tab10 = np.round(np.array(colormaps["tab10"].colors) * 255).astype(np.uint8)
    assert np.array_equal(render.class_colours(np.arange(10)), tab10)


def test_a_class_colour_depends_on_its_id_alone_and_a_thousand_ids_differ():
    ids = np.arange(1000)
    colours = render.class_colours(ids)
    assert len({tuple(c) for c in colours}) == 1000
    shuffled = np.random.default_rng(0).permutation(ids)
    assert np.array_equal(render.class_colours(shuffled), colours[shuffled])
    grid = np.array([[3, 700], [700, 65535]])
    assert np.array_equal(render.colorize(grid)[0, 1], colours[700])
    assert np.array_equal(render.colorize(grid)[1, 0], colours[700])
    assert np.array_equal(render.colorize(grid)[1, 1], render.class_colours(np.array(65535)))


def test_label_overlay_blends_by_alpha():
    image = np.full((2, 3, 3), 100, np.uint8)
    labels = np.array([[0, 0, 1], [1, 1, 0]])
    colour0, colour1 = render.class_colours(np.array([0, 1]))
    out = render.label_overlay(image, labels, alpha=0.25)
    assert np.array_equal(out[0, 0], np.round(0.75 * 100 + 0.25 * colour0.astype(float)))
    assert np.array_equal(out[1, 0], np.round(0.75 * 100 + 0.25 * colour1.astype(float)))
    assert np.array_equal(render.label_overlay(image, labels, 0.0), image)
    with pytest.raises(ValueError, match="label map is 2x2 but its image is 3x2"):
        render.label_overlay(image, labels[:, :2])


def test_boundaries_mark_the_last_pixel_before_a_change():
    ids = np.array([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
    edge = render.boundaries(ids)
    assert edge.tolist() == [[False, True, False], [True, True, True], [False, False, False]]
    out = render.segment_overlay(np.zeros((3, 3, 3), np.uint8), ids, 0.5)
    assert (out[edge] == 255).all() and (out[~edge] != 255).any()


def test_largest_region_takes_the_biggest_segment_of_the_class():
    labels = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    segments = np.array([[5, 5, 6, 6], [5, 5, 6, 6]])
    assert render.largest_region(labels, 1, segments).tolist() == [
        [True, True, False, False], [True, True, False, False]]
    assert render.largest_region(labels, 1).sum() == 5  # no segments: the class's mask
    assert not render.largest_region(labels, 7, segments).any()


def test_region_tile_frames_the_region_and_dims_its_surroundings():
    image = np.full((20, 40, 3), 200, np.uint8)
    mask = np.zeros((20, 40), bool)
    mask[5:15, 10:30] = True  # 10 x 20, with a margin of 1 x 3 around it in the crop
    colour = np.array([1, 2, 3], np.uint8)
    tile = render.region_tile(image, mask, 44, colour, margin=0.15, border=2)
    assert tile.shape == (44, 44, 3)
    assert (tile[0] == colour).all() and (tile[:, -1] == colour).all()
    assert (tile[22, 22] == 200).all()  # inside the region: as it was
    assert (tile[22, 3] == 60).all()  # the margin: dimmed to 30%
    assert (tile[3, 22] == 64).all()  # above the letterboxed crop: the grey background


def test_downscale_keeps_images_and_maps_aligned():
    ids = np.arange(100 * 60).reshape(100, 60)
    small = render.downscale(ids, 50)
    assert small.shape == (50, 30)
    image = np.stack([ids % 256] * 3, axis=-1)
    assert np.array_equal(render.downscale(image, 50)[..., 0], small % 256)
    assert render.downscale(ids, 100) is ids


def test_mosaic_row_places_tiles_side_by_side():
    tiles = [np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)]
    row = render.mosaic_row(tiles, gap=2)
    assert row.shape == (4, 16, 3)
    assert (row[:, 6:10] == 20).all() and (row[:, 4:6] == 255).all()
    with pytest.raises(ValueError, match="at least one tile"):
        render.mosaic_row([])
