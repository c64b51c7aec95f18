"""Training checkpoints: atomic writes, exact resume, and the identity a resume must match.

A checkpoint (``<out>/checkpoints/step_XXXXXXXX.pt``) holds the step, the trainable weights, the
optimizer, scheduler and RNG states, and the run's identity: the resolved config minus
:data:`OPERATIONAL_FIELDS`, the content of the initial weights, the number of pairs and the
world size. A run resumes only from a checkpoint of the same identity, so a setting added to
``TrainConfig`` is covered without anyone listing it; one that changes only how the run
executes is placed in :data:`OPERATIONAL_FIELDS`.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import torch

from shared import storage
from shared.backbones import weights_identity
from training.config import TrainConfig

log = logging.getLogger(__name__)

# Settings that change how a run executes, never what it computes: a run resumes across them.
OPERATIONAL_FIELDS = frozenset({
    "out", "max_steps",  # where it writes, where it stops (the schedule spans every epoch)
    "compile_model", "deterministic", "use_gpu",  # how the same steps are computed
    "loader_workers", "cache_prepared", "packed_root", "packed_ray",  # how the input is read
    "checkpoint_every", "keep_checkpoints", "write_csv",  # what is saved on the way
    "workers", "address", "max_failures",  # where it runs (the world size is recorded instead)
})
# Entries of an identity that are not settings; a checkpoint written before one of them was
# recorded cannot say what it was, so that entry is not compared.
RUN_ENTRIES = ("weights_content", "num_pairs", "world_size")
# The value a setting had in checkpoints written before it was recorded, where that is not
# today's default (the head's LayerNorm used torch's default eps then).
LEGACY_IDENTITY = {"head_norm_eps": 1e-5}
# what a checkpoint holds, and the type of each entry
CHECKPOINT_ENTRIES = {"step": int, "epoch": int, "model": dict, "optimizer": dict,
                      "scheduler": dict, "rng": torch.Tensor, "identity": dict}
CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded (truncated, corrupt, not a checkpoint); names the file."""


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


def run_identity(cfg: TrainConfig, num_pairs: int, world_size: int) -> dict[str, Any]:
    """What a run's result depends on: every setting but the operational ones, the content of
    the initial weights, the number of pairs, and the world size (it sets which queries share a
    micro-batch, and so the support sets)."""
    settings = cfg.model_dump(mode="json", exclude=set(OPERATIONAL_FIELDS))
    content = weights_identity(cfg.backbone, cfg.weights, cfg.tiny, cfg.seed)
    return {**settings, "weights_content": content, "num_pairs": num_pairs,
            "world_size": world_size}


def check_identity(cfg: TrainConfig, state: dict, uri: str, num_pairs: int, world_size: int,
                   now: dict[str, Any] | None = None) -> None:
    """A checkpoint only resumes the run that wrote it: same model, data and schedule.

    ``now``: this run's :func:`run_identity`, when the caller has it already. A setting newer
    than the checkpoint had its default (or its LEGACY_IDENTITY value) when it was written.
    """
    now = run_identity(cfg, num_pairs, world_size) if now is None else now
    defaults = TrainConfig.model_construct().model_dump(mode="json")
    saved = ({k: defaults[k] for k in now if k not in RUN_ENTRIES} | LEGACY_IDENTITY
             | state["identity"])
    diff = [f"{k}: checkpoint {saved[k]!r} != now {v!r}" for k, v in now.items()
            if k in saved and saved[k] != v]
    if diff:
        raise ValueError(
            f"cannot resume from {uri}: the run differs ({'; '.join(diff)}); use a new --out"
        )
