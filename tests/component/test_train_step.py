"""The lean step's plumbing: narrow label dtypes checked on the host, the move to the device,
TF32 and fused AdamW on CUDA, peak memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.loop import make_optimizer
from training.model import (
    batch_to_device,
    check_label_values,
    fast_matmul,
    label_dtype,
    peak_memory_bytes,
)


@pytest.mark.parametrize(("classes", "ignore", "dtype"), [
    (256, None, torch.uint8), (255, 255, torch.uint8), (256, 255, torch.uint8),
    (1000, None, torch.int16), (200, 300, torch.int16), (150, -1, torch.int16),
    (40000, None, torch.int32), (1000, 65535, torch.int32),
])
def test_label_dtype_is_the_smallest_that_holds_classes_and_ignore_index(classes, ignore, dtype):
    assert label_dtype(classes, ignore) == dtype


def test_label_check_names_the_bad_value():
    check_label_values(torch.tensor([0, 4, 255]), 5, 255)
    with pytest.raises(ValueError, match="batch query_labels hold 5"):
        check_label_values(torch.tensor([0, 5]), 5, 255, name="batch query_labels")
    with pytest.raises(ValueError, match="hold -1"):
        check_label_values(torch.tensor([-1, 0]), 5, None)


def test_batch_to_device_narrows_labels_and_keeps_the_rest():
    labels = torch.tensor([[[0, 999], [3, 7]]])  # int64, as the loader collates them
    batch = {"query": torch.zeros(1, 3, 2, 2, dtype=torch.uint8), "query_labels": labels,
             "positive_labels": labels.to(torch.int32), "support": torch.tensor([[0]])}
    moved = batch_to_device(batch, torch.device("cpu"), 1000)
    assert moved["query_labels"].dtype == moved["positive_labels"].dtype == torch.int16
    assert torch.equal(moved["query_labels"].long(), labels)
    assert moved["query"].dtype == torch.uint8 and moved["support"].dtype == torch.long
    packed = batch_to_device({"query_labels": torch.from_numpy(labels.numpy().astype("uint16"))},
                             torch.device("cpu"), 1000)  # packed label maps are uint16
    assert packed["query_labels"].dtype == torch.int16
    assert torch.equal(packed["query_labels"].long(), labels)
    with pytest.raises(ValueError, match="batch query_labels hold 999"):
        batch_to_device(batch, torch.device("cpu"), 256)  # would wrap around in uint8


def test_fast_matmul_is_a_no_op_on_cpu_and_peak_memory_is_positive():
    before = torch.backends.cuda.matmul.allow_tf32
    with fast_matmul(torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32 == before
    assert peak_memory_bytes(torch.device("cpu")) > 50 * 2**20  # torch alone is larger


def test_optimizer_on_cpu_is_not_fused():
    optimizer, _ = make_optimizer(nn.Linear(2, 2), TrainConfig(), 4)
    assert not optimizer.defaults.get("fused")


@pytest.mark.gpu
def test_cuda_gets_fused_adamw_tf32_and_its_own_peak_memory():
    device = torch.device("cuda")
    optimizer, _ = make_optimizer(nn.Linear(2, 2).to(device), TrainConfig(), 4)
    assert optimizer.defaults["fused"] is True
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with fast_matmul(device):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    torch.cuda.reset_peak_memory_stats(device)
    block = torch.empty(2**26, dtype=torch.uint8, device=device)
    assert peak_memory_bytes(device) >= block.numel()
    moved = batch_to_device({"query_labels": torch.ones(1, 2, 2, dtype=torch.long)}, device, 10)
    assert moved["query_labels"].dtype == torch.uint8 and moved["query_labels"].is_cuda
