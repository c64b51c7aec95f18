"""shared/images.py: strict decoding, lossless label PNGs, train/eval geometry vs torchvision."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from shared.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    center_crop,
    decode_image,
    decode_png,
    encode_jpeg,
    encode_png,
    eval_geometry,
    load_image,
    normalize,
    resize_image,
    resize_labels,
    to_tensor,
    train_geometry,
)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_rgb(h: int, w: int) -> np.ndarray:
    """A smooth image, so JPEG and bilinear comparisons stay tight."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    wave = np.sin(xx / 13.0) * np.cos(yy / 17.0)
    return (127 + 100 * wave[..., None] * np.array([1.0, 0.5, -0.7])).astype(np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data (a bomb-sized header)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


# --- decoding -----------------------------------------------------------------------------------


def test_rgb_png_decodes_exactly():
    array = _rgb(5, 7)
    out = decode_image(_save(Image.fromarray(array), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, array)


def test_jpeg_decodes_close_to_source():
    array = _smooth_rgb(64, 48)
    out = decode_image(encode_jpeg(array, quality=95))
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - array.astype(int)).mean() < 2.0


def test_grey_is_replicated_to_three_channels():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_image(_save(Image.fromarray(grey), "PNG"))
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_and_la_drop_alpha():
    rgba = np.concatenate([_rgb(4, 6), np.full((4, 6, 1), 10, np.uint8)], axis=2)
    out = decode_image(_save(Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(out, rgba[..., :3])
    la = Image.fromarray(rgba[..., 0]).convert("LA")
    out = decode_image(_save(la, "PNG"))
    np.testing.assert_array_equal(out, np.repeat(rgba[..., :1], 3, axis=2))


def test_palette_maps_through_the_palette():
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette = [10, 20, 30, 200, 100, 0, 5, 250, 128]
    image = Image.frombytes("P", (3, 2), indices.tobytes())
    image.putpalette(palette + [0] * (768 - len(palette)))
    out = decode_image(_save(image, "PNG"))
    expected = np.array(palette, dtype=np.uint8).reshape(3, 3)[indices]
    np.testing.assert_array_equal(out, expected)


def test_cmyk_converts_to_rgb():
    cmyk = Image.new("CMYK", (3, 2), (255, 0, 0, 0))  # pure cyan
    out = decode_image(_save(cmyk, "TIFF"))
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [0, 255, 255])


def test_sixteen_bit_grey_scales_to_eight_bits():
    grey = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = decode_image(encode_png(grey))
    np.testing.assert_array_equal(out[..., 0], [[0, 100, 255]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("orientation, rotate_k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation, rotate_k):
    array = _rgb(2, 3, seed=orientation)  # every pixel distinct, so any rotation is visible
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(array), "PNG", exif=exif.tobytes())
    out = decode_image(data)
    # EXIF 6 = display rotated 90 deg clockwise, 8 = counter-clockwise, 3 = 180 deg
    np.testing.assert_array_equal(out, np.rot90(array, k=rotate_k))


def test_exif_rotated_jpeg_has_transposed_shape():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(_smooth_rgb(40, 64)), "JPEG", exif=exif.tobytes(), quality=95)
    assert decode_image(data).shape == (64, 40, 3)


def test_garbage_bytes_name_the_file():
    with pytest.raises(ImageDecodeError, match=r"s3://bucket/broken\.jpg.*not a readable image"):
        decode_image(b"definitely not an image", name="s3://bucket/broken.jpg")


def test_empty_bytes_name_the_file():
    with pytest.raises(ImageDecodeError, match=r"empty\.png: empty file"):
        decode_image(b"", name="empty.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_an_error(fmt):
    data = _save(Image.fromarray(_rgb(64, 64)), fmt)
    with pytest.raises(ImageDecodeError, match=r"cut\.img: corrupt or truncated"):
        decode_image(data[: len(data) // 2], name="cut.img")


def test_truncated_jpeg_is_an_error_even_if_pillow_is_told_to_accept_it(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode_jpeg(_rgb(64, 64))
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], name="cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_pixel_limit_names_the_file():
    data = _save(Image.fromarray(_rgb(100, 100)), "PNG")
    with pytest.raises(ImageDecodeError, match=r"big\.png: 100x100 = 10000 pixels exceeds"):
        decode_image(data, name="big.png", max_pixels=9999)
    assert decode_image(data, max_pixels=10000).shape == (100, 100, 3)


def test_bomb_sized_headers_are_refused_before_decoding():
    # 12000 x 12000 = 144M: under Pillow's hard limit, so only our own limit catches it
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: 12000x12000 .* exceeds"):
        decode_image(_png_header_only(12000, 12000), name="bomb.png", max_pixels=100_000_000)
    # 20000 x 10000 = 200M: above the default limit
    with pytest.raises(ImageDecodeError, match=r"bomb2\.png: .*decompression bomb"):
        decode_image(_png_header_only(20000, 10000), name="bomb2.png")


def test_load_image_reads_through_storage(tmp_path):
    array = _rgb(6, 9)
    path = tmp_path / "img.png"
    path.write_bytes(_save(Image.fromarray(array), "PNG"))
    np.testing.assert_array_equal(load_image(str(path)), array)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        load_image(str(bad))


# --- label PNGs ---------------------------------------------------------------------------------


def test_png_round_trip_uint8():
    labels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    data = encode_png(labels)
    assert data[24] == 8  # IHDR bit depth byte
    out = decode_png(data)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)


def test_png_round_trip_uint16_full_range():
    labels = np.array([[0, 1, 255, 256], [1000, 32768, 65534, 65535]], dtype=np.uint16)
    data = encode_png(labels)
    assert data[24] == 16  # a real 16-bit PNG, not clipped to 8 bits
    out = decode_png(data)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, labels)
    big_endian = labels.astype(">u2")
    np.testing.assert_array_equal(decode_png(encode_png(big_endian)), labels)


def test_encode_png_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        encode_png(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(TypeError, match="int32"):
        encode_png(np.zeros((2, 2), np.int32))
    with pytest.raises(TypeError, match="float"):
        encode_png(np.zeros((2, 2), np.float32))


def test_decode_png_palette_gives_indices_and_rejects_rgb():
    indices = np.array([[0, 3], [255, 7]], dtype=np.uint8)
    image = Image.frombytes("P", (2, 2), indices.tobytes())
    image.putpalette(list(range(256)) * 3)
    np.testing.assert_array_equal(decode_png(_save(image, "PNG")), indices)
    with pytest.raises(ImageDecodeError, match=r"m\.png: .*mode RGB"):
        decode_png(_save(Image.fromarray(_rgb(2, 2)), "PNG"), name="m.png")
    with pytest.raises(ImageDecodeError, match="expected a PNG"):
        decode_png(encode_jpeg(_rgb(8, 8)), name="m.jpg")


# --- geometry -----------------------------------------------------------------------------------


def test_to_tensor_and_normalize():
    array = _rgb(4, 5)
    tensor = to_tensor(array)
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    assert tensor[1, 2, 3].item() == pytest.approx(array[2, 3, 1] / 255.0, abs=1e-7)
    assert to_tensor(np.stack([array, array])).shape == (2, 3, 4, 5)
    normed = normalize(tensor)
    expected = (array[2, 3, 0] / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert normed[0, 2, 3].item() == pytest.approx(expected, abs=1e-6)


SIZES = [(300, 400), (400, 300), (256, 257), (259, 300), (480, 641), (224, 224), (97, 1001)]


@pytest.mark.parametrize("h, w", SIZES)
def test_train_geometry_matches_torchvision_on_tensors(h, w):
    from torchvision import transforms

    image = to_tensor(_rgb(h, w))
    reference = transforms.CenterCrop(224)(transforms.Resize(256)(image))
    ours, _ = train_geometry(image, None)
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("h, w", [(300, 400), (480, 641)])
def test_train_geometry_close_to_torchvision_on_pil_and_uint8(h, w):
    from torchvision import transforms
    from torchvision.transforms import v2

    array = _smooth_rgb(h, w)
    pil_ref = transforms.CenterCrop(224)(transforms.Resize(256)(Image.fromarray(array)))
    ours, _ = train_geometry(to_tensor(array), None)
    # PIL resamples and rounds in 8 bits: agreement to one grey level
    assert (ours - to_tensor(np.asarray(pil_ref))).abs().max() <= 1.01 / 255
    uint8 = torch.from_numpy(array).permute(2, 0, 1)
    uint8_ref = v2.CenterCrop(224)(v2.Resize(256)(uint8))
    ours8, _ = train_geometry(uint8, None)
    assert ours8.dtype == torch.uint8
    assert (ours8.int() - uint8_ref.int()).abs().max() <= 1


def test_resize_image_batch_equals_single():
    batch = torch.rand(2, 3, 30, 41)
    out = resize_image(batch, (17, 23))
    assert out.shape == (2, 3, 17, 23)
    assert torch.allclose(out[1], resize_image(batch[1], (17, 23)))


def test_uint8_images_resize_as_their_float_values_rounded():
    # the same numbers on every device: not torchvision's CPU-only uint8 kernel
    image = torch.from_numpy(_smooth_rgb(61, 83)).permute(2, 0, 1)  # (3, 61, 83) uint8
    expected = resize_image(image.float(), (40, 29)).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(resize_image(image, (40, 29)), expected)


def test_resize_labels_hand_worked_indices():
    # centre-aligned nearest: source = floor((i + 1/2) * in / out)
    row = torch.arange(5).reshape(1, 5)
    assert resize_labels(row, (1, 3)).tolist() == [[0, 2, 4]]
    row = torch.arange(3).reshape(1, 3)
    assert resize_labels(row, (1, 5)).tolist() == [[0, 0, 1, 2, 2]]
    grid = torch.arange(36).reshape(6, 6)
    assert torch.equal(resize_labels(grid, (3, 3)), grid[1::2, 1::2])
    assert torch.equal(resize_labels(grid, (2, 2)), grid[1::3, 1::3])
    up = resize_labels(grid, (12, 12))
    assert torch.equal(up, grid.repeat_interleave(2, 0).repeat_interleave(2, 1))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.uint16])
def test_label_geometry_keeps_dtype_and_values(dtype):
    high = 65536 if dtype == torch.uint16 else 256 if dtype == torch.uint8 else 10**6
    values = torch.randint(0, high, (37, 53), generator=torch.Generator().manual_seed(0))
    labels = values.to(dtype)
    labels[0, 0] = high - 1  # the extreme value survives untouched where it lands
    image = torch.rand(3, 37, 53)
    for _, out in (train_geometry(image, labels), eval_geometry(image, labels, 40)):
        assert out.dtype == dtype
        assert set(out.long().unique().tolist()) <= set(labels.long().unique().tolist())
    _, out = eval_geometry(image, labels, 37 * 2)
    assert out.shape == (74, 74)


def test_labels_stay_aligned_with_the_image():
    # labels are 20-pixel blocks; the image shows each block's label as its grey level
    block = torch.arange(6 * 8).reshape(6, 8).repeat_interleave(20, 0).repeat_interleave(20, 1)
    image = (block.float() / 64.0).expand(3, -1, -1)  # (3, 120, 160)
    for out_image, out_labels in (train_geometry(image, block), eval_geometry(image, block, 90)):
        recovered = torch.round(out_image[0] * 64.0).long()
        interior = (out_image[0] * 64.0 - recovered).abs() < 1e-3  # away from blurred edges
        assert interior.float().mean() > 0.6
        assert torch.equal(recovered[interior], out_labels[interior])


def test_center_crop_rounds_odd_margins_as_torchvision_does():
    # top = round((H - h) / 2) with Python's round: halves go to the even neighbour
    grid = torch.arange(7 * 9).reshape(7, 9)
    assert torch.equal(center_crop(grid, (2, 4)), grid[2:4, 2:6])  # margins 2.5, 2.5 -> 2, 2
    assert torch.equal(center_crop(grid, (4, 2)), grid[2:6, 4:6])  # margins 1.5, 3.5 -> 2, 4
    assert torch.equal(center_crop(grid, (7, 8)), grid[:, 0:8])  # margin 0.5 -> 0
    assert torch.equal(center_crop(grid, (5, 6)), grid[1:6, 2:8])  # margins 1, 1.5 -> 1, 2


def test_center_crop_equals_torchvision_on_every_odd_and_even_size():
    from torchvision.transforms.functional import center_crop as tv_center_crop

    for height in range(5, 13):
        for width in (height, height + 3):
            image = torch.arange(3 * height * width).reshape(3, height, width)
            for crop_h in range(1, height + 1):
                for crop_w in (crop_h, max(1, crop_h - 1)):
                    if crop_w > width:
                        continue
                    ours = center_crop(image, (crop_h, crop_w))
                    assert torch.equal(ours, tv_center_crop(image, [crop_h, crop_w])), \
                        (height, width, crop_h, crop_w)


def test_batched_geometry_equals_per_image():
    images = torch.rand(2, 3, 50, 70)
    labels = torch.randint(0, 5, (2, 50, 70))
    out_images, out_labels = train_geometry(images, labels, resize=40, crop=32)
    assert out_images.shape == (2, 3, 32, 32) and out_labels.shape == (2, 32, 32)
    one_image, one_labels = train_geometry(images[1], labels[1], resize=40, crop=32)
    assert torch.allclose(out_images[1], one_image) and torch.equal(out_labels[1], one_labels)
    eval_images, eval_labels = eval_geometry(images, labels, 28)
    assert eval_images.shape == (2, 3, 28, 28) and eval_labels.shape == (2, 28, 28)


def test_geometry_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="do not match"):
        train_geometry(torch.rand(3, 10, 12), torch.zeros(10, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="must not exceed"):
        train_geometry(torch.rand(3, 10, 12), None, resize=20, crop=30)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        eval_geometry(torch.rand(10, 12), None, 8)
