"""Labeling configuration. Defaults are the paper's settings (see DESIGN.md "Pseudo-classes")."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, model_validator

from shared.config import Config

# The inputs of one DiffCut pass, by protocol (docs/labeling.md "DiffCut presets").
# project: CPU generator (the same noise on every device), antialiased resize, float32 VAE.
# released: DiffCut's released extractor: a CUDA generator seeded 42, bilinear resize without
# antialiasing, the VAE held in float16 (computing in float32, labeling.diffcut.vae_compute_dtype).
DIFFCUT_PRESETS: dict[str, dict[str, Any]] = {
    "project": {"seed": 0, "noise_device": "cpu", "antialias": True, "vae_dtype": "float32"},
    "released": {"seed": 42, "noise_device": "cuda", "antialias": False, "vae_dtype": "float16"},
}


class DiffCutConfig(Config):
    model: str = "segmind/SSD-1B"  # hub id or a local diffusers folder
    resolution: int = Field(1024, ge=64)  # whole image resized (not cropped) to this square
    timestep: int = Field(50, ge=0, le=999)  # noise level of the single UNet pass
    tau: float = Field(0.5, gt=0)  # recursive NCut stops when the best cut is >= tau
    alpha: float = Field(10.0, gt=0)  # affinity exponent W ** alpha
    pamr: bool = False
    # the preset fills the four settings below that the config does not give (defaults: project)
    preset: Literal["project", "released"] = "project"
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # float16: weights only
    seed: int = 0
    noise_device: Literal["cpu", "cuda"] = "cpu"  # the generator of the fixed noise
    antialias: bool = True  # of the bilinear resize to resolution x resolution

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Settings the input leaves out take the preset's values, when the config is read."""
        if not isinstance(data, dict) or data.get("preset", "project") not in DIFFCUT_PRESETS:
            return data  # not a mapping, or an unknown preset: field validation says so
        return {**DIFFCUT_PRESETS[data.get("preset", "project")], **data}


class FelzenszwalbConfig(Config):
    """The classical CPU segmenter (labeling/classical.py); defaults measured on the built-in
    scenes (benchmarks/bench_felzenszwalb.py)."""

    scale: float = Field(1600.0, gt=0)  # merge threshold k (0..255 colour units): larger, fewer segments
    sigma: float = Field(0.25, ge=0)  # Gaussian pre-smoothing, pixels of the working image
    min_size: int = Field(100, ge=1)  # smaller segments merge into a neighbour (working pixels)
    resolution: int = Field(96, ge=32, le=4096)  # longer side of the working image


