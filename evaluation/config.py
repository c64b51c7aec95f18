"""Configuration of the in-context benchmark; defaults are the paper's settings.

``EvalConfig.protocol`` names a preset (evaluation/protocols.py) that fills the input size,
temperature, class matching, memory size, augmentation epochs and augmentation wherever the
config does not set them itself. The field defaults below are the ``dip`` preset's values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.config import Config

from .datasets.lowshot import FRACTIONS, SEEDS, parse_fraction
from .protocols import apply_protocol


class MemoryConfig(Config):
    """The memory bank: its size, augmentation, sampling, and how the build job is spread out."""

    size: int | None = Field(10_240_000, gt=0, description="total patches in the bank; None: "
                                                         "every patch of every augmented view")
    epochs: int = Field(2, gt=0, description="augmentation passes over the memory images")
    augmentation: Literal["dip", "hummingbird"] = Field(
        "dip", description="dip: one jitter coin, random order, zoom out to 2x with padding; "
                           "hummingbird: four independent jitters in fixed order, torchvision crop")
    jitter: float = Field(0.1, ge=0, description="ColorJitter strength of each component")
    jitter_p: float = Field(0.5, ge=0, le=1)
    crop_scale: tuple[float, float] = (0.5, 2.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_valid: float = Field(0.5, ge=0, le=1, description="patches less inside the image skipped")
    images_per_shard: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0, description="images per encoder forward pass")
    loader_threads: int = Field(4, gt=0, description="decode + augment threads per worker")
    executor: Literal["ray", "local"] = "ray"
    workers: int | None = Field(None, gt=0, description="Ray actors (default: GPUs, else CPUs)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float | None = Field(None, ge=0, description="default: 1 when GPUs exist")
    cache_bytes: int = Field(4 << 30, ge=0, description="bank shards kept in memory when querying")


class SearchConfig(Config):
    """Nearest-neighbour search and label transfer."""

    backend: Literal["auto", "torch", "faiss", "faiss_ivf"] = Field(
        "auto", description="auto: torch on a GPU, faiss (flat) on CPUs; both exact")
    k: int = Field(30, gt=0)
    temperature: float = Field(0.07, gt=0)
    matching: Literal["identity", "hungarian"] = Field(
        "identity", description="predicted-to-true class matching before the IoU")
    query_chunk: int = Field(8192, gt=0, description="torch backend: queries per matmul")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="torch backend matmul: auto = float16 + float32 re-scoring on a GPU, "
                            "float32 on CPUs")
    rerank_margin: int = Field(32, ge=0, description="low-precision candidates beyond k, "
                                                     "re-scored in float32")
    nlist: int = Field(4096, gt=0, description="faiss_ivf: inverted lists")
    nprobe: int = Field(32, gt=0, description="faiss_ivf: lists visited per query")
    codec: str = Field("Flat", description="faiss_ivf: Flat, SQ8, PQ<m>")
    train_size: int = Field(262_144, gt=0, description="faiss_ivf: training sample")
    query_block_images: int = Field(256, gt=0, description="query images per pass over the bank")


class LowShotConfig(Config):
    """Training-set fractions and the seeds of the low-shot subsets."""

    fractions: list[str] = list(FRACTIONS)
    seeds: list[int] = list(SEEDS)
    full_data_seeds: int = Field(1, gt=0, description="seeds run for fraction 1")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[str]) -> list[str]:
        for f in value:
            parse_fraction(f)
        return [str(f) for f in value]


class LinearConfig(Config):
    """The linear-probe baseline (evaluation/linear.py): a 1x1 convolution trained on the frozen
    encoder's patch features of the training images, scored by mIoU on the validation images."""

    enabled: bool = Field(False, description="also run the linear probe on every segmentation "
                                             "dataset (depth datasets are skipped)")
    epochs: int = Field(10, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, gt=0, description="images per optimizer step")
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0


class EvalConfig(Config):
    """One benchmark run: encoders x datasets x low-shot fractions x seeds."""

    protocol: Literal["dip", "hummingbird"] = Field(
        "dip", frozen=True, description="preset of input size, temperature, matching, memory "
                                        "size and augmentation; explicit settings win")
    backbones: list[str] = ["vits14"]
    weights: list[str] = ["hub"]  # "hub", "random", or a weight file per backbone
    tiny: bool = False
    datasets: list[str] = ["voc"]  # names, or ["all"] for the paper's datasets
    data_roots: dict[str, str] = {}
    input_size: int | None = Field(None, gt=0, description="default: the backbone's eval size")
    out: str = "runs/eval"
    seed: int = 0
    device: str | None = None
    ray_address: str | None = None
    max_train_images: int | None = Field(None, gt=0)
    max_val_images: int | None = Field(None, gt=0)
    eval_batch_size: int = Field(8, gt=0)
    memory: MemoryConfig = MemoryConfig()
    search: SearchConfig = SearchConfig()
    lowshot: LowShotConfig = LowShotConfig()
    linear: LinearConfig = LinearConfig()

    @model_validator(mode="before")
    @classmethod
    def _protocol_presets(cls, data: Any) -> Any:
        """Fill the protocol's preset values the input does not set (explicit values win)."""
        return apply_protocol(data) if isinstance(data, dict) else data
