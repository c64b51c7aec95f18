"""The DIP training loop: optimizer and schedule, gradient accumulation, checkpoints with exact
resume (``training/checkpoints.py``), metrics, and the final export of the encoder. No Ray here:
a distributed caller initialises torch.distributed and passes a :class:`Runtime`.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from shared import storage
from shared.backbones import get_spec, save_backbone
from shared.config import ConfigError, save_config
from shared.hub_export import HUB_FOLDER, save_hub_export
from shared.seeds import derive_seed
from training.checkpoints import (
    check_identity,
    resume_point,
    run_identity,
    save_checkpoint,
)
from training.config import TrainConfig
from training.episodes import (
    Batched,
    PairEpisodes,
    TaskBatches,
    check_task_batch,
    sample_support,
    steps_per_epoch,
    support_generator,
)
from training.model import (
    DIPModel,
    autocast,
    batch_to_device,
    build_model,
    fast_matmul,
    grad_scaler,
    optimizer_step,
    peak_memory_bytes,
    task_loss,
)
from training.packed import PackedEpisodes, packed_episodes
from training.plots import write_loss_plot

log = logging.getLogger(__name__)

@dataclass
class Runtime:
    """Where this process sits in a (possibly distributed) run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    report: Callable[[dict], None] | None = None  # called on every rank at each checkpoint


@dataclass
class TrainResult:
    step: int
    total_steps: int
    last_loss: float
    encoder_uri: str | None
    peak_memory_bytes: int = 0  # CUDA max_memory_allocated on a GPU, peak RSS on a CPU


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; biases and 1-D parameters (norm scales) get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def cosine_factor(step: int, total_steps: int) -> float:
    """lr(t) / lr_max = (1 + cos(pi t / T)) / 2, no warmup; reaches 0 at t = T."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW with the released betas and decay, and a per-iteration cosine schedule.

    On CUDA the fused AdamW kernel updates every parameter in one launch (same update rule).
    """
    fused = next(model.parameters()).device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
        fused=fused or None,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, total_steps)
    )
    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------
# metrics


