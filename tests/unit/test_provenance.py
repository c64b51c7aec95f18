"""Weights are identified by content: file and folder hashes, the cached hub revision, the seed
of random init; the labeling models' weights as stages record them."""

from __future__ import annotations

import hashlib

import pytest

import shared.provenance as provenance
from labeling.config import LabelConfig
from labeling.weights import model_weights, segmenter_weights
from shared.backbones import get_spec, weights_identity


def test_a_file_is_its_sha256_streamed_in_chunks(tmp_path, monkeypatch):
    data = bytes(range(256)) * 41  # 10,496 bytes: several chunks and a short last one
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    monkeypatch.setattr(provenance, "CHUNK_BYTES", 1000)
    assert provenance.file_sha256(str(path)) == hashlib.sha256(data).hexdigest()
    assert provenance.path_identity(path) == {"source": "file",
                                              "sha256": hashlib.sha256(data).hexdigest()}


def test_content_not_the_name_decides(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    first = provenance.path_identity(a)
    assert provenance.path_identity(b) == first  # moved or copied: the same weights
    a.write_bytes(b"trained further")
    assert provenance.path_identity(a) != first


def test_a_folder_hashes_its_relative_paths_and_their_contents(tmp_path):
    root = tmp_path / "pipeline"
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "model.safetensors").write_bytes(b"unet")
    (root / "model_index.json").write_bytes(b"{}")
    lines = [f"{rel}\0{hashlib.sha256(data).hexdigest()}\n"
             for rel, data in (("model_index.json", b"{}"), ("unet/model.safetensors", b"unet"))]
    expected = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert provenance.path_identity(root) == {"source": "folder", "sha256": expected}
    (root / "unet" / "model.safetensors").rename(root / "unet" / "other.safetensors")
    assert provenance.path_identity(root)["sha256"] != expected  # a renamed part is another model


def test_missing_weights_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.safetensors")):
        provenance.path_identity(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        provenance.folder_sha256(str(tmp_path / "empty"))


def test_the_hub_revision_is_the_cached_reference(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert provenance.hub_revision("segmind/SSD-1B") is None  # not cached: unknown
    ref = tmp_path / "models--segmind--SSD-1B" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("60987f37e94cd59c36b1cba832b9f97b57395a10\n")
    assert provenance.hub_identity("segmind/SSD-1B") == {
        "source": "hub", "repo": "segmind/SSD-1B",
        "revision": "60987f37e94cd59c36b1cba832b9f97b57395a10"}


def test_backbone_weights_by_content(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    spec = get_spec("vits14")
    assert weights_identity("vits14", "hub") == {"source": "hub", "repo": spec.hub_id,
                                                 "revision": None, "timm_id": spec.timm_id}
    # random init: no weights but the seed ("hub" on a tiny model is random init too)
    for weights, tiny in ((None, False), ("hub", True), ("random", True)):
        assert weights_identity("vits14", weights, tiny, seed=3) == {"source": "random",
                                                                     "seed": 3}
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"encoder")
    assert weights_identity("vits14", str(path), tiny=True)["sha256"] == \
        hashlib.sha256(b"encoder").hexdigest()


def test_labeling_records_both_models_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    tiny = LabelConfig(tiny=True, seed=4)
    assert model_weights(tiny) == {"backbone": {"source": "random", "seed": 4},
                                   "segmenter": {"source": "random", "seed": 4}}
    assert segmenter_weights(LabelConfig()) == {"source": "hub", "repo": "segmind/SSD-1B",
                                                "revision": None}
    folder = tmp_path / "ssd1b"
    folder.mkdir()
    (folder / "model_index.json").write_bytes(b"{}")
    local = LabelConfig(diffcut={"model": str(folder)})
    assert segmenter_weights(local) == provenance.path_identity(folder)
    assert segmenter_weights(LabelConfig(segmenter="felzenszwalb")) is None  # no weights
    named = LabelConfig(segmenter="my_pkg.segmenters:build")
    assert segmenter_weights(named) == {"source": "factory", "factory": "my_pkg.segmenters:build"}
