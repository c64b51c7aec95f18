"""Configuration of DIP post-training; the defaults are the authors' released settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shared.config import Config


class TrainConfig(Config):
    """Everything one training run depends on; saved resolved next to its outputs."""

    # inputs and outputs
    labels: str = Field("", description="label set URI (local path or s3://...)")
    out: str = Field("", description="output URI: checkpoints, metrics, config, exported encoder")

    # encoder and head
    backbone: str = "vits14"
    weights: str | None = Field("hub", description='"hub", a local weight file, or null for random init')
    tiny: bool = Field(False, description="tiny random-init variant of the backbone (tests, smoke runs)")
    trainable_blocks: int = Field(3, ge=0, description="last blocks left trainable (with the final norm)")
    head_hidden_mult: int = Field(7, ge=1, description="head hidden width = mult x embed dim")
    head_dim: int = Field(6144, ge=1, description="head output width")
    head_norm_eps: float = Field(1e-6, gt=0, description="eps of the head's final LayerNorm")

    # in-context tasks
    resize: int = Field(256, ge=1, description="shorter side before the centre crop")
    crop: int = Field(224, ge=1, description="centre crop size (a multiple of the patch size)")
    num_distractors: int = Field(7, ge=0)
    distractors: Literal["distinct", "released"] = Field(
        "distinct", description="distinct: other positives without replacement; released: "
        "permutations of groups of 4 tasks, repeats and the own positive included"
    )
    temperature: float = Field(0.07, gt=0)
    loss: Literal["released", "nll"] = "released"
    ignore_index: int | None = Field(None, description="pseudo-label value left out of the loss")

    # optimisation
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(384, ge=1, description="effective batch (queries per optimizer step)")
    micro_batch_size: int = Field(32, ge=1, description="queries per forward pass on one device")
    base_lr: float = Field(1.5e-7, gt=0, description="lr = base_lr x batch_size / 256")
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.05, ge=0, description="not applied to biases and 1-D parameters")
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="autocast dtype on GPU (CPU: fp32); fp16 adds a dynamic loss scaler"
    )
    compile_model: bool = Field(False, description="torch.compile the encoder and head")
    seed: int = 0
    deterministic: bool = Field(
        False, description="deterministic kernels: a resumed run matches an uninterrupted one bit for bit"
    )
    max_steps: int | None = Field(
        None, ge=1, description="stop after this global step (the schedule still spans all epochs)"
    )

    # data loading
    loader_workers: int = Field(4, ge=0)
    cache_prepared: bool = Field(False, description="keep the prepared crops and label maps in memory")
    input: Literal["packed", "prepare"] = Field(
        "packed", description="packed: crops and label maps prepared once into shards, reused by "
        "every run; prepare: decode and crop each image at every visit"
    )
    packed_root: str | None = Field(None, description="where packed inputs live (default <labels>/packed)")
    packed_shard_size: int = Field(1024, ge=1, description="images per packed shard")
    packed_window: int = Field(4, ge=1, description="packed shards shuffled together (and held by a reader)")
    packed_ray: bool = Field(False, description="build missing packed shards as Ray tasks (Ray initialised)")

    # checkpoints and metrics
    checkpoint_every: int = Field(1000, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    write_csv: bool = True

    # distributed (Ray Train); workers == 0 trains in this process
    workers: int = Field(0, ge=0)
    use_gpu: bool = False
    address: str | None = None
    max_failures: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        return self

    @property
    def lr(self) -> float:
        """Peak learning rate, scaled linearly with the effective batch."""
        return self.base_lr * self.batch_size / 256

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each device; the effective batch must split exactly."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {world_size} worker(s)"
            )
        return self.batch_size // per_step
