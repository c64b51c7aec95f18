"""The search's k reaches the benchmark's result: the whole evaluation path (config, bank, search,
transfer, metric) run with k=1 and k=30, each checked against the same prediction recomputed
here from the bank's stored features and values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation.bank import MemoryBank
from evaluation.benchmark import run_benchmark
from evaluation.config import EvalConfig
from evaluation.datasets import open_dataset
from shared import storage
from shared.backbones import load_backbone
from shared.images import eval_geometry, to_tensor

SIZE = 42  # 3 x 3 patches of 14
TEMPERATURE = 0.07


def _benchmark(data: str, out: str, k: int) -> dict:
    cfg = EvalConfig(
        backbones=["vits14"], weights=["random"], tiny=True, datasets=["synthetic"],
        data_roots={"synthetic": data}, input_size=SIZE, out=out, device="cpu",
        memory={"size": 10_000, "epochs": 1, "jitter_p": 0.0, "crop_scale": (1.0, 1.0),
                "crop_ratio": (1.0, 1.0), "executor": "local", "images_per_shard": 4},
        search={"k": k, "backend": "torch", "temperature": TEMPERATURE},
        lowshot={"fractions": ["1"], "seeds": [42]},
    )
    run_benchmark(cfg, log=lambda m: None)
    return storage.read_json(storage.join(out, "results.json"))["runs"][0]


def _recomputed_miou(run: dict, data: str, k: int) -> float:
    """top-k cosine over the stored bank, softmax(s / T), bilinear upsampling, argmax, mIoU."""
    bank_feats, bank_values = MemoryBank(run["bank"]).load_all()
    bank_feats = F.normalize(bank_feats.float(), dim=-1)  # (Nb, D)
    encoder = load_backbone("vits14", run["weights"], tiny=True, device="cpu")
    val = open_dataset("synthetic", data, "val")
    conf = np.zeros((val.num_classes, val.num_classes), np.int64)
    for i in range(len(val)):
        image, mask = val.load(i)
        x, target = eval_geometry(to_tensor(image), torch.from_numpy(mask), SIZE)
        with torch.no_grad():
            dense = encoder.dense_features(x[None])[0]  # (3, 3, D)
        query = F.normalize(dense.float(), dim=-1).half().float().reshape(9, -1)  # as stored
        sims, idx = torch.topk(query @ bank_feats.T, k, dim=1)  # (9, k)
        weights = torch.softmax(sims / TEMPERATURE, dim=1)
        pred = (weights[:, :, None] * bank_values.float()[idx]).sum(1)  # (9, C)
        scores = F.interpolate(pred.T.reshape(1, -1, 3, 3), size=(SIZE, SIZE), mode="bilinear",
                               align_corners=False)[0]
        label, truth = scores.argmax(0).reshape(-1).numpy(), target.reshape(-1).numpy()
        keep = truth != val.ignore_index
        np.add.at(conf, (truth[keep], label[keep]), 1)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_k_changes_the_benchmark_result_as_recomputed(tmp_path, memory_equals_queries):
    data = memory_equals_queries(str(tmp_path / "data"))
    results = {}
    for k in (1, 30):
        run = _benchmark(data, str(tmp_path / f"out-k{k}"), k)
        assert MemoryBank(run["bank"]).size == 5 * 9  # every patch: k = 30 reaches far
        results[k] = (run["value"], _recomputed_miou(run, data, k))
    for k, (value, expected) in results.items():
        assert value == pytest.approx(expected, abs=1e-9), k
    # one neighbour and thirty give clearly different predictions on this bank
    assert results[1][0] - results[30][0] > 0.1
