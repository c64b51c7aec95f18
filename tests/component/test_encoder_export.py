"""The encoder export: equal weights give byte-identical safetensors files that still load."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from shared import storage
from shared.backbones import load_backbone, save_backbone


def _header(data: bytes) -> bytes:
    size = int.from_bytes(data[:8], "little")
    return data[8 : 8 + size]


def test_exports_of_the_same_weights_are_byte_identical(tmp_path):
    torch.manual_seed(3)
    backbone = load_backbone("vits14", None, tiny=True, device="cpu")
    uris = [str(tmp_path / f"export{i}.safetensors") for i in range(6)]
    for uri in uris:
        save_backbone(backbone, uri)
    files = [storage.read_bytes(uri) for uri in uris]
    # the metadata map comes out of safetensors in hash order, which changes from call to call
    assert all(data == files[0] for data in files[1:])
    header = _header(files[0])
    assert len(header) % 8 == 0  # the data section stays 8-byte aligned
    parsed = json.loads(header)
    assert header.rstrip(b" ") == json.dumps(parsed, sort_keys=True,
                                             separators=(",", ":")).encode()
    assert parsed["__metadata__"] == {"backbone": "vits14", "format": "timm",
                                      "timm_id": backbone.spec.timm_id, "tiny": "true"}
    assert b"time" not in header


def test_a_canonical_export_loads_everywhere_with_the_same_tensors(tmp_path):
    torch.manual_seed(4)
    backbone = load_backbone("clip_vitb16", None, tiny=True, device="cpu")
    uri = str(tmp_path / "encoder.safetensors")
    save_backbone(backbone, uri)
    again = load_backbone("clip_vitb16", uri, tiny=True, device="cpu")
    expected = backbone.model.state_dict()
    for name, tensor in again.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    with safe_open(uri, framework="pt") as handle:  # memory-mapped reader: offsets must hold
        assert sorted(handle.keys()) == sorted(expected)
        assert handle.metadata()["backbone"] == "clip_vitb16"
        name = "blocks.0.attn.qkv.weight"
        assert torch.equal(handle.get_tensor(name), expected[name])
