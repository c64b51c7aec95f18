"""See a label set: ``python -m labeling.show --labels LABELSET --out FOLDER --random 8``.

For chosen (``--images id1,id2``) or random (``--random N --seed S``) images it writes the image,
its segments and its pseudo-labels as coloured overlays (labeling/render.py: a class keeps its
colour across images), and a page of pseudo-class mosaics: for each of the N largest classes, up
to M crops of its segments from different images. Everything lands under ``--out`` (any URI) as
PNG files and static HTML pages with relative links, so ``index.html`` opens from disk:

    index.html             every shown image: image | segments | pseudo-labels, and a legend
    mosaics.html           one row of crops per class, largest classes first
    images/<id>/*.png      image.png, segments.png, labels.png
    mosaics/class-<c>.png  the row of class c

The label set is read through shared/labelset_reader.py alone. Classes are ranked by their
pixels over the whole set from its classes table; a set without one (e.g. imported labels) is
ranked over a seeded random pool of images instead.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import typer
from pydantic import Field

from labeling import render
from shared import storage
from shared.cli import error_line, user_errors
from shared.config import Config
from shared.labelset_format import LabelSetError
from shared.labelset_reader import LabelSet

PROG = "labeling.show"
DEFAULT_RANDOM = 8  # images shown when none are named and no count is given
app = typer.Typer(add_completion=False, help=__doc__)


class ShowConfig(Config):
    """What ``labeling.show`` draws; saved as show.yaml next to its pages."""

    labels: str = Field("", description="label set URI (local path or s3://...)")
    out: str = Field("", description="output folder URI for the PNG files and HTML pages")
    images: list[str] = Field([], description="image ids to show, in this order")
    random: int | None = Field(None, ge=0, description=f"random images to show besides the named "
                               f"ones (default: {DEFAULT_RANDOM} when none are named, else 0)")
    seed: int = Field(0, description="seed of the random images and of the ranking pool")
    alpha: float = Field(0.5, ge=0, le=1, description="opacity of the colours over the image")
    max_side: int = Field(800, ge=16, description="longer side of the drawn images (nearest)")
    classes: int = Field(12, ge=0, description="N: classes on the mosaic page, largest first")
    crops: int = Field(8, ge=1, description="M: crops per class, each from another image")
    tile: int = Field(96, ge=16, description="side of a mosaic crop in pixels")
    pool: int = Field(256, ge=1, description="images ranked when the set has no classes table")


@dataclass
class Shown:
    """One drawn image: its id, file stem, size, and (class, pixel fraction) largest first."""

    image_id: str
    stem: str
    size: tuple[int, int]  # (width, height) as drawn
    classes: list[tuple[int, float]]
    segments: str | None  # why there is no segment map, or None when there is one


@dataclass
class ClassRow:
    """One mosaic row: the class, its pixels in the ranked images, where its crops come from."""

    class_id: int
    pixels: int
    image_ids: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- selection


def select_images(available: list[str], named: list[str], random: int | None,
                  seed: int, where: str) -> list[str]:
    """The named ids (checked) followed by ``random`` others drawn without replacement."""
    ok = set(available)
    unknown = [i for i in named if i not in ok]
    if unknown:
        raise LabelSetError(f"label set {where} has no labelled image {unknown[0]!r}"
                            + (f" (nor {unknown[1:]})" if unknown[1:] else "")
                            + f"; it has {len(available)}, e.g. {available[:3]}")
    count = random if random is not None else (0 if named else DEFAULT_RANDOM)
    taken = set(named)
    rest = [i for i in available if i not in taken]
    order = np.random.default_rng(seed).permutation(len(rest))[:count]
    return list(dict.fromkeys(named)) + [rest[k] for k in order]


def stem(image_id: str) -> str:
    """A file-name-safe folder name for an image id (a hash keeps rewritten ids distinct)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", image_id).strip(".") or "_"
    if safe != image_id:
        safe += "-" + hashlib.sha1(image_id.encode()).hexdigest()[:8]
    return safe


# --------------------------------------------------------------------------- reading


