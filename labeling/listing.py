"""The listing of the source images of a labeling run: one (image_id, uri) row per image file.

An image id is the image's path relative to the root with its extension removed, exactly as
stored (object keys may hold ``//`` or ``..``; they are not normalised), and its URI names
exactly that object. Ids must be unique: ``a.jpg`` next to ``a.png`` is an error.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa

from shared import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string())])


def is_image(name: str) -> bool:
    """Whether ``name`` has an image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _strip_extension(name: str) -> str:
    return name[: name.rindex(".")]


def _folder_rows(root: str) -> tuple[list[str], list[str]]:
    """Ids and URIs of the images below folder ``root``, sorted by path."""
    found = storage.find(root)  # sorted full URIs built from the listed keys, not re-joined
    own = storage.resolve(root)
    own = own if own.endswith("/") else own + "/"
    ids, uris = [], []
    for uri in found:
        if not uri.startswith(own):
            raise RuntimeError(f"listing {root} returned {uri}, which is not below {own}")
        rel = uri[len(own):]  # exactly one separator removed: a key "root//a.jpg" keeps "/a"
        if is_image(rel):
            ids.append(_strip_extension(rel))
            uris.append(uri)
    return ids, uris


def _check_unique(ids: list[str], uris: list[str], root: str) -> None:
    first: dict[str, str] = {}
    clashes = []
    for image_id, uri in zip(ids, uris, strict=True):
        if image_id in first:
            clashes.append(f"{first[image_id]} and {uri} (id {image_id!r})")
        else:
            first[image_id] = uri
    if clashes:
        shown = "; ".join(clashes[:5]) + (f"; and {len(clashes) - 5} more" if len(clashes) > 5
                                          else "")
        raise ValueError(f"images below {root} share an id (the path without extension): "
                         f"{shown}; rename or remove one of each")


def list_images(root: str) -> pa.Table:
    """Every image below ``root`` (any fsspec URI; a folder, or one image file) as a table.

    Columns ``image_id`` and ``uri`` (strings), sorted by path. A single image file is listed
    under its own stem. Raises FileNotFoundError when ``root`` does not exist and ValueError
    when two images would share an id, or when ``root`` is a file that is not an image.
    """
    kind = storage.kind(root)
    if kind is None:
        raise FileNotFoundError(f"image root not found: {root}")
    if kind == "file":
        uri = storage.resolve(root)
        name = posixpath.basename(uri)
        if not is_image(name):
            raise ValueError(f"{root} is a file but not an image ({', '.join(IMAGE_EXTENSIONS)})")
        ids, uris = [_strip_extension(name)], [uri]
    else:
        ids, uris = _folder_rows(root)
    _check_unique(ids, uris, root)
    return pa.table({"image_id": pa.array(ids, pa.string()), "uri": pa.array(uris, pa.string())},
                    schema=SCHEMA)
