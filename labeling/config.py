"""Labeling configuration. Defaults are the paper's settings (see DESIGN.md "Pseudo-classes")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.config import Config


class DiffCutConfig(Config):
    model: str = "segmind/SSD-1B"  # hub id or a local diffusers folder
    resolution: int = Field(1024, ge=64)  # whole image resized (not cropped) to this square
    timestep: int = Field(50, ge=0, le=999)  # noise level of the single UNet pass
    tau: float = Field(0.5, gt=0)  # recursive NCut stops when the best cut is >= tau
    alpha: float = Field(10.0, gt=0)  # affinity exponent W ** alpha
    vae_dtype: Literal["float32", "bfloat16"] = "float32"  # fp16 overflows in the SDXL VAE
    pamr: bool = False
    seed: int = 0


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
    feature_size: int = Field(448, ge=14)  # DINOv2R input: a 32x32 patch grid at /14
    classes: int = Field(1000, ge=2)  # K of K-means
    kmeans_max_images: int = Field(200_000, ge=1)  # above this, K-means on a random subset
    kmeans_niter: int = Field(25, ge=1)
    neighbours: int = Field(5, ge=1)  # nearest neighbours per image for pairs
    min_area: float = Field(0.05, ge=0, lt=1)  # a shared class must cover more than this of both
    shard_size: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)  # images per GPU batch
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(1.0, ge=0)
    synthetic_images: int = Field(64, ge=1)  # size of the built-in dataset when images="synthetic"
    synthetic_size: int = Field(128, ge=32)
    seed: int = 0
