"""The DIP training loop: optimizer and schedule, gradient accumulation, checkpoints with exact
resume, metrics, and the final export of the encoder. No Ray here: a distributed caller
initialises torch.distributed and passes a :class:`Runtime`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
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
from training.config import TrainConfig
from training.episodes import (
    Batched,
    PairEpisodes,
    TaskBatches,
    check_task_batch,
    derive_seed,
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

log = logging.getLogger(__name__)

# checkpoint keys that must agree with the config of a run resuming from it
IDENTITY_KEYS = ("backbone", "tiny", "trainable_blocks", "head_hidden_mult", "head_dim", "seed",
                 "batch_size", "epochs", "base_lr", "weight_decay", "resize", "crop",
                 "input", "packed_shard_size", "packed_window",  # these three set the order
                 "distractors", "head_norm_eps")
# the value an identity key had in checkpoints written before it was recorded, where that is
# not today's default (the head's LayerNorm used torch's default eps then)
LEGACY_IDENTITY = {"head_norm_eps": 1e-5}
# what a checkpoint holds, and the type of each entry
CHECKPOINT_ENTRIES = {"step": int, "epoch": int, "model": dict, "optimizer": dict,
                      "scheduler": dict, "rng": torch.Tensor, "identity": dict}
CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded (truncated, corrupt, not a checkpoint); names the file."""


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
# checkpoints and metrics


def checkpoint_dir(out: str) -> str:
    return storage.join(out, "checkpoints")


