"""What a model's weights are, by content: the identity stages record and compare.

    file       {"source": "file", "sha256": <sha256 of the file's bytes>}
    folder     {"source": "folder", "sha256": <sha256 over each file's relative path and sha256>}
    hub        {"source": "hub", "repo": <repository id>, "revision": <commit, or None>}
    random     {"source": "random", "seed": <the seed that draws the initial weights>}

A file or folder at any path or fsspec URI is identified by its bytes, so new weights under an
old name give a new identity. A hub repository is identified by its id and, when the local hub
cache holds a copy, the commit its ``main`` reference points to (the weights a load resolves to
offline); without a copy the revision is unknown (None).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from shared import storage

CHUNK_BYTES = 16 << 20  # read size of a hash: memory stays flat for multi-GB weight files


def file_sha256(uri: str) -> str:
    """sha256 hex digest of the object at ``uri``, streamed in 16 MiB chunks."""
    digest = hashlib.sha256()
    with storage.open_read(uri) as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha256(uri: str) -> str:
    """sha256 over ``<relative path>\\0<file sha256>\\n`` of every file below ``uri``, sorted."""
    root = storage.resolve(uri).rstrip("/") + "/"
    files = storage.find(uri)
    if not files:
        raise FileNotFoundError(f"weights folder {uri} holds no files")
    digest = hashlib.sha256()
    for child in files:  # listed below root, in the same URI style
        digest.update(f"{child.removeprefix(root)}\0{file_sha256(child)}\n".encode())
    return digest.hexdigest()


def hub_revision(repo_id: str, reference: str = "main") -> str | None:
    """The commit the local Hugging Face cache resolves ``repo_id`` at ``reference`` to, or None."""
    from huggingface_hub import constants

    ref = (Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs"
           / reference)
    return ref.read_text().strip() if ref.is_file() else None


def random_identity(seed: int | None) -> dict[str, Any]:
    """Random initial weights, drawn from ``seed``."""
    return {"source": "random", "seed": seed}


def hub_identity(repo_id: str, **extra: Any) -> dict[str, Any]:
    """Weights of hub repository ``repo_id`` at the revision the local cache knows (or None)."""
    return {"source": "hub", "repo": repo_id, "revision": hub_revision(repo_id), **extra}


def path_identity(uri: str | os.PathLike) -> dict[str, Any]:
    """A weight file or folder by content; FileNotFoundError says where it looked."""
    uri = os.fspath(uri)
    kind = storage.kind(uri)
    if kind == "file":
        return {"source": "file", "sha256": file_sha256(uri)}
    if kind == "directory":
        return {"source": "folder", "sha256": folder_sha256(uri)}
    where = uri if "://" in uri else os.path.abspath(uri)
    raise FileNotFoundError(f"weights not found: {uri} (looked at {where})")
