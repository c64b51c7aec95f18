"""End to end: synthetic scenes in S3 (loopback), a tiny encoder, the memory bank built by the
Ray job and stored in S3, queries, and the result tables.

With the memory images equal to the query images, no augmentation and k = 1, every query patch
retrieves itself, so the pipeline's mIoU must equal the mIoU of predicting each pixel from its
own patch histogram (bilinearly upsampled): an exact check of bank, search, transfer and metric.
"""

from __future__ import annotations

import pytest
import torch

from evaluation.bank import BankError, MemoryBank, encoder_identity
from evaluation.benchmark import run_benchmark
from evaluation.config import EvalConfig
from evaluation.datasets import open_dataset
from evaluation.retrieval import evaluate_incontext
from evaluation.transfer import (
    ConfusionAccumulator,
    patch_histograms,
    upsample_scores,
)
from shared import storage
from shared.backbones import load_backbone
from shared.images import eval_geometry, to_tensor
from shared.synthetic import write_synthetic_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIZE = 42  # 3 x 3 patches of 14


def _own_patch_miou(dataset) -> float:
    acc = ConfusionAccumulator(dataset.num_classes, dataset.ignore_index)
    for i in range(len(dataset)):
        image, mask = dataset.load(i)
        _, labels = eval_geometry(to_tensor(image), torch.from_numpy(mask), SIZE)
        hist = patch_histograms(labels[None], dataset.num_classes, 14).half().float()
        acc.update(upsample_scores(hist, (SIZE, SIZE)).argmax(dim=1), labels[None])
    return acc.miou()


def test_synthetic_end_to_end_with_ray_and_s3(ray_local, s3_bucket, memory_equals_queries):
    data = storage.join(s3_bucket, "scenes")
    out = storage.join(s3_bucket, "eval")
    memory_equals_queries(data)
    cfg = EvalConfig(
        backbones=["vits14"], weights=["random"], tiny=True, datasets=["synthetic"],
        data_roots={"synthetic": data}, input_size=SIZE, out=out, device="cpu",
        memory={"size": 10_000, "epochs": 1, "jitter_p": 0.0, "crop_scale": (1.0, 1.0),
                "crop_ratio": (1.0, 1.0), "executor": "ray", "workers": 2,
                "images_per_shard": 2, "batch_size": 2},
        search={"k": 1, "backend": "torch", "query_block_images": 2},
        lowshot={"fractions": ["1"], "seeds": [42]},
    )
    rows = run_benchmark(cfg, log=lambda m: None)
    val = open_dataset("synthetic", data, "val")
    expected = _own_patch_miou(val)
    assert rows[0]["mean"] == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected < 1.0  # patch-level resolution loses some boundary pixels

    results = storage.read_json(storage.join(out, "results.json"))
    run = results["runs"][0]
    assert run["memory_images"] == 5 and run["dataset"] == "synthetic"
    assert "| vits14-tiny:random | synthetic | 1 |" in storage.read_text(
        storage.join(out, "results.md"))
    assert "executor: ray" in storage.read_text(storage.join(out, "config.yaml"))

    bank = MemoryBank(run["bank"])
    assert run["bank"].startswith("s3://")
    assert bank.size == 5 * 9 and len(bank.manifest["shards"]) == 3  # every patch, 3 shards

    # the faiss backend reads the same S3 bank and agrees
    faiss_cfg = cfg.search.model_copy(update={"backend": "faiss"})
    encoder = load_backbone("vits14", run["weights"], tiny=True, device="cpu")
    same = evaluate_incontext(encoder, encoder_identity(encoder), bank, val, faiss_cfg, SIZE,
                              log=lambda m: None)
    assert same["miou"] == pytest.approx(expected, abs=1e-12)

    # a bank built with one encoder is refused for another
    torch.manual_seed(123)
    stranger = load_backbone("vits14", None, tiny=True, device="cpu")
    with pytest.raises(BankError, match="another encoder"):
        evaluate_incontext(stranger, encoder_identity(stranger), bank, val, cfg.search, SIZE)


def test_ray_bank_equals_in_process_bank(ray_local, s3_bucket, tmp_path):
    from evaluation.config import MemoryConfig
    from evaluation.memory import BankSpec, DatasetRef, EncoderRef, build_memory_bank
    from shared.backbones import save_backbone

    data = write_synthetic_dataset(storage.join(s3_bucket, "d"), num_train=5, num_val=1,
                                   size=(40, 40))
    torch.manual_seed(0)
    backbone = load_backbone("vits14", None, tiny=True, device="cpu")
    weights = storage.join(s3_bucket, "enc.safetensors")
    save_backbone(backbone, weights)
    banks = []
    for executor, uri in (("ray", storage.join(s3_bucket, "bank")), ("local", str(tmp_path))):
        cfg = MemoryConfig(size=60, executor=executor, workers=2, images_per_shard=2,
                           loader_threads=2)
        spec = BankSpec(EncoderRef("vits14", weights, True), encoder_identity(backbone),
                        DatasetRef("synthetic", data, "train"), (4, 0, 2, 1), SIZE,
                        cfg.model_dump(mode="json"), 11, "segmentation", 6)
        banks.append(build_memory_bank(spec, uri, cfg, log=lambda m: None).load_all())
    (fr, vr), (fl, vl) = banks
    assert fr.shape[0] > 0 and torch.equal(vr, vl)
    torch.testing.assert_close(fr.float(), fl.float(), atol=2e-3, rtol=0)
