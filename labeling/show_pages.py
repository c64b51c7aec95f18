"""The static HTML pages of ``labeling.show``: index.html and mosaics.html.

Self-contained (inline CSS, no scripts), with relative links only, so the output folder opens
from disk or any static file server. Every text from the label set is HTML-escaped.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

import numpy as np

from labeling import render

LEGEND_CLASSES = 16  # classes listed per image; the rest are counted
MIN_WIDTH = 240  # small images are shown enlarged (pixelated, so pixels stay visible)

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.row { display: flex; gap: 12px; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #555; }
.sw { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle;
      border: 1px solid #0003; margin-right: 0.25em; }
.legend span.item { margin-right: 0.9em; white-space: nowrap; font-size: 0.9em; }
.missing { width: 12em; color: #777; font-size: 0.85em; }
img { image-rendering: pixelated; }
"""


def swatch(class_id: int) -> str:
    """A small square in the class's colour (the same colour as in every overlay)."""
    r, g, b = (int(v) for v in render.class_colours(np.array(class_id)))
    return f'<span class="sw" style="background: rgb({r}, {g}, {b})"></span>'


def _page(title: str, body: list[str]) -> str:
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      f"<title>{escape(title)}</title>", f"<style>{STYLE}</style>", "</head>",
                      "<body>", *body, "</body>", "</html>", ""])


def _figure(src: str, caption: str, width: int) -> str:
    return (f'<figure><img src="{quote(src)}" width="{width}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _legend(classes: list[tuple[int, float]]) -> str:
    items = [f'<span class="item">{swatch(c)}{c} ({100 * a:.1f}%)</span>'
             for c, a in classes[:LEGEND_CLASSES]]
    more = len(classes) - LEGEND_CLASSES
    if more > 0:
        items.append(f'<span class="item">+{more} more classes</span>')
    return f'<p class="legend">pseudo-classes (pixel share): {" ".join(items)}</p>'


def _header(labelset, cfg) -> list[str]:
    return [f"<p>label set <code>{escape(labelset.uri)}</code>: K = {labelset.num_classes} "
            f"pseudo-classes, {len(labelset.image_ids)} labelled images; overlay opacity "
            f"{cfg.alpha}.</p>"]


def index_page(labelset, shown, cfg) -> str:
    """Every shown image (image | segments | pseudo-labels) with its class legend."""
    body = ["<h1>Pseudo-labels</h1>", *_header(labelset, cfg),
            '<p><a href="mosaics.html">Pseudo-class mosaics</a>: crops of the largest classes '
            "side by side.</p>"]
    for item in shown:
        width = max(item.size[0], MIN_WIDTH)
        folder = f"images/{item.stem}"
        segments = (_figure(f"{folder}/segments.png", "segments", width)
                    if item.segments is None else
                    f'<div class="missing">no segment map: {escape(item.segments)}</div>')
        body += [f'<h2 id="{escape(item.stem)}">{escape(item.image_id)}</h2>',
                 '<div class="row">', _figure(f"{folder}/image.png", "image", width), segments,
                 _figure(f"{folder}/labels.png", "pseudo-labels", width), "</div>",
                 _legend(item.classes)]
    return _page("Pseudo-labels", body)


def mosaics_page(labelset, rows, source: str, cfg) -> str:
    """One row of crops per class: the class's largest segment in each of its images."""
    body = ["<h1>Pseudo-class mosaics</h1>", *_header(labelset, cfg),
            f"<p>The {cfg.classes} classes with most pixels over {escape(source)}; per class up "
            f"to {cfg.crops} images where it covers most, each showing its largest segment of "
            'the class (surroundings dimmed). <a href="index.html">Back to the images</a>.</p>']
    if not rows:
        body.append("<p>No classes to show.</p>")
    for row in rows:
        names = ", ".join(escape(i) for i in row.image_ids)
        body += [f'<h3 id="class-{row.class_id}">{swatch(row.class_id)}class {row.class_id}'
                 f" &middot; {row.pixels} px</h3>",
                 f'<img src="mosaics/class-{row.class_id}.png" alt="class {row.class_id}">',
                 f"<p><small>from {names}</small></p>"]
    return _page("Pseudo-class mosaics", body)
