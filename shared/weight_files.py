"""Backbone weight files: reading state dicts and safetensors metadata, strict loading, and the
canonical (byte-stable) safetensors layout.

A weight file is a safetensors file or a torch state dict (read with ``weights_only=True``) at
any path or fsspec URI. State dicts come out unwrapped ("state_dict"/"model"/"encoder") and
unprefixed ("module."/"backbone."/"model."); the original DINOv2, DINOv3 and OpenAI CLIP layouts
are converted by timm's own filter of the model's family. shared/backbones.py builds the models
and re-exports these names.
"""

from __future__ import annotations

import importlib
import io
import json
import os
from collections.abc import Mapping

import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as safetensors_load
from torch import nn

from shared import storage

# Wrappers that training code and checkpoint formats put around a timm state dict.
NESTING_KEYS = ("state_dict", "model", "encoder")
KEY_PREFIXES = ("module.", "backbone.", "model.")
# Keys of the original (non-timm) checkpoint layouts, by the timm module of the model family
# whose ``checkpoint_filter_fn`` converts them.
FOREIGN_MARKERS = {
    "timm.models.vision_transformer": ("mask_token", "visual.class_embedding"),  # DINOv2, CLIP
    "timm.models.eva": ("storage_tokens",),  # DINOv3
}
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header larger than this is not one
_LISTED = 5  # how many offending keys an error message shows per kind


class WeightsError(ValueError):
    """A weight file does not match the backbone: names the file and the offending keys."""


def read_bytes(uri: str) -> bytes:
    """The bytes of a weight file; FileNotFoundError says where it looked."""
    check_exists(uri)
    return storage.read_bytes(uri)


def check_exists(uri: str) -> None:
    """FileNotFoundError naming ``uri`` (and the absolute path it means) unless it is a file."""
    if not storage.isfile(uri):
        fs, path = storage.url_to_fs(uri)
        where = os.path.abspath(path) if isinstance(fs, LocalFileSystem) else uri
        raise FileNotFoundError(f"backbone weight file not found: {uri} (looked at {where})")


def _header(head: bytes, uri: str) -> dict:
    try:
        return json.loads(head)
    except ValueError as exc:
        raise WeightsError(f"cannot read backbone weights from {uri}: the safetensors header is "
                           f"not JSON ({exc})") from exc


def _header_size(prefix: bytes, uri: str) -> int:
    size = int.from_bytes(prefix[:8], "little") if len(prefix) >= 8 else -1
    if not 0 < size <= MAX_HEADER_BYTES:
        raise WeightsError(f"cannot read backbone weights from {uri}: not a safetensors file "
                           f"(header size {size})")
    return size


def metadata_of(data: bytes, uri: str) -> dict[str, str]:
    """The ``__metadata__`` map of safetensors bytes ({} when the file has none)."""
    size = _header_size(data[:8], uri)
    return dict(_header(data[8 : 8 + size], uri).get("__metadata__") or {})


def read_metadata(uri: str) -> dict[str, str]:
    """The safetensors metadata of a weight file, reading only its header; {} for a torch file."""
    if not uri.endswith(".safetensors"):
        return {}
    check_exists(uri)
    with storage.open_read(uri) as handle:
        prefix = handle.read(8)
        size = _header_size(prefix, uri)
        head = handle.read(size)
    return dict(_header(head, uri).get("__metadata__") or {})


def read_weights(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a weight file; a torch file has no metadata."""
    data = read_bytes(uri)
    meta: dict[str, str] = {}
    try:
        if uri.endswith(".safetensors"):
            meta = metadata_of(data, uri)
            raw = safetensors_load(data)
        else:
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"cannot read backbone weights from {uri}: {exc}") from exc
    return unwrap_state_dict(raw, uri), meta


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or torch checkpoint (weights_only), unwrapped, unprefixed."""
    return read_weights(uri)[0]


def unwrap_state_dict(raw: object, uri: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Take the state dict out of "state_dict"/"model"/"encoder" wrappers; drop shared prefixes."""
    while isinstance(raw, Mapping):
        inner = [k for k in NESTING_KEYS if isinstance(raw.get(k), Mapping)]
        if not inner:
            break
        raw = raw[inner[0]]
    if not isinstance(raw, Mapping) or not raw:
        raise WeightsError(f"{uri} holds no state dict (got {type(raw).__name__})")
    state = dict(raw)
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{uri}: entries that are not tensors: {bad[:_LISTED]}")
    return state


def convert_foreign(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """A state dict in an original layout of the model's family, converted by timm's filter;
    a timm-layout state dict comes back as it is."""
    family = type(model).__module__
    if any(k in state for k in FOREIGN_MARKERS.get(family, ())):
        return importlib.import_module(family).checkpoint_filter_fn(dict(state), model)
    return dict(state)


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], uri: str) -> None:
    """Load every tensor of a timm-layout state dict; mismatches raise WeightsError (names file)."""
    state = convert_foreign(state, model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"weights in {uri} do not match the backbone:"]
        if missing:
            lines.append(f"  missing keys: {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_listing(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches: {_listing(shapes)}")
            lines.append("  (weights of a tiny backbone load only with tiny=True, and vice versa)")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order, compact, space-padded.

    safetensors writes the metadata map in hash order, which changes from call to call; sorted
    keys (tensor names and metadata alike) make equal states give equal bytes. The data section
    is untouched: its offsets are relative to its own start.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + data[8 + size :]
