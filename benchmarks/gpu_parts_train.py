"""The training and evaluation parts of the GPU suite: DIP steps, the input alone, bank search.

Training runs the project's loop (`training.loop.train`) on a synthetic label set through the
packed input (training/packed.py, built by the first training part and reused by the others),
with random-init DINOv2R encoders (timm, ``pretrained=False``). Steps are timed from the loop's
own step callback, the device synchronised: the first timed interval (warm-up) and the last (it
holds the final checkpoint) are left out. Search runs the evaluation's backends
(evaluation/retrieval.py chooses them from a SearchConfig, as an evaluation does) over a random
bank of unit fp16 patches held where the backend reads it.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from bench_eval import peak_rss_gib
from gpu_measure import count_flops, matmul_precision, median, peak_memory_gib, rate_fields, sync
from gpu_parts import rate_row


def labelset(ctx) -> str:
    """The synthetic label set every training part reads (built once per suite run)."""
    from bench_train_data import synthetic_labelset

    if "labels" not in ctx.cache:
        s = ctx.sizes
        ctx.cache["labels"] = synthetic_labelset(f"{ctx.work}/train", s.train_images,
                                                 s.train_height, s.train_width,
                                                 s.pairs_per_image)
    return ctx.cache["labels"]


def train_config(ctx, backbone: str):
    """The run of one training part: defaults of the released recipe, random init, few steps."""
    from training.config import TrainConfig

    s = ctx.sizes
    steps_per_epoch = s.train_images * s.pairs_per_image // s.train_batch
    return TrainConfig(
        labels=labelset(ctx), out=f"{ctx.work}/train-{backbone}", backbone=backbone,
        weights=None, tiny=s.tiny, head_dim=s.head_dim, resize=s.resize, crop=s.crop,
        batch_size=s.train_batch, micro_batch_size=s.micro_batch,
        epochs=-(-s.train_steps // steps_per_epoch), max_steps=s.train_steps,
        checkpoint_every=10**9, keep_checkpoints=1, write_csv=False,
        loader_workers=s.loader_workers)


def step_flops(cfg, device: torch.device, num_classes: int) -> float:
    """FLOPs per task of one training micro-batch (forward + backward), counted on ``device``
    (the loss's autocast check needs a real device)."""
    from training.episodes import sample_support
    from training.model import autocast, build_model, label_dtype, task_loss

    torch.manual_seed(0)
    model = build_model(cfg.backbone, None, cfg.tiny, cfg.trainable_blocks, cfg.head_hidden_mult,
                        cfg.head_dim, device=device).train()
    m, c = cfg.micro_batch_size, cfg.crop
    images = torch.rand(2 * m, 3, c, c, device=device)  # queries, then positives
    labels = torch.randint(0, num_classes, (2 * m, c, c), device=device)
    labels = labels.to(label_dtype(num_classes))
    support = sample_support(m, cfg.num_distractors, torch.Generator().manual_seed(0))

    def step() -> None:
        with autocast(cfg.precision, device):
            loss = task_loss(model, images[:m], labels[:m], images[m:], labels[m:],
                             support.to(device), num_classes, model.patch_size,
                             check_labels=False)
        loss.backward()

    return count_flops(step) / m


def part_train(ctx, backbone: str) -> dict:
    """DIP post-training steps of ``backbone`` (effective batch, micro-batches, AdamW, bf16)."""
    from training.episodes import PairEpisodes
    from training.loop import Runtime, train

    cfg = train_config(ctx, backbone)
    stamps: list[float] = []

    def on_step(step: int, model) -> None:
        sync(ctx.device)
        stamps.append(time.perf_counter())

    result = train(cfg, Runtime(device=ctx.device), on_step)
    memory = result.peak_memory_bytes / 2**30
    # step intervals, less the first (warm-up) and the last (it holds the final checkpoint)
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][1:-1]
    if not steps:
        raise RuntimeError(f"{len(stamps)} steps ran: too few to time one (need 4)")
    per_s = cfg.batch_size / median(steps)
    classes = PairEpisodes(cfg.labels, cfg.resize, cfg.crop).num_classes
    flops = step_flops(cfg, ctx.device, classes)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}  # training.model.autocast's
    compute = (autocast.get(cfg.precision, torch.float32) if ctx.device.type == "cuda"
               else torch.float32)  # a CPU step runs without autocast
    row = rate_row(ctx, per_s, "tasks", cfg.micro_batch_size, steps, flops,
                   matmul_precision(compute), batch_name="micro-batch",
                   effective_batch=cfg.batch_size, steps_timed=len(steps), crop=cfg.crop,
                   head_dim=cfg.head_dim, classes=classes, peak_gib=memory,
                   last_loss=result.last_loss, dtype=str(compute))
    row["memory_gib"] = memory
    row["result"] += f", effective batch {cfg.batch_size}"
    return row


