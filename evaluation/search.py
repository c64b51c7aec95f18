"""Cosine top-k search of query patches against a memory bank stored as shards.

Every backend streams over the bank: a shard is searched, its top-k merged into a running top-k,
and the shard dropped, so the bank never has to fit on one device at once. Backends:

- ``torch``: exact; chunked matmul + topk on the GPU when present, else the CPU.
- ``faiss``: exact; a flat inner-product index per shard (GPU index when faiss has GPU support).
- ``faiss_ivf``: approximate; an inverted-file index trained on a sample of the bank and filled
  shard by shard (``codec`` "Flat", "SQ8" or "PQ<m>" trades memory for accuracy), for banks
  larger than memory.

A shard source is an iterable of ``(offset, features)``: ``features`` (n, D), rows are bank
patches ``offset .. offset + n - 1``. Indices returned are global bank indices; -1 marks a slot
an approximate search could not fill (its similarity is -inf).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from shared.devices import default_device
from shared.soft_transfer import transfer_weights

Shards = Iterable[tuple[int, torch.Tensor]]
BACKENDS = ("torch", "faiss", "faiss_ivf")


def merge_topk(
    sims_a: torch.Tensor, idx_a: torch.Tensor, sims_b: torch.Tensor, idx_b: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of two candidate lists per query: (Nq, ka) + (Nq, kb) -> (Nq, min(k, ka+kb))."""
    sims = torch.cat([sims_a, sims_b], dim=1)  # (Nq, ka + kb)
    idx = torch.cat([idx_a, idx_b], dim=1)
    top, pos = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    return top, torch.gather(idx, 1, pos)


def _empty(nq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(nq, 0, device=device), torch.empty(nq, 0, dtype=torch.long, device=device))


