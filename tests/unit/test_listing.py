"""labeling.listing.list_images: ids, URIs, order, and the error cases, on disk and on S3."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest

from labeling.listing import list_images
from shared import storage


def _write(root, *names: str) -> None:
    for name in names:
        storage.write_bytes(storage.join(str(root), name), name.encode())


def _rows(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table["image_id"].to_pylist(), table["uri"].to_pylist(), strict=True))


def test_every_image_below_the_root_sorted_by_path_with_relative_ids(tmp_path):
    _write(tmp_path, "b/z.JPG", "a.jpeg", "b/c/d.Png", "e.webp", "f.bmp", "g.tif", "h.TIFF",
           "notes.txt", "b/meta.json", "jpg", "x.jpg.txt")
    table = list_images(str(tmp_path))
    assert table.schema == pa.schema([("image_id", pa.string()), ("uri", pa.string())])
    assert _rows(table) == [
        ("a", f"{tmp_path}/a.jpeg"), ("b/c/d", f"{tmp_path}/b/c/d.Png"),
        ("b/z", f"{tmp_path}/b/z.JPG"), ("e", f"{tmp_path}/e.webp"), ("f", f"{tmp_path}/f.bmp"),
        ("g", f"{tmp_path}/g.tif"), ("h", f"{tmp_path}/h.TIFF")]
    for image_id, uri in _rows(table):
        assert storage.read_bytes(uri).decode().startswith(image_id)


def test_uris_keep_the_style_of_the_root(tmp_path):
    _write(tmp_path, "d/a.jpg")
    assert _rows(list_images(f"file://{tmp_path}/d/")) == [("a", f"file://{tmp_path}/d/a.jpg")]
    root = f"memory://listing-{uuid.uuid4().hex[:8]}"
    _write(root, "x/y.png")
    try:
        assert _rows(list_images(root)) == [("x/y", f"{root}/x/y.png")]
    finally:
        storage.remove(root, recursive=True)


def test_a_single_image_file_is_listed_under_its_own_stem(tmp_path):
    _write(tmp_path, "shots/cat.photo.JPG")
    uri = str(tmp_path / "shots" / "cat.photo.JPG")
    assert _rows(list_images(uri)) == [("cat.photo", uri)]
    assert _rows(list_images(f"file://{uri}")) == [("cat.photo", f"file://{uri}")]


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    _write(tmp_path, "list.txt")
    with pytest.raises(ValueError, match="list.txt.*not an image"):
        list_images(str(tmp_path / "list.txt"))


def test_a_missing_root_is_a_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        list_images(str(tmp_path / "no-such-folder"))


def test_an_empty_folder_gives_an_empty_table(tmp_path):
    (tmp_path / "empty").mkdir()
    table = list_images(str(tmp_path / "empty"))
    assert table.num_rows == 0 and table.column_names == ["image_id", "uri"]


@pytest.mark.parametrize("names", [("a.jpg", "a.png"), ("s/a.jpg", "s/a.JPG")])
def test_two_images_with_the_same_id_are_an_error_naming_both(tmp_path, names):
    _write(tmp_path, "ok.jpg", *names)
    with pytest.raises(ValueError, match="share an id") as info:
        list_images(str(tmp_path))
    assert all(str(tmp_path / name) in str(info.value) for name in names)


@pytest.mark.integration
def test_s3_keys_with_double_slashes_and_dot_segments_are_kept_as_they_are(s3_bucket,
                                                                           s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = s3_bucket.removeprefix("s3://")
    keys = ["root/plain.png", "root/x//y.jpg", "root/p/../q.jpg", "root//lead.jpg",
            "root/p/./r.jpg", "root/skip.txt", "elsewhere/q.jpg"]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == set(keys)  # the server stored every key literally

    table = list_images(f"{s3_bucket}/root")
    assert sorted(table["image_id"].to_pylist()) == ["/lead", "p/../q", "p/./r", "plain", "x//y"]
    assert table["uri"].to_pylist() == sorted(table["uri"].to_pylist())
    for image_id, uri in _rows(table):
        key = uri.removeprefix(f"{s3_bucket}/")
        assert key in keys and key.startswith(f"root/{image_id}.")
        assert storage.read_bytes(uri) == key.encode()  # the URI names exactly that object