def encode_rgb_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a (H, W, 3) uint8 image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class Reader:
    """Images and maps of a label set, drawn at most ``max_side`` px (image and maps alike)."""

    def __init__(self, labelset: LabelSet, max_side: int):
        self.ls, self.max_side = labelset, max_side
        images = labelset.images()
        self.uris = dict(zip(images.column("image_id").to_pylist(),
                             images.column("uri").to_pylist(), strict=True))

    def image(self, image_id: str) -> np.ndarray:
        from shared.images import load_image

        return render.downscale(load_image(self.uris[image_id]), self.max_side)

    def labels(self, image_id: str, image: np.ndarray) -> np.ndarray:
        return self._fit(self.ls.label_map(image_id), image, image_id, "label map")

    def segments(self, image_id: str, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """(segment map, None), or (None, why not) for a set that holds no segment maps."""
        try:
            segments = self.ls.segment_map(image_id)
        except LabelSetError as exc:  # e.g. imported labels come without segments
            return None, f"this label set holds none ({exc})"
        return self._fit(segments, image, image_id, "segment map"), None

    def _fit(self, ids: np.ndarray, image: np.ndarray, image_id: str, kind: str) -> np.ndarray:
        ids = render.downscale(ids, self.max_side)
        try:
            render.check_same_size(image, ids, f"the {kind} of {image_id!r}")
        except ValueError as exc:
            raise LabelSetError(f"label set {self.ls.uri}: {exc} "
                                f"({self.uris[image_id]}, drawn at most {self.max_side} px)"
                                ) from None
        return ids


# --------------------------------------------------------------------------- ranking


@dataclass
class ClassPixels:
    """Rows (image, class, pixels) as columns: ``image`` indexes ``names``; ``ok`` marks the
    images that were labelled (only those give crops)."""

    names: list[str]
    image: np.ndarray  # (R,) int64 into names
    class_id: np.ndarray  # (R,) int64
    pixels: np.ndarray  # (R,) int64
    ok: np.ndarray  # (len(names),) bool
    source: str  # what the ranking covers, for the page


def class_pixels(labelset: LabelSet, pool: list[str]) -> ClassPixels:
    """Pixels per (image, class): area x width x height from the classes table, in columns
    (millions of rows stay NumPy), when the set has one; else counted in the pool's maps."""
    import pyarrow.compute as pc

    try:
        table = labelset.table("classes")
    except LabelSetError:
        table = None
    if table is not None and table.num_rows:
        images = labelset.images()
        index = pc.index_in(table.column("image_id"), value_set=images.column("image_id"))
        image = np.asarray(index.fill_null(-1), np.int64)
        sizes = np.asarray(images.column("width"), np.int64) * np.asarray(images.column("height"))
        ok = np.asarray(pc.equal(images.column("status"), "ok").fill_null(False))
        known = image >= 0  # a row of an image the images table lacks counts for nothing
        pixels = np.where(known, np.asarray(table.column("area"), np.float64) * sizes[image], 0)
        return ClassPixels(images.column("image_id").to_pylist(), np.where(known, image, 0),
                           np.asarray(table.column("class_id"), np.int64),
                           np.round(pixels).astype(np.int64), ok,
                           f"all {len(labelset.image_ids)} labelled images (classes table)")
    image, class_id, pixels = [], [], []
    for k, image_id in enumerate(pool):
        counts = np.bincount(labelset.label_map(image_id).ravel().astype(np.int64))
        present = np.nonzero(counts)[0]
        image.append(np.full(len(present), k))
        class_id.append(present)
        pixels.append(counts[present])
    empty = [np.zeros(0, np.int64)]
    return ClassPixels(list(pool), *(np.concatenate(c or empty).astype(np.int64)
                                     for c in (image, class_id, pixels)),
                       np.ones(len(pool), bool),
                       f"a random pool of {len(pool)} images (the set has no classes table)")


def rank_classes(rows: ClassPixels, num_classes: int, per_class: int) -> list[ClassRow]:
    """The ``num_classes`` classes with most pixels; for each, the ``per_class`` labelled
    images where it covers most pixels, largest first (one crop per image)."""
    if not len(rows.class_id) or num_classes == 0:
        return []
    totals = np.bincount(rows.class_id, weights=rows.pixels)  # (K,)
    top = [c for c in np.argsort(-totals, kind="stable") if totals[c] > 0][:num_classes]
    usable = rows.ok[rows.image]  # (R,)
    out = []
    for c in top:
        mine = np.nonzero((rows.class_id == c) & usable)[0]
        best = mine[np.argsort(-rows.pixels[mine], kind="stable")]
        images = list(dict.fromkeys(rows.image[best].tolist()))[:per_class]  # distinct images
        out.append(ClassRow(int(c), int(totals[c]), [rows.names[i] for i in images]))
    return out


# --------------------------------------------------------------------------- drawing


def draw_image(reader: Reader, image_id: str, out: str, alpha: float) -> Shown:
    """image.png, segments.png and labels.png of one image under ``out``/images/<stem>/."""
    image = reader.image(image_id)
    labels = reader.labels(image_id, image)
    segments, missing = reader.segments(image_id, image)
    folder = storage.join(out, "images", stem(image_id))
    storage.write_bytes(storage.join(folder, "image.png"), encode_rgb_png(image))
    storage.write_bytes(storage.join(folder, "labels.png"),
                        encode_rgb_png(render.label_overlay(image, labels, alpha)))
    if segments is not None:
        storage.write_bytes(storage.join(folder, "segments.png"),
                            encode_rgb_png(render.segment_overlay(image, segments, alpha)))
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    present = [(int(ids[k]), float(counts[k] / labels.size)) for k in order]
    return Shown(image_id, stem(image_id), (image.shape[1], image.shape[0]), present, missing)


def draw_mosaics(reader: Reader, rows: list[ClassRow], out: str, tile: int) -> None:
    """mosaics/class-<c>.png: the largest segment of class c in each of its images."""
    needed = list(dict.fromkeys(i for row in rows for i in row.image_ids))
    tiles: dict[tuple[int, str], np.ndarray] = {}
    wanted = {(row.class_id, i) for row in rows for i in row.image_ids}
    for image_id in needed:  # each image read once, whatever number of classes it serves
        image = reader.image(image_id)
        labels = reader.labels(image_id, image)
        segments, _ = reader.segments(image_id, image)
        for class_id in sorted(c for c, i in wanted if i == image_id):
            mask = render.largest_region(labels, class_id, segments)
            tiles[(class_id, image_id)] = render.region_tile(
                image, mask, tile, render.class_colours(np.array(class_id)))
    for row in rows:
        if row.image_ids:
            picture = render.mosaic_row([tiles[(row.class_id, i)] for i in row.image_ids])
            storage.write_bytes(storage.join(out, "mosaics", f"class-{row.class_id}.png"),
                                encode_rgb_png(picture))


def show_labelset(cfg: ShowConfig) -> dict:
    """Draw the pages of ``cfg`` and return a summary (index URI, images and classes shown)."""
    from labeling.show_pages import index_page, mosaics_page
    from shared.config import ConfigError, save_config

    if not cfg.labels or not cfg.out:
        raise ConfigError("labeling.show needs a label set (labels) and an output folder (out)")
    labelset = LabelSet(cfg.labels)
    available = labelset.image_ids
    chosen = select_images(available, cfg.images, cfg.random, cfg.seed, labelset.uri)
    reader = Reader(labelset, cfg.max_side)
    shown = [draw_image(reader, i, cfg.out, cfg.alpha) for i in chosen]
    pool = select_images(available, chosen, max(0, cfg.pool - len(chosen)), cfg.seed + 1,
                         labelset.uri)
    ranked = class_pixels(labelset, pool)
    rows = rank_classes(ranked, cfg.classes, cfg.crops)
    draw_mosaics(reader, rows, cfg.out, cfg.tile)
    storage.write_text(storage.join(cfg.out, "index.html"), index_page(labelset, shown, cfg))
    storage.write_text(storage.join(cfg.out, "mosaics.html"),
                       mosaics_page(labelset, rows, ranked.source, cfg))
    save_config(cfg, storage.join(cfg.out, "show.yaml"))
    return {"index": storage.join(cfg.out, "index.html"), "images": chosen,
            "classes": [row.class_id for row in rows]}


# --------------------------------------------------------------------------- command line


def _split_ids(values: list[str] | None) -> list[str]:
    return [i.strip() for v in values or [] for i in v.split(",") if i.strip()]


@app.command()
def main(
    labels: Annotated[str | None, typer.Option(help="label set URI (local path or s3://...)")] = None,
    out: Annotated[str | None, typer.Option(help="output folder for the PNG files and HTML pages")] = None,
    images: Annotated[list[str] | None, typer.Option(help="image ids to show: id1,id2 (repeatable)")] = None,
    random: Annotated[int | None, typer.Option(help=f"random images to show (default {DEFAULT_RANDOM} when no --images)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the random images")] = None,
    classes: Annotated[int | None, typer.Option(help="N: largest classes on the mosaic page")] = None,
    crops: Annotated[int | None, typer.Option(help="M: crops per class, from different images")] = None,
    config: Annotated[str | None, typer.Option(help="YAML config file (fields of ShowConfig)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. alpha=0.7")] = None,
) -> None:
    """Draw images of a label set with their segments and pseudo-labels, and class mosaics."""
    from shared.config import deep_merge, load_config, parse_overrides

    flags = {"labels": labels, "out": out, "images": _split_ids(images) if images else None,
             "random": random, "seed": seed, "classes": classes, "crops": crops}
    flags = {k: v for k, v in flags.items() if v is not None}
    try:
        # precedence: defaults <- YAML file <- --set overrides <- explicit flags
        cfg = load_config(ShowConfig, config, deep_merge(parse_overrides(set_ or []), flags))
        summary = show_labelset(cfg)
    except user_errors() as exc:  # bad input: say what, no traceback
        typer.echo(error_line(PROG, exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {len(summary['images'])} images and {len(summary['classes'])} class "
               f"mosaics: {summary['index']}")


if __name__ == "__main__":
    app()
