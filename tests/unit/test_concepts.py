"""Concept assignment to full resolution and segment-map helpers (PAMR: test_pamr.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from labeling import concepts
from labeling.concepts import (
    argmax_first_dim,
    assign_concepts,
    bilinear_matrix,
    contiguous_ids,
    segment_centroids,
    upsample,
    upsample_argmax,
)
from labeling.segmenter import ImageInputError, maps_to_numpy, prepare_image, relabel_contiguous


def test_segment_centroids_hand_example():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 1.0]])
    labels = torch.tensor([1, 0, 1, 1])
    expected = torch.tensor([[0.0, 1.0], [5 / 3, 2 / 3]])
    assert torch.allclose(segment_centroids(feats, labels), expected)


@pytest.mark.parametrize("out_size,in_size", [(37, 8), (64, 32), (32, 32), (100, 7), (33, 32)])
def test_bilinear_matrix_equals_interpolate(out_size, in_size):
    maps = torch.randn(3, in_size, 5, dtype=torch.float64)
    ours = bilinear_matrix(out_size, in_size, torch.float64) @ maps  # (out, in) x (3, in, 5)
    ref = F.interpolate(maps[None], size=(out_size, 5), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(ours, ref, atol=1e-12)


def test_upsample_matches_interpolate_and_argmax_bands(monkeypatch):
    scores = torch.randn(6, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(scores[None], size=(45, 70), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(upsample(scores, (45, 70)), ref, atol=1e-12)
    monkeypatch.setattr(concepts, "BAND_ELEMENTS", 6 * 70 * 4)  # bands of 4 rows
    assert torch.equal(upsample_argmax(scores, (45, 70)), ref.argmax(dim=0))


def test_argmax_over_the_first_dim_keeps_the_first_maximum():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (7, 20, 30), generator=g).float()  # ties nearly everywhere
    assert torch.equal(argmax_first_dim(x), x.argmax(dim=0))
    assert argmax_first_dim(torch.tensor([[1.0, 2.0], [1.0, 5.0], [0.0, 5.0]])).tolist() == [0, 1]


def test_assign_concepts_equals_upsampling_the_features():
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(
        torch.randn(64, 16, dtype=torch.float64, generator=g), dim=-1
    )  # 8 x 8 tokens
    labels = torch.randint(0, 5, (64,), generator=g)
    ours = assign_concepts(feats, labels, (8, 8), (50, 35))
    # the definition: upsample the C feature maps, then argmax of the dot product with each c_k
    grid = feats.T.reshape(1, 16, 8, 8)
    up = F.interpolate(grid, size=(50, 35), mode="bilinear", align_corners=False)[0]  # (C, H, W)
    cents = torch.stack([feats[labels == k].mean(dim=0) for k in range(5)])
    ref = torch.einsum("kc,chw->khw", cents, up).argmax(dim=0)
    assert torch.equal(ours, ref)


def test_relabel_contiguous_keeps_order():
    out = relabel_contiguous(np.array([[5, 2], [2, 9]]))
    assert out.dtype == np.uint16 and out.tolist() == [[1, 0], [0, 2]]


def test_contiguous_ids_on_the_device_equal_the_numpy_relabelling():
    assert contiguous_ids(torch.tensor([[5, 2], [2, 9]]), 10).tolist() == [[1, 0], [0, 2]]
    g = torch.Generator().manual_seed(0)
    used = torch.tensor([0, 3, 7, 9, 11])  # 1, 2, 4, 5, 6, 8, 10 absent
    labels = used[torch.randint(0, 5, (37, 53), generator=g)]
    ours = contiguous_ids(labels, 12)
    assert ours.dtype == torch.int32 and ours.shape == (37, 53)
    assert np.array_equal(ours.numpy(), relabel_contiguous(labels.numpy()))


def test_segment_centroids_leave_an_empty_segment_at_zero():
    feats = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = segment_centroids(feats, torch.tensor([0, 2]), num_segments=4)
    assert out.tolist() == [[1.0, 2.0], [0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]


class HostResults(TorchDispatchMode):
    """Records every operation that leaves a tensor on the host (a table built there, a copy)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in results):
            self.ops.append(str(func))
        return out


def test_the_assignment_runs_on_the_device_and_never_waits_for_it():
    # the meta device has shapes but no values: reading one (a host wait on a GPU) raises, and
    # a weight table built on the host and copied over shows up as a host result
    feats = torch.empty(64, 16, device="meta")
    labels = torch.empty(64, dtype=torch.long, device="meta")
    with HostResults() as mode:
        full = assign_concepts(feats, labels, (8, 8), (50, 35), num_segments=5)
        ids = contiguous_ids(full, 5)
    assert ids.shape == (50, 35) and ids.dtype == torch.int32 and ids.device.type == "meta"
    assert mode.ops == []


def test_maps_to_numpy_copies_a_batch_to_uint16_maps():
    maps = [torch.arange(12, dtype=torch.int32).reshape(3, 4), torch.full((2, 5), 65535)]
    out = maps_to_numpy(maps)
    assert [m.dtype for m in out] == [np.uint16, np.uint16] and out[0].shape == (3, 4)
    assert out[0].tolist() == maps[0].tolist() and (out[1] == 65535).all()
    assert maps_to_numpy([]) == []
    with pytest.raises(ValueError, match="0..65536 do not fit a uint16"):
        maps_to_numpy([torch.tensor([[0, 65536]])])


def test_prepare_image_converts_gray_and_rgba():
    gray = np.arange(40 * 50, dtype=np.uint8).reshape(40, 50)
    out = prepare_image(gray)
    assert out.shape == (40, 50, 3) and (out[..., 2] == gray).all()
    rgba = np.random.default_rng(0).integers(0, 255, (40, 50, 4), dtype=np.uint8)
    assert (prepare_image(rgba) == rgba[..., :3]).all()


@pytest.mark.parametrize(
    "image,message",
    [
        (np.zeros((20, 40, 3), np.uint8), "40x20"),
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.zeros((64, 64, 2), np.uint8), "shape"),
        ([[0, 1]], "numpy array"),
    ],
)
def test_prepare_image_refuses_bad_input(image, message):
    with pytest.raises(ImageInputError, match=message):
        prepare_image(image, index=3)


def test_prepare_image_refuses_huge_images():
    with pytest.raises(ImageInputError, match="exceeds the limit of 10000"):
        prepare_image(np.zeros((200, 100, 3), np.uint8), max_pixels=10_000)
