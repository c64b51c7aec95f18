"""On-disk memory bank: fp16 feature shards, value shards, and a manifest written last.

    <bank>/shards/<index>.features.npy   (n, D) float16, L2-normalised patch features
    <bank>/shards/<index>.values.npy     (n, C) float16 class histograms, or (n, 1) float32 depth
    <bank>/shards/<index>.json           done marker of the shard (shared/markers.py): its
                                         files, count, fingerprint
    <bank>/bank.json                     manifest: format, encoder identity, dataset, options,
                                         shard list with counts; its presence means complete

The manifest records the encoder's identity (registry name, architecture, and a hash of its
weights). Querying a bank with another encoder is refused: features of two encoders live in
different spaces, and nearest neighbours across them mean nothing.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

import numpy as np
import torch

from shared import storage
from shared.markers import MarkedUnit, read_marker

FORMAT = "dip-memory-bank/1"
MANIFEST = "bank.json"


class BankError(ValueError):
    """A memory bank is missing, incomplete, or does not fit the query encoder."""


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict (sorted keys, names, shapes, dtypes and raw bytes)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def encoder_identity(backbone) -> dict:
    """What a bank must share with its query encoder: registry name, architecture, weights hash."""
    return {
        "backbone": backbone.spec.name,
        "timm_id": backbone.spec.timm_id,
        "patch_size": int(backbone.patch_size),
        "embed_dim": int(backbone.embed_dim),
        "depth": len(backbone.blocks),
        "weights_sha256": weights_hash(backbone.model),
    }


def check_identity(bank_identity: dict, query_identity: dict, where: str) -> None:
    """Raise BankError naming both encoders unless the identities are equal."""
    if bank_identity == query_identity:
        return
    diffs = [f"{k}: bank {bank_identity.get(k)!r} vs query {query_identity.get(k)!r}"
             for k in sorted(set(bank_identity) | set(query_identity))
             if bank_identity.get(k) != query_identity.get(k)]
    raise BankError(
        f"memory bank {where} was built with another encoder than the query encoder "
        f"({'; '.join(diffs)}); rebuild the bank with this encoder"
    )


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise BankError(f"memory bank shard {name} is not a readable .npy array ({exc})") from exc


def shard_name(index: int) -> str:
    return f"{index:05d}"


def _shard_paths(index: int) -> dict[str, str]:
    """Paths (relative to the bank) of the feature, value and marker objects of shard ``index``."""
    base = f"shards/{shard_name(index)}"
    return {"features": f"{base}.features.npy", "values": f"{base}.values.npy",
            "marker": f"{base}.json"}


def shard_uris(bank_uri: str, index: int) -> dict[str, str]:
    """URIs of the feature, value and marker objects of shard ``index``."""
    return {kind: storage.join(bank_uri, rel) for kind, rel in _shard_paths(index).items()}


def write_shard(bank_uri: str, index: int, features: np.ndarray, values: np.ndarray,
                fingerprint: dict) -> dict:
    """Write one shard (features, values, then its marker, shared/markers.py) and return the
    marker; a failed write removes what the shard had written."""
    if features.shape[0] != values.shape[0]:
        raise ValueError(f"shard {index}: {features.shape[0]} features but {values.shape[0]} values")
    paths = _shard_paths(index)
    with MarkedUnit(bank_uri, paths["marker"], f"memory bank {bank_uri} shard {index}") as unit:
        storage.write_bytes(unit.claim(paths["features"]), npy_bytes(features.astype(np.float16)))
        storage.write_bytes(unit.claim(paths["values"]), npy_bytes(values))
        return unit.commit(index=index, count=int(features.shape[0]), fingerprint=fingerprint)


def finished_shard(bank_uri: str, index: int, fingerprint: dict) -> dict | None:
    """The marker of shard ``index`` if it was finished with the same fingerprint, else None."""
    return read_marker(bank_uri, _shard_paths(index)["marker"], fingerprint=fingerprint)


class MemoryBank:
    """Reader of a finished bank; streams shards, caching the first ones within a byte budget."""

    def __init__(self, uri: str, cache_bytes: int = 4 << 30,
                 device_cache_bytes: int | None = None):
        self.uri = str(uri).rstrip("/")
        manifest_uri = storage.join(self.uri, MANIFEST)
        if not storage.exists(manifest_uri):
            raise BankError(f"no complete memory bank at {self.uri}: {manifest_uri} is missing "
                            "(the build did not finish, or the URI is wrong)")
        self.manifest = storage.read_json(manifest_uri)
        if self.manifest.get("format") != FORMAT:
            raise BankError(f"{manifest_uri}: format {self.manifest.get('format')!r}, "
                            f"expected {FORMAT!r}")
        self.cache_bytes = cache_bytes
        # accelerator memory kept for bank shards; default: half of what is free at first use
        self.device_cache_bytes = device_cache_bytes
        self._cache: dict[tuple[str, int, str], torch.Tensor] = {}
        self._cached: dict[str, int] = {}

    def _budget(self, device: torch.device) -> int:
        if device.type == "cpu":
            return self.cache_bytes
        if self.device_cache_bytes is None:
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
            self.device_cache_bytes = free // 2
        return self.device_cache_bytes

    @property
    def encoder(self) -> dict:
        return self.manifest["encoder"]

    @property
    def size(self) -> int:
        return int(self.manifest["total"])

    @property
    def num_values(self) -> int:
        return int(self.manifest["num_values"])

    def check_encoder(self, identity: dict, input_size: int | None = None) -> None:
        """Refuse a query encoder (or input size) other than the one the bank was built with."""
        check_identity(self.encoder, identity, self.uri)
        built = self.manifest.get("input_size")
        if input_size is not None and built is not None and int(built) != int(input_size):
            raise BankError(f"memory bank {self.uri} was built at input size {built}, "
                            f"queries use {input_size}")

    def _load(self, kind: str, shard: dict, device: torch.device) -> torch.Tensor:
        key = (kind, int(shard["index"]), str(device))
        if key in self._cache:
            return self._cache[key]
        uri = shard_uris(self.uri, int(shard["index"]))[kind]
        array = npy_load(storage.read_bytes(uri), uri)
        if array.shape[0] != int(shard["count"]):
            raise BankError(f"{uri}: {array.shape[0]} rows, manifest says {shard['count']}")
        tensor = torch.from_numpy(array).to(device)
        used = self._cached.get(key[2], 0)
        if used + tensor.nbytes <= self._budget(device):  # keep the first shards that fit
            self._cache[key] = tensor
            self._cached[key[2]] = used + tensor.nbytes
        return tensor

    def _shards(self, kind: str, device) -> Iterator[tuple[int, torch.Tensor]]:
        device = torch.device(device or "cpu")
        offset = 0
        for shard in self.manifest["shards"]:
            if int(shard["count"]):
                yield offset, self._load(kind, shard, device)
            offset += int(shard["count"])

    def feature_shards(self, device=None) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, (n, D) float16 features) per shard, in bank order."""
        return self._shards("features", device)

    def value_shards(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, (n, C) values) per shard, in bank order, on the CPU."""
        return self._shards("values", "cpu")

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole bank in memory (small banks and tests only): features, values."""
        feats = [f for _, f in self.feature_shards()]
        vals = [v for _, v in self.value_shards()]
        return torch.cat(feats), torch.cat(vals)