def _finish(sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to k slots with (-inf, -1) when the bank holds fewer than k patches; move to CPU."""
    if sims.shape[1] < k:
        pad = k - sims.shape[1]
        sims = torch.cat([sims, sims.new_full((sims.shape[0], pad), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), -1)], dim=1)
    return sims.float().cpu(), idx.cpu()


def _check_queries(queries: torch.Tensor) -> None:
    if queries.ndim != 2:
        raise ValueError(f"queries must be (Nq, D), got {tuple(queries.shape)}")


class TorchSearch:
    """Exact cosine top-k with torch: for each shard, (query chunk x shard) matmul then topk.

    ``dtype`` float16/bfloat16 runs the big matmul in low precision (tensor cores) to pick
    k + ``rerank_margin`` candidates per query, then re-scores those candidates in float32 and
    keeps the best k: exact unless a true neighbour ranks below k + margin in low precision.
    """

    name = "torch"

    def __init__(self, k: int = 30, device: str | torch.device | None = None,
                 query_chunk: int = 8192, dtype: torch.dtype = torch.float32,
                 max_block_elements: int = 1 << 26, rerank_margin: int = 32):
        self.k = k
        self.device = default_device(device)
        self.query_chunk = query_chunk
        self.dtype = dtype
        self.max_block_elements = max_block_elements  # bounds the (chunk x shard) score block
        self.rerank_margin = rerank_margin

    def _chunk_topk(self, q: torch.Tensor, b32: torch.Tensor, b_low: torch.Tensor | None,
                    kk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-kk of one query chunk q (c, D) float32 against one shard (n, D)."""
        if b_low is None:
            return torch.topk(q @ b32.T, kk, dim=1)  # (c, D) x (D, n) -> (c, n) -> (c, kk)
        s = (q.to(b_low.dtype) @ b_low.T).float()  # (c, n) low-precision scores
        _, cand = torch.topk(s, min(b32.shape[0], kk + self.rerank_margin), dim=1)  # (c, m)
        exact = torch.einsum("cd,cmd->cm", q, b32[cand])  # float32 re-scoring, (c, m)
        top, pos = torch.topk(exact, kk, dim=1)
        return top, torch.gather(cand, 1, pos)

    def search(self, queries: torch.Tensor, shards: Shards) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k similarities (Nq, k) float32 and global bank indices (Nq, k) int64."""
        _check_queries(queries)
        q = F.normalize(queries.to(self.device, torch.float32), dim=-1)  # (Nq, D)
        low = self.dtype != torch.float32
        sims, idx = _empty(q.shape[0], self.device)
        if q.shape[0] == 0:
            return _finish(sims, idx, self.k)
        for offset, feats in shards:
            b32 = F.normalize(feats.to(self.device, torch.float32), dim=-1)  # (n, D)
            b_low = b32.to(self.dtype) if low else None
            kk = min(self.k, b32.shape[0])
            n, d = b32.shape
            per_row = n + (kk + self.rerank_margin) * d if low else n  # scores (+ candidates)
            chunk = max(1, min(self.query_chunk, self.max_block_elements // max(1, per_row)))
            parts_s, parts_i = [], []
            for start in range(0, q.shape[0], chunk):
                top, pos = self._chunk_topk(q[start : start + chunk], b32, b_low, kk)
                parts_s.append(top)
                parts_i.append(pos + offset)
            sims, idx = merge_topk(sims, idx, torch.cat(parts_s), torch.cat(parts_i), self.k)
        return _finish(sims, idx, self.k)


def faiss_has_gpu() -> bool:
    """Whether the installed faiss has GPU support and a GPU is visible."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """Rows L2-normalised, float32, contiguous: what faiss inner-product indices take."""
    return np.ascontiguousarray(F.normalize(x.detach().float().cpu(), dim=-1).numpy())


class FaissSearch:
    """Exact cosine top-k with a faiss flat inner-product index per shard (GPU when available)."""

    name = "faiss"

    def __init__(self, k: int = 30, use_gpu: bool | None = None):
        self.k = k
        self.use_gpu = faiss_has_gpu() if use_gpu is None else use_gpu
        self._resources = None

    def _index(self, dim: int):
        import faiss

        if not self.use_gpu:
            return faiss.IndexFlatIP(dim)
        if self._resources is None:
            self._resources = faiss.StandardGpuResources()
        return faiss.GpuIndexFlatIP(self._resources, dim)

    def search(self, queries: torch.Tensor, shards: Shards) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k similarities (Nq, k) float32 and global bank indices (Nq, k) int64."""
        _check_queries(queries)
        q = _as_numpy(queries)
        sims, idx = _empty(q.shape[0], "cpu")
        for offset, feats in shards:
            index = self._index(q.shape[1])
            index.add(_as_numpy(feats))
            kk = min(self.k, int(index.ntotal))
            s, i = index.search(q, kk)  # (Nq, kk) each
            sims, idx = merge_topk(sims, idx, torch.from_numpy(s),
                                   torch.from_numpy(i).long() + offset, self.k)
        return _finish(sims, idx, self.k)


def _in_order(shards: Shards):
    """Yield (offset, features) of ``shards``, refusing any shard out of bank order."""
    expected = 0
    for offset, feats in shards:
        if offset != expected:
            raise ValueError(f"bank shards must come in order: got offset {offset}, "
                             f"expected {expected}")
        expected += feats.shape[0]
        yield offset, feats


class FaissIVFSearch:
    """Approximate cosine top-k: faiss IVF index over the whole bank, built once, then reused."""

    name = "faiss_ivf"

    def __init__(self, k: int = 30, nlist: int = 4096, nprobe: int = 32, codec: str = "Flat",
                 train_size: int = 262_144, use_gpu: bool | None = None, seed: int = 0):
        self.k, self.nlist, self.nprobe, self.codec = k, nlist, nprobe, codec
        self.train_size, self.seed = train_size, seed
        self.use_gpu = faiss_has_gpu() if use_gpu is None else use_gpu
        self.index = None
        self._resources = None  # GPU resources must outlive the index that uses them

    def build(self, shards: Shards) -> None:
        """Train the coarse quantiser (and codec) on the first ``train_size`` patches, add all."""
        import faiss

        shards = _in_order(shards)
        train, pending = [], []
        for _, feats in shards:
            pending.append(_as_numpy(feats))
            train.append(pending[-1])
            if sum(t.shape[0] for t in train) >= self.train_size:
                break
        sample = np.concatenate(train)[: self.train_size]
        nlist = max(1, min(self.nlist, sample.shape[0] // 39))  # faiss wants ~39 points per list
        index = faiss.index_factory(sample.shape[1], f"IVF{nlist},{self.codec}",
                                    faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.seed = self.seed
        if self.use_gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        index.train(sample)
        for block in pending:
            index.add(block)
        for _, feats in shards:  # the same generator: the rest of the bank, still checked
            index.add(_as_numpy(feats))
        faiss.extract_index_ivf(index).nprobe = self.nprobe
        self.index = index

    def search(self, queries: torch.Tensor, shards: Shards | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate top-k; builds the index from ``shards`` on the first call."""
        _check_queries(queries)
        if self.index is None:
            if shards is None:
                raise ValueError("FaissIVFSearch: no index yet; pass the bank shards to build it")
            self.build(shards)
        kk = min(self.k, int(self.index.ntotal))
        s, i = self.index.search(_as_numpy(queries), kk)
        sims, idx = torch.from_numpy(s), torch.from_numpy(i).long()
        sims = torch.where(idx < 0, torch.full_like(sims, float("-inf")), sims)
        return _finish(sims, idx, self.k)


def make_searcher(backend: str, k: int = 30, device: str | None = None, **options):
    """A searcher by name: "torch", "faiss" or "faiss_ivf" (options go to its constructor)."""
    if backend == "torch":
        return TorchSearch(k=k, device=device, **options)
    if backend == "faiss":
        return FaissSearch(k=k, **options)
    if backend == "faiss_ivf":
        return FaissIVFSearch(k=k, **options)
    raise ValueError(f"unknown search backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def gather_values(idx: torch.Tensor, value_shards: Shards, num_values: int) -> torch.Tensor:
    """Bank values of the neighbours, streaming over value shards: idx (Nq, k) -> (Nq, k, C).

    Slots with index -1 get zeros.
    """
    out = torch.zeros(*idx.shape, num_values, dtype=torch.float32)
    flat = idx.reshape(-1)
    out_flat = out.view(-1, num_values)
    for offset, values in value_shards:
        values = values if values.ndim == 2 else values[:, None]
        hit = (flat >= offset) & (flat < offset + values.shape[0])
        rows = hit.nonzero(as_tuple=True)[0]
        if rows.numel():
            out_flat[rows] = values[flat[rows] - offset].float().cpu()
    return out


def transfer_from_shards(sims: torch.Tensor, idx: torch.Tensor, value_shards: Shards,
                         num_values: int, temperature: float) -> torch.Tensor:
    """y_i = sum_k softmax_k(s_ik / T) v_{idx_ik}, streaming over value shards -> (Nq, C).

    The weights are :func:`shared.soft_transfer.transfer_weights`; the same result as
    ``weighted_values(sims, gather_values(idx, ...), T)`` without materialising the (Nq, k, C)
    neighbour values. Slots with index -1 add nothing.
    """
    weights = transfer_weights(sims, temperature).float().reshape(-1)  # (Nq * k,)
    flat = idx.reshape(-1)
    rows_of = torch.arange(idx.shape[0]).repeat_interleave(idx.shape[1])  # query of each slot
    out = torch.zeros(idx.shape[0], num_values, dtype=torch.float32)
    for offset, values in value_shards:
        values = values if values.ndim == 2 else values[:, None]
        hit = ((flat >= offset) & (flat < offset + values.shape[0])).nonzero(as_tuple=True)[0]
        if hit.numel():
            picked = values[flat[hit] - offset].float().cpu()  # (hits, C)
            out.index_add_(0, rows_of[hit], weights[hit, None] * picked)
    return out
