"""Search backends: exact backends agree with brute force and with each other; IVF is close."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evaluation.search import (
    FaissIVFSearch,
    FaissSearch,
    TorchSearch,
    gather_values,
    make_searcher,
    merge_topk,
)


def _shards(bank: torch.Tensor, size: int):
    return [(o, bank[o : o + size].half()) for o in range(0, bank.shape[0], size)]


def _brute(query, bank, k):
    cos = F.normalize(query.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    return torch.topk(cos, k, dim=1)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(3)
    # fp16-representable bank so every backend sees exactly the same vectors
    bank = torch.randn(1000, 24, generator=gen).half().float()
    query = torch.randn(80, 24, generator=gen)
    return query, bank


@pytest.mark.parametrize("shard", [1000, 333, 61])
def test_torch_and_faiss_give_the_same_neighbours(data, shard):
    query, bank = data
    s_ref, i_ref = _brute(query, bank, 10)
    s_t, i_t = TorchSearch(k=10, device="cpu", query_chunk=17).search(query, _shards(bank, shard))
    s_f, i_f = FaissSearch(k=10, use_gpu=False).search(query, _shards(bank, shard))
    assert torch.equal(i_t, i_ref)
    assert torch.equal(i_f, i_ref)
    torch.testing.assert_close(s_t, s_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_f, s_ref, atol=1e-5, rtol=0)


def test_fewer_patches_than_k_pads_with_minus_one(data):
    query, bank = data
    sims, idx = TorchSearch(k=5, device="cpu").search(query[:3], _shards(bank[:3], 2))
    assert (idx[:, 3:] == -1).all() and torch.isinf(sims[:, 3:]).all()
    assert sorted(idx[0, :3].tolist()) == [0, 1, 2]


def test_merge_topk_keeps_the_largest():
    s, i = merge_topk(torch.tensor([[0.9, 0.1]]), torch.tensor([[4, 5]]),
                      torch.tensor([[0.5, 0.3]]), torch.tensor([[8, 9]]), 3)
    assert s[0].tolist() == pytest.approx([0.9, 0.5, 0.3])
    assert i.tolist() == [[4, 8, 9]]


def test_ivf_with_all_lists_probed_is_exact(data):
    query, bank = data
    _, i_ref = _brute(query, bank, 5)
    ivf = FaissIVFSearch(k=5, nlist=8, nprobe=8, train_size=1000, use_gpu=False)
    _, idx = ivf.search(query, _shards(bank, 128))
    assert torch.equal(idx, i_ref)
    # a narrow probe is approximate but mostly right
    ivf_narrow = FaissIVFSearch(k=5, nlist=8, nprobe=2, train_size=1000, use_gpu=False)
    _, idx2 = ivf_narrow.search(query, _shards(bank, 128))
    recall = (idx2[:, :1] == i_ref[:, :1]).float().mean().item()
    assert recall > 0.5


def test_ivf_rejects_out_of_order_shards(data):
    _, bank = data
    shards = _shards(bank, 100)[::-1]
    with pytest.raises(ValueError, match="in order"):
        FaissIVFSearch(k=3, nlist=2, train_size=50, use_gpu=False).build(shards)
    # a gap after the training sample is caught while the rest of the bank is added
    gap = [s for i, s in enumerate(_shards(bank, 100)) if i != 2]
    with pytest.raises(ValueError, match="in order"):
        FaissIVFSearch(k=3, nlist=2, train_size=50, use_gpu=False).build(gap)


def test_gather_values_across_shards():
    values = torch.arange(20, dtype=torch.float32).view(10, 2)
    idx = torch.tensor([[9, 0], [4, -1]])
    out = gather_values(idx, [(0, values[:4]), (4, values[4:7]), (7, values[7:])], 2)
    assert out.tolist() == [[[18, 19], [0, 1]], [[8, 9], [0, 0]]]


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="faiss_ivf"):
        make_searcher("annoy")


def test_streamed_transfer_equals_gather_then_weight(data):
    from evaluation.search import transfer_from_shards
    from evaluation.transfer import label_transfer, weighted_values

    query, bank = data
    values = torch.rand(bank.shape[0], 6, generator=torch.Generator().manual_seed(4))
    sims, idx = TorchSearch(k=9, device="cpu").search(query, _shards(bank, 150))
    value_shards = [(o, values[o : o + 150]) for o in range(0, bank.shape[0], 150)]
    streamed = transfer_from_shards(sims, idx, value_shards, 6, 0.07)
    direct = weighted_values(sims, gather_values(idx, value_shards, 6), 0.07)
    torch.testing.assert_close(streamed, direct)
    torch.testing.assert_close(streamed, label_transfer(query, bank, values, k=9))


@pytest.mark.gpu
def test_gpu_backends_match_the_cpu(data):
    query, bank = data
    _, i_ref = _brute(query, bank, 10)
    _, i_gpu = TorchSearch(k=10, device="cuda").search(query, _shards(bank, 300))
    assert torch.equal(i_gpu, i_ref)
    shards_on_gpu = [(o, s.cuda()) for o, s in _shards(bank, 300)]
    _, i_gpu2 = TorchSearch(k=10, device="cuda").search(query, shards_on_gpu)
    assert torch.equal(i_gpu2, i_ref)
    _, i_faiss = FaissSearch(k=10).search(query, _shards(bank, 300))  # GPU index when available
    assert torch.equal(i_faiss, i_ref)


def test_low_precision_search_with_reranking_is_exact():
    gen = torch.Generator().manual_seed(9)
    query = torch.randn(6, 64, generator=gen)
    # 40 near-duplicates of each query (closer than bfloat16 can tell apart) among random patches
    near = query[:, None] + 0.05 * torch.randn(6, 40, 64, generator=gen)
    bank = torch.cat([near.reshape(-1, 64), torch.randn(500, 64, generator=gen)]).half().float()
    s_ref, i_ref = _brute(query, bank, 10)
    s, i = TorchSearch(k=10, device="cpu", dtype=torch.bfloat16, rerank_margin=40).search(
        query, _shards(bank, 128))
    # the same neighbours (near-duplicates within 1e-7 may swap places: float32 summation order)
    assert torch.equal(i.sort(dim=1).values, i_ref.sort(dim=1).values)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=0)  # float32 scores after re-scoring
    # without the margin, bfloat16 picks the wrong near-duplicates
    _, i_raw = TorchSearch(k=10, device="cpu", dtype=torch.bfloat16, rerank_margin=0).search(
        query, _shards(bank, 128))
    assert not torch.equal(i_raw.sort(dim=1).values, i_ref.sort(dim=1).values)


def test_no_queries_and_empty_shards(data):
    _, bank = data
    sims, idx = TorchSearch(k=4, device="cpu").search(torch.zeros(0, 24), _shards(bank, 100))
    assert sims.shape == (0, 4) and idx.shape == (0, 4)
    sims, idx = FaissSearch(k=4, use_gpu=False).search(torch.ones(2, 24), [])
    assert (idx == -1).all() and torch.isinf(sims).all()
