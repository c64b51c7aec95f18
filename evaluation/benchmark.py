"""The whole benchmark: encoders x datasets x low-shot fractions x seeds -> result tables.

For each (encoder, dataset, fraction, seed): pick the low-shot subset of the memory images,
build (or reuse) its memory bank with the Ray job, query it with the validation images, record
mIoU or RMSE. With ``linear.enabled``, each (encoder, segmentation dataset) also gets the
linear-probe baseline, trained on the same training images and scored on the same queries. Banks live under
``<out>/banks/<encoder>-<weights hash>/<dataset>/<fraction>/seed<seed>-<options hash>``, so
a rerun reuses them and runs with other options never collide.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable

import numpy as np
import torch

from shared import storage
from shared.backbones import get_spec, load_backbone, save_backbone
from shared.config import ConfigError, save_config
from shared.devices import default_device

from .bank import encoder_identity, npy_bytes, npy_load
from .config import EvalConfig
from .datasets import PAPER_DATASETS, dataset_class, memory_dataset_name, open_dataset
from .datasets.lowshot import class_presence, lowshot_subsets, parse_fraction
from .linear import run_linear_probe
from .memory import BankSpec, DatasetRef, EncoderRef, build_memory_bank, fingerprint_key
from .protocols import resolved_settings
from .report import write_results
from .retrieval import evaluate_incontext


def encoder_pairs(cfg: EvalConfig) -> list[tuple[str, str]]:
    """(backbone, weights) pairs: one backbone with many weights, many with one, or zipped."""
    b, w = cfg.backbones, cfg.weights
    if len(b) == len(w):
        return list(zip(b, w, strict=True))
    if len(b) == 1:
        return [(b[0], x) for x in w]
    if len(w) == 1:
        return [(x, w[0]) for x in b]
    raise ConfigError(f"{len(b)} backbones and {len(w)} weights: give one of either, or as many "
                     "weights as backbones")


def prepare_encoder(name: str, weights: str, cfg: EvalConfig, device) -> tuple[EncoderRef, object]:
    """The encoder and a reference any Ray worker can load identically.

    Random-init encoders ("random", or any tiny one without a file) are seeded with ``cfg.seed``
    and saved under ``<out>/encoders`` so workers load the very same weights.
    """
    random_init = weights == "random" or (cfg.tiny and weights == "hub")
    if not random_init:
        ref = EncoderRef(name, weights, cfg.tiny)
        return ref, ref.load(device=device)
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(name, None, tiny=cfg.tiny, device=device)
    tag = f"{name}{'-tiny' if cfg.tiny else ''}-random-seed{cfg.seed}.safetensors"
    uri = storage.join(cfg.out, "encoders", tag)
    save_backbone(backbone, uri)
    return EncoderRef(name, uri, cfg.tiny), backbone


def encoder_label(name: str, weights: str, tiny: bool = False) -> str:
    """A short table label: backbone, weights source, and tiny marker."""
    size = "-tiny" if tiny else ""
    if weights == "random" or (tiny and weights == "hub"):
        return f"{name}{size}:random"
    if weights == "hub":
        return f"{name}:hub"
    return f"{name}{size}:{os.path.basename(weights.rstrip('/'))}"


def _root(cfg: EvalConfig, name: str) -> str:
    if name not in cfg.data_roots:
        raise ConfigError(f"no data root for dataset {name!r}: pass --data-root, or set "
                         f"data_roots.{name}=<URI> (the expected layout:\n"
                         f"{dataset_class(name).layout})")
    return cfg.data_roots[name]


def _presence(cfg: EvalConfig, train, positions: list[int]) -> np.ndarray:
    """Which classes each memory image holds; read once per dataset and cached under ``out``."""
    key = hashlib.sha256(json.dumps([train.describe(), train.image_ids[: len(positions)]])
                         .encode()).hexdigest()[:16]
    uri = storage.join(cfg.out, "presence", f"{train.name}-{key}.npy")
    if storage.exists(uri):
        return npy_load(storage.read_bytes(uri), uri).astype(bool)
    presence = class_presence(train.subset(positions))
    storage.write_bytes(uri, npy_bytes(presence))
    return presence


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def check_encoders(cfg: EvalConfig) -> list[tuple[str, str]]:
    """The (backbone, weights) pairs; each backbone registered, each weight file present."""
    pairs = encoder_pairs(cfg)
    for name, weights in pairs:
        try:
            get_spec(name)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        if weights not in ("hub", "random") and not storage.isfile(weights):
            where = weights if "://" in weights else os.path.abspath(weights)
            raise FileNotFoundError(f"backbone weight file not found: {weights} (looked at "
                                    f"{where}; the other choices are 'hub' and 'random')")
    return pairs


def open_datasets(cfg: EvalConfig, names: list[str]) -> dict[str, tuple]:
    """name -> (memory reader, query reader) for every dataset; the readers check their files."""
    opened = {}
    for name in names:
        try:
            dataset_class(name)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        mem_name = memory_dataset_name(name)
        opened[name] = (open_dataset(mem_name, _root(cfg, mem_name), "train"),
                        open_dataset(name, _root(cfg, name), "val"))
    return opened


def run_benchmark(cfg: EvalConfig, log: Callable[[str], None] = print) -> list[dict]:
    """Run every configured evaluation; writes config.yaml, results.json and results.md.

    Every record and both result files name the protocol and its resolved settings, and every
    mIoU names the class matching that produced it. Every input is checked (encoder names and
    weight files, data roots, each dataset's images and targets) before anything is loaded or
    written.
    """
    names = list(PAPER_DATASETS) if cfg.datasets == ["all"] else cfg.datasets
    pairs = check_encoders(cfg)
    datasets = open_datasets(cfg, names)
    save_config(cfg, storage.join(cfg.out, "config.yaml"))
    device = default_device(cfg.device)
    protocol = resolved_settings(cfg)
    records: list[dict] = []
    for backbone_name, weights in pairs:
        ref, backbone = prepare_encoder(backbone_name, weights, cfg, device)
        identity = encoder_identity(backbone)
        label = encoder_label(backbone_name, weights, cfg.tiny)
        size = cfg.input_size or backbone.spec.eval_input_size
        for name in names:
            records += _evaluate_dataset(cfg, name, datasets[name], ref, backbone, identity,
                                         label, size, device, log)
            if cfg.linear.enabled:
                records += _linear_probe(cfg, name, datasets[name], ref, backbone, identity,
                                         label, size, device, log)
            write_results(cfg.out, records, protocol)
    return write_results(cfg.out, records, protocol)


def _evaluate_dataset(cfg, name, readers, ref, backbone, identity, label, size, device,
                      log) -> list[dict]:
    train, val = readers
    mem_name = memory_dataset_name(name)
    mem_root = _root(cfg, mem_name)
    if cfg.max_val_images:
        val = val.subset(range(min(len(val), cfg.max_val_images)))
    positions = list(range(min(len(train), cfg.max_train_images or len(train))))
    needs_presence = any(parse_fraction(f) < 1 for f in cfg.lowshot.fractions)
    presence = _presence(cfg, train, positions) if needs_presence else \
        np.ones((len(positions), 1), dtype=bool)
    enc_tag = f"{identity['backbone']}-{identity['weights_sha256'][:12]}"
    records = []
    for fraction in cfg.lowshot.fractions:
        full = parse_fraction(fraction) == 1
        seeds = cfg.lowshot.seeds[: cfg.lowshot.full_data_seeds] if full else cfg.lowshot.seeds
        for seed in seeds:
            subset = lowshot_subsets(presence, [fraction], seed)[fraction]
            spec = BankSpec(ref, identity, DatasetRef(mem_name, mem_root, "train"),
                            tuple(positions[int(i)] for i in subset), size,
                            cfg.memory.model_dump(mode="json"), seed, train.task,
                            train.num_classes)
            bank_uri = storage.join(cfg.out, "banks", enc_tag, mem_name,
                                    fraction.replace("/", "_"),
                                    f"seed{seed}-{fingerprint_key(spec.fingerprint())}")
            bank = build_memory_bank(spec, bank_uri, cfg.memory, cfg.ray_address, log)
            result = evaluate_incontext(backbone, identity, bank, val, cfg.search, size,
                                        cfg.eval_batch_size, device, log)
            metric = "miou" if val.task == "segmentation" else "rmse"
            records.append({
                "encoder": label, "backbone": identity["backbone"], "weights": ref.weights,
                "weights_sha256": identity["weights_sha256"], "dataset": name,
                "memory_dataset": mem_name, "fraction": fraction, "seed": seed,
                "memory_images": len(subset), "protocol": cfg.protocol,
                "method": "in-context", "metric": metric,
                "matching": result.get("matching"), "value": _finite(result[metric]),
                "input_size": size, "bank": bank_uri,
                "details": {k: v for k, v in result.items() if k not in (metric, "matching")},
            })
    return records


def _linear_probe(cfg, name, readers, ref, backbone, identity, label, size, device,
                  log) -> list[dict]:
    """The linear-probe record of one (encoder, dataset): trained on the memory dataset's
    training images (``max_train_images`` of them), scored on the in-context queries."""
    train, val = readers
    if val.task != "segmentation":
        log(f"linear probe: {name} is a {val.task} dataset, skipped (the probe classifies)")
        return []
    if cfg.max_train_images:
        train = train.subset(range(min(len(train), cfg.max_train_images)))
    if cfg.max_val_images:
        val = val.subset(range(min(len(val), cfg.max_val_images)))
    lin = cfg.linear
    log(f"linear probe: {label} on {name} ({len(train)} training images, {lin.epochs} epochs)")
    result = run_linear_probe(backbone, train, val, size, lin.epochs, lin.lr, lin.batch_size,
                              lin.seed, device, lin.weight_decay)
    return [{
        "encoder": label, "backbone": identity["backbone"], "weights": ref.weights,
        "weights_sha256": identity["weights_sha256"], "dataset": name,
        "train_dataset": memory_dataset_name(name), "fraction": "1", "seed": lin.seed,
        "train_images": result["train_images"], "protocol": cfg.protocol, "method": "linear",
        "metric": "miou", "matching": result["matching"], "value": _finite(result["miou"]),
        "input_size": size,
        "details": {"val_images": result["val_images"], "epochs": lin.epochs, "lr": lin.lr,
                    "batch_size": lin.batch_size, "weight_decay": lin.weight_decay},
    }]
