"""``python -m labeling.show`` on small label sets: the files, the overlay colours at known
pixels, the class mosaics, the static pages' relative links, and its errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from labeling.render import class_colours
from labeling.show import ClassPixels, app, rank_classes, stem
from shared import storage
from shared.images import decode_image, encode_jpeg, load_image
from shared.labelset import LabelSet, LabelSetWriter
from shared.synthetic import CLASS_NAMES, make_scene

SIZE = (64, 80)  # (H, W)
GAP = 4  # between the tiles of a mosaic row (labeling/render.py mosaic_row)


def build_labelset(root: str, num_images: int = 6, seed: int = 7) -> str:
    """Synthetic scenes over two shards: ground-truth masks as pseudo-labels, each class region
    split into a left and a right segment, and a classes table; one id needs a safe file name."""
    uri = storage.join(root, "labelset")
    writer = LabelSetWriter(uri, {"test": "show", "seed": seed})
    ids = ["im/01" if i == 1 else f"im{i:02d}" for i in range(num_images)]
    half = num_images // 2
    right = np.arange(SIZE[1])[None, :] >= SIZE[1] // 2
    for shard, part in enumerate((ids[:half], ids[half:])):
        labels, segments, uris, rows = {}, {}, [], []
        for image_id in part:
            image, mask = make_scene(seed + ids.index(image_id), SIZE)
            uris.append(storage.join(root, "source", f"{stem(image_id)}.jpg"))
            storage.write_bytes(uris[-1], encode_jpeg(image))
            labels[image_id] = mask.astype(np.uint16)
            segments[image_id] = (mask.astype(np.uint16) * 2 + right).astype(np.uint16)
            classes, counts = np.unique(mask, return_counts=True)
            rows += [(image_id, int(c), n / mask.size) for c, n in zip(classes, counts, strict=True)]
        n = len(part)
        with writer.shard("label", shard) as out:
            out.write_table("images", pa.table({
                "image_id": part, "uri": uris, "width": [SIZE[1]] * n, "height": [SIZE[0]] * n,
                "status": ["ok"] * n, "error": pa.array([None] * n, pa.string())}))
            out.write_maps("labels", labels)
            out.write_maps("segments", segments)
            out.write_table("classes", pa.table({
                "image_id": [r[0] for r in rows], "class_id": [r[1] for r in rows],
                "area": [r[2] for r in rows]}))
    writer.write_table("pairs", pa.table({
        "query_id": ids, "positive_id": ids[1:] + ids[:1], "class_id": [1] * num_images,
        "query_area": [0.1] * num_images, "positive_area": [0.1] * num_images}))
    writer.finish({"K": len(CLASS_NAMES)})
    return uri


@pytest.fixture(scope="module")
def labelset(tmp_path_factory):
    return build_labelset(str(tmp_path_factory.mktemp("show")))


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def png(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), str(path))


def linked_files(page: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#]+)"', page.read_text())


def test_pages_overlays_and_mosaics(labelset, tmp_path):
    out = tmp_path / "out"
    result = run("--labels", labelset, "--out", str(out), "--images", "im/01,im04",
                 "--random", "2", "--seed", "3", "--classes", "3", "--crops", "2")
    assert result.exit_code == 0, result.output
    ls = LabelSet(labelset)
    shown = [p.name for p in sorted((out / "images").iterdir())]
    assert len(shown) == 4 and stem("im/01") in shown and "im04" in shown
    assert stem("im/01") != "im/01" and "/" not in stem("im/01")
    for name in shown:
        for picture in ("image.png", "segments.png", "labels.png"):
            assert png(out / "images" / name / picture).shape == (*SIZE, 3)
    # every link of both pages is relative and names a file that is there
    for page in ("index.html", "mosaics.html"):
        links = linked_files(out / page)
        assert links
        for link in links:
            assert not link.startswith("/") and "://" not in link, link
            assert (out / link).is_file(), link

    # the pseudo-label overlay: (image + class colour) / 2 at known pixels of every class
    uri = dict(zip(ls.images().column("image_id").to_pylist(),
                   ls.images().column("uri").to_pylist(), strict=True))["im04"]
    image, labels = load_image(uri).astype(np.float64), ls.label_map("im04")
    overlay = png(out / "images" / "im04" / "labels.png").astype(np.float64)
    for c in np.unique(labels):
        r, col = np.argwhere(labels == c)[0]
        expected = (image[r, col] + class_colours(np.array(c))) / 2
        assert np.abs(overlay[r, col] - expected).max() <= 0.5 + 1e-9, (c, r, col)
    # segments: their outline is white where the segment id changes (the middle column)
    segments = png(out / "images" / "im04" / "segments.png")
    assert (segments[:, SIZE[1] // 2 - 1] == 255).all()

    # mosaics: the 3 classes with most pixels in the classes table, 2 crops from 2 images each
    table = ls.table("classes").to_pylist()
    totals: dict[int, float] = {}
    for row in table:
        totals[row["class_id"]] = totals.get(row["class_id"], 0) + row["area"]
    top = sorted(totals, key=lambda c: -totals[c])[:3]
    rows = sorted(out.glob("mosaics/class-*.png"))
    assert sorted(int(p.stem.split("-")[1]) for p in rows) == sorted(top)
    page = (out / "mosaics.html").read_text()
    assert [int(c) for c in re.findall(r'<h3 id="class-(\d+)"', page)] == top
    for sources in re.findall(r"<small>from ([^<]*)</small>", page):
        assert len(set(sources.split(", "))) == len(sources.split(", ")) == 2
    for c in top:
        row = png(out / "mosaics" / f"class-{c}.png")
        tile = (row.shape[1] - GAP) // 2
        assert row.shape == (tile, 2 * tile + GAP, 3)
        assert (row[0, :tile] == class_colours(np.array(c))).all()  # framed in the class colour


def test_full_opacity_gives_the_palette_colour_itself_on_every_image(labelset, tmp_path):
    out = tmp_path / "out"
    result = run("--labels", labelset, "--out", str(out), "--images", "im00,im03",
                 "--set", "alpha=1.0", "--classes", "0")
    assert result.exit_code == 0, result.output
    ls, seen = LabelSet(labelset), {}
    for image_id in ("im00", "im03"):
        labels = ls.label_map(image_id)
        overlay = png(out / "images" / image_id / "labels.png")
        for c in np.unique(labels):
            colours = np.unique(overlay[labels == c], axis=0)
            assert colours.tolist() == [class_colours(np.array(c)).tolist()], (image_id, c)
            seen.setdefault(int(c), []).append(tuple(colours[0]))
    shared = [c for c, colours in seen.items() if len(colours) == 2]
    assert shared and all(len(set(seen[c])) == 1 for c in shared)  # one colour across images
    assert not list(out.glob("mosaics/*.png"))


def test_random_choice_is_seeded_and_a_set_without_segments_is_drawn(tmp_path,
                                                                      synthetic_labelset):
    uri = synthetic_labelset(str(tmp_path / "plain"), 6, size=(48, 40), seed=300)
    chosen = []
    for name in ("a", "b", "c"):
        seed = "1" if name != "c" else "2"
        result = run("--labels", uri, "--out", str(tmp_path / name), "--random", "3",
                     "--seed", seed, "--crops", "3")
        assert result.exit_code == 0, result.output
        chosen.append(sorted(p.name for p in (tmp_path / name / "images").iterdir()))
        assert not list((tmp_path / name).glob("images/*/segments.png"))
    assert chosen[0] == chosen[1] and len(chosen[0]) == 3
    assert chosen[0] != chosen[2]
    index = (tmp_path / "a" / "index.html").read_text()
    assert index.count("no segment map") == 3
    assert "random pool" in (tmp_path / "a" / "mosaics.html").read_text()
    assert list((tmp_path / "a").glob("mosaics/class-*.png"))


def test_ranking_takes_crops_from_distinct_labelled_images():
    rows = ClassPixels(names=["a", "b", "c"], image=np.array([0, 0, 1, 2, 2, 1]),
                       class_id=np.array([3, 3, 3, 3, 5, 5]),
                       pixels=np.array([50, 40, 30, 90, 10, 1]),
                       ok=np.array([True, True, False]), source="test")
    ranked = rank_classes(rows, num_classes=5, per_class=2)
    assert [(r.class_id, r.pixels) for r in ranked] == [(3, 210), (5, 11)]
    assert ranked[0].image_ids == ["a", "b"]  # c (not labelled) gives no crop; a only once
    assert ranked[1].image_ids == ["b"]
    assert rank_classes(rows, num_classes=1, per_class=1)[0].image_ids == ["a"]


def test_unknown_image_and_missing_label_set_fail_in_one_line(labelset, tmp_path):
    result = run("--labels", labelset, "--out", str(tmp_path / "o"), "--images", "im00,nope")
    assert result.exit_code == 2
    assert "labeling.show: error:" in result.output and "'nope'" in result.output
    missing = str(tmp_path / "nowhere")
    result = run("--labels", missing, "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and missing in result.output
    assert "Traceback" not in result.output


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "labeling.show", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    for option in ("--images", "--random", "--seed", "--config", "--set"):
        assert option in result.stdout