def part_data_path(ctx) -> dict:
    """The packed training input alone: the loop's loader (workers, pinned memory) and the move
    of each micro-batch to the device, no model."""
    from torch.utils.data import DataLoader

    from training.episodes import (
        Batched,
        PairEpisodes,
        TaskBatches,
        sample_support,
        support_generator,
    )
    from training.loop import Runtime, training_input
    from training.model import batch_to_device

    cfg = train_config(ctx, ctx.sizes.train_backbones[0])
    source = PairEpisodes(cfg.labels, cfg.resize, cfg.crop, cfg.cache_prepared, cfg.ignore_index)
    data = training_input(cfg, source, Runtime(device=ctx.device))  # built here if not yet
    batches = TaskBatches(len(data), cfg.seed, cfg.batch_size, cfg.micro_batch_size, 1, 0,
                          10**9, order=data.order)
    loader = DataLoader(Batched(data), sampler=batches, batch_size=None,
                        num_workers=cfg.loader_workers, pin_memory=ctx.device.type == "cuda")
    warmup, tasks, start = cfg.loader_workers + 1, 0, 0.0  # the workers' start is not the path
    for k, batch in enumerate(loader):
        epoch, step, micro = batches.position(k)
        support = sample_support(cfg.micro_batch_size, cfg.num_distractors,
                                 support_generator(cfg.seed, epoch, step, micro, 0))
        batch_to_device({**batch, "support": support}, ctx.device, data.num_classes,
                        cfg.ignore_index)
        if k + 1 == warmup:
            sync(ctx.device)
            start = time.perf_counter()
        elif k + 1 > warmup:
            tasks += cfg.micro_batch_size
            if time.perf_counter() - start >= ctx.budget:
                break
    sync(ctx.device)
    seconds = time.perf_counter() - start
    del loader  # stops the workers
    per_s = tasks / seconds
    return {"result": f"{per_s:,.0f} tasks/s with {cfg.loader_workers} loader workers "
                      f"(micro-batch {cfg.micro_batch_size}, {cfg.crop} px crops)",
            "metrics": {"tasks_per_s": per_s, "tasks": tasks, "seconds": seconds,
                        "loader_workers": cfg.loader_workers, "pairs": len(data)}}


def search_bank(ctx) -> list[tuple[int, torch.Tensor]]:
    """The random bank, (offset, (n, D) float16 unit rows) shards on the suite's device."""
    if "bank" not in ctx.cache:
        s, device = ctx.sizes, ctx.device
        gen = torch.Generator(device=device).manual_seed(0)
        shards = []
        for offset in range(0, s.bank_patches, s.bank_shard):
            rows = min(s.bank_shard, s.bank_patches - offset)
            feats = torch.randn(rows, s.bank_dim, generator=gen, device=device)
            shards.append((offset, F.normalize(feats, dim=1).half()))  # (n, D)
        ctx.cache["bank"] = shards
    return ctx.cache["bank"]


def faiss_skip(device: torch.device, has_gpu: bool) -> str | None:
    """Why faiss is not measured on ``device``: on a GPU machine a CPU index would time the
    host, not the GPU (and take minutes at 10M patches); on a CPU the CPU index is the backend."""
    if device.type == "cuda" and not has_gpu:
        return ("the installed faiss has no GPU support (faiss-cpu); install faiss-gpu-cu12 "
                "(pyproject's gpu extra) to measure it")
    return None


def part_search(ctx, backend: str, dtype: str = "auto") -> dict:
    """Exact top-k (k=30) of random queries against the bank, with the backend an evaluation
    given ``SearchConfig(backend, dtype)`` would build on this device."""
    from evaluation.config import SearchConfig
    from evaluation.retrieval import make_search_backend
    from evaluation.search import faiss_has_gpu

    skip = faiss_skip(ctx.device, faiss_has_gpu()) if backend == "faiss" else None
    if skip:
        return {"skipped": skip, "result": f"skipped: {skip}"}
    s = ctx.sizes
    searcher = make_search_backend(SearchConfig(backend=backend, dtype=dtype), ctx.device)
    shards = search_bank(ctx)
    queries = torch.randn(s.queries, s.bank_dim, device=ctx.device,
                          generator=torch.Generator(device=ctx.device).manual_seed(1))
    searcher.search(queries[: max(1, s.queries // 16)], shards)  # warm-up: kernels, workspaces
    sync(ctx.device)
    start = time.perf_counter()
    _, idx = searcher.search(queries, shards)
    sync(ctx.device)
    seconds = time.perf_counter() - start
    per_s = s.queries / seconds
    kind = getattr(searcher, "dtype", torch.float32)
    name = (f"torch {str(kind).removeprefix('torch.')}" if searcher.name == "torch"
            else f"faiss flat ({'GPU' if getattr(searcher, 'use_gpu', False) else 'CPU'})")
    reference = ctx.cache.setdefault("search_reference", idx)
    agree = float((idx[:, 0] == reference[:, 0]).float().mean())
    flops = 2.0 * s.bank_patches * s.bank_dim  # per query: one dot product per bank patch
    precision = matmul_precision(kind) if searcher.name == "torch" else "fp32"
    return {"result": f"{per_s:,.0f} queries/s ({name}, {s.queries:,} queries, "
                      f"{s.bank_patches:,} x {s.bank_dim} fp16 bank)",
            **rate_fields(ctx.device, flops, per_s, precision),
            "memory_gib": peak_memory_gib(ctx.device),
            "metrics": {"queries_per_s": per_s, "seconds": seconds, "backend": name,
                        "queries": s.queries, "bank": [s.bank_patches, s.bank_dim],
                        "top1_agreement_with_first": agree, "host_peak_rss_gib": peak_rss_gib()}}