def checkpoint_step(uri: str) -> int | None:
    """The step number in a checkpoint's name (step_00000042.pt -> 42), None for other names."""
    match = CHECKPOINT_NAME.fullmatch(uri.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def list_checkpoints(out: str) -> list[str]:
    """URIs of the checkpoints under ``out``, oldest step first."""
    found = [u for u in storage.ls(checkpoint_dir(out)) if checkpoint_step(u) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out: str) -> str | None:
    """URI of the newest checkpoint under ``out`` (writes are atomic), or None."""
    return (list_checkpoints(out) or [None])[-1]


def save_checkpoint(out: str, state: dict, keep: int) -> str:
    """torch.save ``state`` atomically to out/checkpoints/step_XXXXXXXX.pt; keep the last ``keep``.

    Checkpoints of later steps than this one are removed: resume takes the newest one that
    loads, so a later one is one that could not be loaded, and counting it would prune good ones.
    """
    uri = storage.join(checkpoint_dir(out), f"step_{state['step']:08d}.pt")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(uri, buffer.getvalue())
    others = [u for u in list_checkpoints(out) if u != uri]
    later = [u for u in others if checkpoint_step(u) > state["step"]]
    earlier = [u for u in others if checkpoint_step(u) < state["step"]]
    for stale in later:
        log.warning("removing checkpoint %s: resume passed over it (it did not load), and this "
                    "run has since written step %d", stale, state["step"])
        storage.remove(stale)
    for stale in earlier[: max(0, len(earlier) - (keep - 1))]:
        storage.remove(stale)
    return uri


def _content_problem(state: object, step: int | None) -> str | None:
    """What is wrong with a loaded checkpoint's content, or None when it has what resume needs."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint dict"
    if missing := [key for key in CHECKPOINT_ENTRIES if key not in state]:
        return f"it lacks {', '.join(missing)}"
    wrong = [f"{key} is a {type(state[key]).__name__}" for key, kind in CHECKPOINT_ENTRIES.items()
             if not isinstance(state[key], kind)]
    wrong += [f"model entry {name} is not a tensor" for name, value in state["model"].items()
              if not isinstance(value, torch.Tensor)][:1]
    if wrong:
        return f"wrong entries: {'; '.join(wrong)}"
    if step is not None and state["step"] != step:
        return f"it holds step {state['step']} but its name says step {step}"
    return None


def _load_failure(data: bytes, exc: Exception) -> str:
    """Why torch could not load ``data``, in one line (torch's own messages run to paragraphs)."""
    if not data.startswith(b"PK\x03\x04"):
        return "it is not the zip archive torch.save writes (empty or overwritten)"
    detail = [line for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
    first = (detail[0] if detail else str(exc)).strip().split(". ")[0]
    return f"{type(exc).__name__}: {first[:200]}"


def load_checkpoint(uri: str) -> dict:
    """A checkpoint read with ``weights_only=True``; CheckpointError names the file and cause."""
    data = storage.read_bytes(uri)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, a foreign pickle, ...: torch raises many kinds
        raise CheckpointError(f"checkpoint {uri} ({len(data)} bytes) cannot be loaded: "
                              f"{_load_failure(data, exc)}") from exc
    if problem := _content_problem(state, checkpoint_step(uri)):
        raise CheckpointError(f"checkpoint {uri} is not a training checkpoint: {problem}")
    return state


def resume_point(out: str) -> tuple[str, dict] | None:
    """(URI, state) of the newest checkpoint under ``out`` that loads; None when there are none.

    One that cannot be loaded is named in a warning and the one before it is tried. When none
    loads, CheckpointError names them all: training from scratch would overwrite the metrics and
    prune those files, so the choice is left to whoever owns the run.
    """
    failures = []
    for uri in reversed(list_checkpoints(out)):
        try:
            return uri, load_checkpoint(uri)
        except (CheckpointError, FileNotFoundError) as exc:  # gone since the listing: same thing
            log.warning("%s; trying an earlier checkpoint", exc)
            failures.append(str(exc))
    if failures:
        raise CheckpointError(f"cannot resume the run in {out}: no checkpoint loads "
                              f"({'; '.join(failures)}); remove {checkpoint_dir(out)} to train "
                              "from scratch, or use a new out")
    return None


def check_identity(cfg: TrainConfig, state: dict, uri: str, num_pairs: int) -> None:
    """A checkpoint only resumes the run that wrote it: same model, data and schedule."""
    now = {k: getattr(cfg, k) for k in IDENTITY_KEYS} | {"num_pairs": num_pairs}
    # a key newer than the checkpoint had its default when the checkpoint was written
    saved = ({k: TrainConfig.model_fields[k].default for k in IDENTITY_KEYS} | LEGACY_IDENTITY
             | state["identity"])
    diff = [f"{k}: checkpoint {saved.get(k)!r} != now {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diff:
        raise ValueError(
            f"cannot resume from {uri}: the run differs ({'; '.join(diff)}); use a new --out"
        )


def write_metrics(out: str, rows: list[dict], csv: bool) -> None:
    table = pa.Table.from_pylist(rows) if rows else pa.table({"step": pa.array([], pa.int64())})
    storage.write_parquet(storage.join(out, "metrics.parquet"), table)
    if csv and rows:
        header = ",".join(rows[0])
        lines = [",".join(str(r[k]) for k in rows[0]) for r in rows]
        storage.write_text(storage.join(out, "metrics.csv"), "\n".join([header, *lines]) + "\n")


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
    if rt.rank == 0:  # the network before any step (a resumed run rebuilds the same one)
        save_backbone(model.encoder, storage.join(cfg.out, "init.safetensors"))
    if resume is not None:
        resume_uri, state = resume
        check_identity(cfg, state, resume_uri, len(data))
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
            _checkpoint(cfg, rt, model, optimizer, scheduler, done, steps, len(data), rows,
                        scaler)
        if on_step is not None:
            on_step(done, model)
    bar.close()

    encoder_uri = None
    if rt.rank == 0:
        encoder_uri = storage.join(cfg.out, "encoder.safetensors")
        save_backbone(model.encoder, encoder_uri)  # the encoder alone, no head
    _barrier(rt)
    return TrainResult(stop_step, total_steps, last_loss, encoder_uri,
                       peak_memory_bytes(rt.device))


def _checkpoint(cfg, rt, model, optimizer, scheduler, step, epoch_steps, num_pairs, rows,
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
            "identity": {k: getattr(cfg, k) for k in IDENTITY_KEYS} | {"num_pairs": num_pairs},
        }
        if scaler is not None:  # fp16: the loss scale resumes where it was
            state["scaler"] = scaler.state_dict()
        save_checkpoint(cfg.out, state, cfg.keep_checkpoints)
        write_metrics(cfg.out, rows, cfg.write_csv)
    _barrier(rt)
    if rt.report is not None:
        rt.report(dict(rows[-1]))
