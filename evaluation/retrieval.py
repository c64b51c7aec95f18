"""In-context evaluation of one encoder on one dataset's queries against one memory bank.

Queries are the whole validation images resized to (S, S). Blocks of ``query_block_images``
images go through the encoder; their patches are searched against the bank in one streaming pass
(so each block reads the bank once); labels are transferred, bilinearly upsampled to (S, S),
and scored against the ground truth resized the same way (nearest).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shared.devices import default_device
from shared.images import eval_geometry, to_tensor

from .bank import MemoryBank
from .config import SearchConfig
from .encode import encode_resized
from .search import make_searcher, transfer_from_shards
from .transfer import (
    MATCHINGS,
    ConfusionAccumulator,
    DepthAccumulator,
    iou_per_class,
    upsample_scores,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_search_backend(cfg: SearchConfig, device: torch.device):
    """The configured searcher (torch options for torch, IVF options for faiss_ivf)."""
    backend = cfg.backend
    if backend == "auto":
        backend = "torch" if device.type == "cuda" else "faiss"
    if backend == "torch":
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = "float16" if device.type == "cuda" else "float32"
        return make_searcher("torch", k=cfg.k, device=device, query_chunk=cfg.query_chunk,
                             dtype=DTYPES[dtype], rerank_margin=cfg.rerank_margin)
    if backend == "faiss_ivf":
        return make_searcher("faiss_ivf", k=cfg.k, nlist=cfg.nlist, nprobe=cfg.nprobe,
                             codec=cfg.codec, train_size=cfg.train_size)
    return make_searcher(backend, k=cfg.k)


def _shard_device(searcher, device: torch.device) -> torch.device:
    """Where bank shards should be cached: the GPU for torch search, host memory for faiss."""
    return device if searcher.name == "torch" else torch.device("cpu")


def encode_queries(backbone, dataset, indices: list[int], size: int, batch_size: int,
                   device: torch.device, threads: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features (B, h, w, D) float16 (L2-normalised) and targets (B, S, S) of ``indices``;
    images are decoded and resized in ``threads`` threads."""
    return encode_resized(backbone, dataset, indices, size, batch_size, device,
                          lambda dense: F.normalize(dense.float(), dim=-1).half().cpu(), threads)


def evaluate_incontext(
    backbone,
    identity: dict,
    bank: MemoryBank,
    dataset,
    cfg: SearchConfig,
    input_size: int,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """mIoU (segmentation) or RMSE (depth) of retrieval-based prediction on ``dataset``.

    The mIoU and per-class IoU use ``cfg.matching``; ``miou_by_matching`` holds both matchings'
    values of the same predictions, so either published convention can be read off one run.
    """
    bank.check_encoder(identity, input_size)
    device = default_device(device)
    searcher = make_search_backend(cfg, device)
    shard_device = _shard_device(searcher, device)
    segmentation = dataset.task == "segmentation"
    if segmentation and bank.num_values != dataset.num_classes:
        raise ValueError(f"memory bank {bank.uri} holds {bank.num_values}-class values but "
                         f"{dataset.name} has {dataset.num_classes} classes")
    acc = ConfusionAccumulator(dataset.num_classes, dataset.ignore_index) if segmentation \
        else DepthAccumulator()
    start = time.perf_counter()
    timing = {"encode": 0.0, "search": 0.0, "transfer": 0.0}
    n = len(dataset)
    for block in range(0, n, cfg.query_block_images):
        indices = list(range(block, min(n, block + cfg.query_block_images)))
        t0 = time.perf_counter()
        feats, targets = encode_queries(backbone, dataset, indices, input_size, batch_size, device)
        b, h, w, d = feats.shape
        t1 = time.perf_counter()
        sims, idx = searcher.search(feats.reshape(b * h * w, d), bank.feature_shards(shard_device))
        t2 = time.perf_counter()
        pred = transfer_from_shards(sims, idx, bank.value_shards(), bank.num_values,
                                    cfg.temperature).view(b, h, w, -1)  # (B, h, w, C)
        for s in range(0, b, batch_size):
            scores = upsample_scores(pred[s : s + batch_size], (input_size, input_size))
            target = targets[s : s + batch_size]
            if segmentation:
                acc.update(scores.argmax(dim=1), target)
            else:
                acc.update(scores[:, 0], target, target > 0)
        t3 = time.perf_counter()
        timing["encode"] += t1 - t0
        timing["search"] += t2 - t1
        timing["transfer"] += t3 - t2
    seconds = time.perf_counter() - start
    out = {"num_images": n, "bank_patches": bank.size, "seconds": round(seconds, 3),
           "timing": {k: round(v, 3) for k, v in timing.items()}}
    if segmentation:
        out["matching"] = cfg.matching
        out["miou"] = acc.miou(cfg.matching)
        out["miou_by_matching"] = {m: acc.miou(m) for m in MATCHINGS}
        out["iou_per_class"] = [None if v != v else v
                                for v in iou_per_class(acc.matrix, cfg.matching).tolist()]
    else:
        out["rmse"] = acc.rmse()
        pixels = acc.rmse_pixels()
        out["rmse_pixels"] = None if pixels != pixels else pixels
    log(f"{dataset.name}: {n} query images in {seconds:.1f}s "
        + (f"mIoU {out['miou']:.4f} ({cfg.matching} matching)" if segmentation
           else f"RMSE {out['rmse']:.4f}"))
    return out


def predict_segmentation(backbone, bank: MemoryBank, images: list, cfg: SearchConfig,
                         input_size: int, device=None) -> list:
    """Retrieved-label segmentations (S, S) int64 of raw images (H, W, 3) uint8 (for figures)."""
    device = default_device(device)
    batch = torch.stack([eval_geometry(to_tensor(img), None, input_size)[0] for img in images])
    with torch.inference_mode():
        dense = backbone.dense_features(batch.to(device)).float().cpu()  # (B, h, w, D)
    b, h, w, d = dense.shape
    searcher = make_search_backend(cfg, device)
    sims, idx = searcher.search(dense.reshape(-1, d),
                                bank.feature_shards(_shard_device(searcher, device)))
    pred = transfer_from_shards(sims, idx, bank.value_shards(), bank.num_values,
                                cfg.temperature).view(b, h, w, -1)
    scores = upsample_scores(pred, (input_size, input_size))  # (B, C, S, S)
    return list(scores.argmax(dim=1).numpy())
