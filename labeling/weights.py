"""The labeling models' weights, by content: part of the stage identities and of labelset.json.

Computed on the driver before any model loads (it reads weight files, never builds a model):

    {"backbone": <shared.backbones.weights_identity>, "segmenter": <below>}

The segmenter's entry: DiffCut's pipeline folder by the sha256 of its files, a hub id by its
cached revision, tiny random init by the config's seed (which draws every random model of a
run); the classical segmenter has no weights (None); a segmenter built by a named factory is
known by that name only. See shared/provenance.py for the forms.
"""

from __future__ import annotations

import os
from typing import Any

from labeling.config import LabelConfig
from shared import provenance
from shared.backbones import weights_identity


def segmenter_weights(cfg: LabelConfig) -> dict[str, Any] | None:
    """The content identity of the configured segmenter's weights (None: it has none)."""
    if cfg.segmenter == "felzenszwalb":
        return None
    if cfg.segmenter != "diffcut":
        return {"source": "factory", "factory": cfg.segmenter}
    if cfg.tiny:
        return provenance.random_identity(cfg.seed)
    if os.path.isdir(cfg.diffcut.model):  # diffusers reads a local folder, else a hub id
        return provenance.path_identity(cfg.diffcut.model)
    return provenance.hub_identity(cfg.diffcut.model)


def model_weights(cfg: LabelConfig) -> dict[str, Any]:
    """Content identities of the encoder's and the segmenter's weights."""
    return {"backbone": weights_identity(cfg.backbone, cfg.weights, cfg.tiny, cfg.seed),
            "segmenter": segmenter_weights(cfg)}