def write_metrics(out: str, rows: list[dict], write_csv: bool) -> None:
    """metrics.parquet, and with ``write_csv`` metrics.csv: the columns of the first row, quoted by
    the csv module where a value needs it (a comma, a quote, a line break)."""
    table = pa.Table.from_pylist(rows) if rows else pa.table({"step": pa.array([], pa.int64())})
    storage.write_parquet(storage.join(out, "metrics.parquet"), table)
    if write_csv and rows:
        with storage.atomic_open(storage.join(out, "metrics.csv"), "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n",
                                    extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def read_metrics(out: str, upto_step: int) -> list[dict]:
    uri = storage.join(out, "metrics.parquet")
    if not storage.exists(uri):
        return []
    return [r for r in storage.read_parquet(uri).to_pylist() if r.get("step", 0) <= upto_step]


# ---------------------------------------------------------------------------------------------
# the loop


def _reduce_mean(value: torch.Tensor, rt: Runtime) -> float:
    if rt.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= rt.world_size
    return float(value)


def _barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        dist.barrier()


def prepare(cfg: TrainConfig, rt: Runtime) -> tuple[PairEpisodes, int]:
    """Every input check that can fail, before any model is built; returns (data, total steps)."""
    if not cfg.labels or not cfg.out:
        raise ConfigError("training needs both a label set URI (labels) and an output URI (out)")
    try:
        get_spec(cfg.backbone)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    if cfg.weights not in (None, "hub") and not storage.isfile(cfg.weights):
        where = cfg.weights if "://" in cfg.weights else os.path.abspath(cfg.weights)
        raise FileNotFoundError(f"backbone weight file not found: {cfg.weights} "
                                f"(looked at {where})")
    check_task_batch(cfg.micro_batch_size, cfg.num_distractors, cfg.distractors)
    cfg.accumulation_steps(rt.world_size)
    data = PairEpisodes(cfg.labels, cfg.resize, cfg.crop, cfg.cache_prepared, cfg.ignore_index)
    return data, cfg.epochs * steps_per_epoch(len(data), cfg.batch_size)


def training_input(cfg: TrainConfig, data: PairEpisodes, rt: Runtime
                   ) -> PairEpisodes | PackedEpisodes:
    """The dataset the loop reads: the packed input by default, which rank 0 (or the driver of
    a Ray run) builds when it is missing, after the cheaper checks and the model have passed."""
    if cfg.input != "packed":
        return data
    return packed_episodes(data, cfg.packed_root, cfg.packed_shard_size, cfg.packed_window,
                           cfg.packed_ray, build=rt.rank == 0, progress=rt.rank == 0)


def train(
    cfg: TrainConfig,
    rt: Runtime | None = None,
    on_step: Callable[[int, DIPModel], None] | None = None,
) -> TrainResult:
    """Train (or resume) the run described by ``cfg``; returns where it stopped.

    ``on_step(step, model)`` is called after each optimizer step (and any checkpoint of it).
    """
    rt = rt or Runtime()
    previous = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(cfg.deterministic or previous)
    try:
        with fast_matmul(rt.device):
            return _train(cfg, rt, on_step)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(cfg: TrainConfig, rt: Runtime, on_step) -> TrainResult:
    data, total_steps = prepare(cfg, rt)
    accum = cfg.accumulation_steps(rt.world_size)
    stop_step = min(total_steps, cfg.max_steps or total_steps)

    torch.manual_seed(derive_seed(cfg.seed, 0))  # same encoder (if random) and head on every rank
    model = build_model(cfg.backbone, cfg.weights, cfg.tiny, cfg.trainable_blocks,
                        cfg.head_hidden_mult, cfg.head_dim, device=rt.device,
                        head_norm_eps=cfg.head_norm_eps)
    if cfg.crop % model.patch_size:
        raise ValueError(f"crop {cfg.crop} is not a multiple of the patch size {model.patch_size}")
    data = training_input(cfg, data, rt)
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    scaler = grad_scaler(cfg.precision, rt.device)  # fp16 only

    start_step, rows = 0, []
    resume = resume_point(cfg.out)
    identity = run_identity(cfg, len(data), rt.world_size)  # hashes the weights once
    if rt.rank == 0:  # the network before any step (a resumed run rebuilds the same one)
        save_backbone(model.encoder, storage.join(cfg.out, "init.safetensors"))
    if resume is not None:
        resume_uri, state = resume
        check_identity(cfg, state, resume_uri, len(data), rt.world_size, now=identity)
        log.info("resuming from %s (step %d)", resume_uri, state["step"])
        model.load_trainable_state(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        rows = read_metrics(cfg.out, start_step)
    if rt.rank == 0:
        save_config(cfg, storage.join(cfg.out, "config.yaml"))

    net = model
    if rt.world_size > 1:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile_model:
        net = torch.compile(net)  # encoder + head: the forward task_loss calls
    batches = TaskBatches(len(data), cfg.seed, cfg.batch_size, cfg.micro_batch_size,
                          rt.world_size, rt.rank, stop_step, start_step, order=data.order)
    # one call per micro-batch (batch_size=None): the packed input gathers it into batch tensors
    loader = DataLoader(Batched(data), sampler=batches, batch_size=None,
                        num_workers=cfg.loader_workers, pin_memory=rt.device.type == "cuda")
    steps = batches.steps
    bar = tqdm(total=stop_step, initial=start_step, disable=rt.rank != 0, desc="train", unit="step")
    last_loss, running = float("nan"), torch.zeros((), device=rt.device)
    tick = time.perf_counter()
    net.train()
    for k, batch in enumerate(loader):
        epoch, step, micro = batches.position(k)
        support = sample_support(cfg.micro_batch_size, cfg.num_distractors,
                                 support_generator(cfg.seed, epoch, step, micro, rt.rank),
                                 cfg.distractors)
        # labels checked and narrowed on the host: nothing below waits for the device
        batch = batch_to_device({**batch, "support": support}, rt.device, data.num_classes,
                                cfg.ignore_index)
        sync = micro == accum - 1
        with (contextlib.nullcontext() if sync or rt.world_size == 1 else net.no_sync()):
            with autocast(cfg.precision, rt.device):
                loss = task_loss(
                    net, batch["query"].float() / 255, batch["query_labels"],
                    batch["positive"].float() / 255, batch["positive_labels"],
                    batch["support"], data.num_classes, model.patch_size,
                    cfg.temperature, cfg.loss, cfg.ignore_index, check_labels=False,
                )
            (loss / accum if scaler is None else scaler.scale(loss / accum)).backward()
        running += loss.detach() / accum
        if not sync:
            continue
        lr = optimizer.param_groups[0]["lr"]
        scale = optimizer_step(optimizer, scaler)
        with warnings.catch_warnings():  # an fp16 step the scaler skipped is no misordered call
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()  # per iteration, a skipped fp16 step included (as released)
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        last_loss = _reduce_mean(running, rt)
        running.zero_()
        now = time.perf_counter()
        rows.append({"step": done, "epoch": epoch, "loss": last_loss, "lr": lr,
                     "images_per_s": 2 * cfg.batch_size / max(now - tick, 1e-9),
                     "peak_memory_mb": peak_memory_bytes(rt.device) / 2**20}
                    | ({} if scaler is None else {"loss_scale": scale}))
        tick = now
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rows[-1]['images_per_s']:.1f}")
        if done % cfg.checkpoint_every == 0 or done % steps == 0 or done == stop_step:
            _checkpoint(cfg, rt, model, optimizer, scheduler, done, steps, identity, rows,
                        scaler)
        if on_step is not None:
            on_step(done, model)
    bar.close()

    encoder_uri = None
    if rt.rank == 0:
        encoder_uri = storage.join(cfg.out, "encoder.safetensors")
        save_backbone(model.encoder, encoder_uri)  # the encoder alone, no head
        # the same weights in the model hub layout, and the loss curve of the metrics
        save_hub_export(model.encoder, storage.join(cfg.out, HUB_FOLDER), cfg.model_dump(mode="json"))
        write_loss_plot(cfg.out)
    _barrier(rt)
    return TrainResult(stop_step, total_steps, last_loss, encoder_uri,
                       peak_memory_bytes(rt.device))


def _checkpoint(cfg, rt, model, optimizer, scheduler, step, epoch_steps, identity, rows,
                scaler=None):
    """Rank 0 writes the checkpoint and the metrics so far; every rank reports and waits.

    The data position is the step: the order of epoch e and the support sets are functions of
    (seed, epoch, step), so nothing else about the sampler needs saving.
    """
    if rt.rank == 0:
        state = {
            "step": step,
            "epoch": step // epoch_steps,  # epochs completed (informational)
            "model": model.trainable_state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "identity": identity,
        }
        if scaler is not None:  # fp16: the loss scale resumes where it was
            state["scaler"] = scaler.state_dict()
        save_checkpoint(cfg.out, state, cfg.keep_checkpoints)
        write_metrics(cfg.out, rows, cfg.write_csv)
    _barrier(rt)
    if rt.report is not None:
        rt.report(dict(rows[-1]))