class LabelConfig(Config):
    images: str = "synthetic"  # an image folder URI, or "synthetic" for the built-in scenes
    # optional folder of ground-truth PNG masks named like the images (255 = ignore): the run
    # then reports the pseudo-labels' unsupervised mIoU; set automatically for "synthetic"
    ground_truth: str | None = None
    out: str = "runs/labels"
    backbone: str = "vits14"
    weights: str | None = "hub"  # "hub", a weight file, or None (random init)
    tiny: bool = False  # tiny random-init models (tests, offline demo)
    segmenter: str = "diffcut"
    diffcut: DiffCutConfig = Field(default_factory=DiffCutConfig)
    felzenszwalb: FelzenszwalbConfig = Field(default_factory=FelzenszwalbConfig)
    # encoder input side; None: the backbone's label_input_size, a 32 x 32 patch grid (448 px
    # at /14, 512 at /16), the grid of DiffCut's tokens. Resolved when the config is read.
    feature_size: int | None = Field(None, ge=14)
    classes: int = Field(1000, ge=2)  # K of K-means
    kmeans_max_images: int = Field(200_000, ge=1)  # above this, K-means on a random subset
    kmeans_niter: int = Field(25, ge=1)
    neighbours: int = Field(5, ge=1)  # nearest neighbours per image for pairs
    # "exact" (blocked products, the default) or "ivf" (faiss inverted lists: approximate, for
    # many millions of images without a GPU; check its recall on your features first)
    pair_search: Literal["exact", "ivf"] = "exact"
    min_area: float = Field(0.05, ge=0, lt=1)  # a shared class must cover more than this of both
    shard_size: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)  # images per GPU batch
    # segmenting / labelling actors: None = a pool from 1 up to the cluster's GPUs (or to the
    # cluster's count of actor_resources), one actor without either
    actors: int | None = Field(None, ge=1)
    gpus_per_actor: float = Field(1.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    actor_resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources
    decode_threads: int = Field(4, ge=1)  # per actor: reads and decodes overlap the model work
    lease_timeout: float = Field(120.0, gt=0)  # seconds without a heartbeat: the run died
    synthetic_images: int = Field(64, ge=1)  # size of the built-in dataset when images="synthetic"
    synthetic_size: int = Field(128, ge=32)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _default_feature_size(cls, data: Any) -> Any:
        """A feature_size the input leaves out (or null) takes the backbone's label_input_size."""
        if not isinstance(data, dict) or data.get("feature_size") is not None:
            return data
        from shared.backbones import BACKBONES

        spec = BACKBONES.get(data.get("backbone", cls.model_fields["backbone"].default))
        if spec is None:  # an unknown backbone: the check below names it
            return data
        return {**data, "feature_size": spec.label_input_size}

    @model_validator(mode="after")
    def _check_backbone(self) -> LabelConfig:
        from shared.backbones import BACKBONES

        spec = BACKBONES.get(self.backbone)
        if spec is None:
            raise ValueError(f"backbone: unknown backbone {self.backbone!r}; known: "
                             f"{', '.join(sorted(BACKBONES))}")
        if self.feature_size % spec.patch_size:  # set: the backbone is known (see above)
            raise ValueError(f"feature_size: {self.feature_size} is not a multiple of "
                             f"{self.backbone}'s patch size {spec.patch_size}")
        return self


# Settings that change how a run executes, never what it writes.
OPERATIONAL_FIELDS = frozenset({"out", "batch_size", "actors", "gpus_per_actor", "cpus_per_actor",
                                "actor_resources", "decode_threads", "lease_timeout"})
# The settings of each built-in segmenter: only the configured one's reach the identities.
SEGMENTER_SETTINGS = {"diffcut": "diffcut", "felzenszwalb": "felzenszwalb"}
# Settings read by one stage only (and so by the stages after it); every other setting belongs to
# the first stage, the segments. A new setting is thereby in every stage's identity until it is
# placed here.
STAGE_FIELDS: dict[str, frozenset[str]] = {
    "segments": frozenset(),
    "centroids": frozenset({"classes", "kmeans_max_images", "kmeans_niter"}),
    "labels": frozenset({"ground_truth"}),
    "pairs": frozenset({"neighbours", "min_area", "pair_search"}),
}


def stage_identities(cfg: LabelConfig, listing_sha256: str, num_images: int,
                     weights: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each stage's output depends on: its own settings plus the identity of the stage
    before it (segments -> centroids -> labels -> pairs); operational settings, and those of
    the segmenters not in use, are left out.

    ``weights``: the content identities of the models' weights (``labeling.weights.
    model_weights``), part of the segments stage and so of every stage after it: new weights
    under an old file name redo the work.
    """
    unused = {v for k, v in SEGMENTER_SETTINGS.items() if k != cfg.segmenter}
    config = cfg.model_dump(mode="json", exclude=set(OPERATIONAL_FIELDS) | unused)
    later = set().union(*STAGE_FIELDS.values())
    out: dict[str, dict[str, Any]] = {}
    previous: dict[str, Any] = {"listing_sha256": listing_sha256, "num_images": num_images}
    for stage, fields in STAGE_FIELDS.items():
        if stage == "segments":
            own = {k: v for k, v in config.items() if k not in later}
            identity = {"config": own, "weights": weights, "after": previous}
        else:
            own = {k: v for k, v in config.items() if k in fields}
            identity = {"config": own, "after": previous}
        out[stage] = identity
        text = json.dumps(identity, sort_keys=True)
        previous = {"stage": stage, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return out
