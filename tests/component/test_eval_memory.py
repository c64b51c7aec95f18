"""Memory-bank builder (in-process executor): deterministic, resumable, and tied to its encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.bank import BankError, MemoryBank, encoder_identity, shard_uris
from evaluation.config import MemoryConfig
from evaluation.memory import BankSpec, DatasetRef, EncoderRef, build_memory_bank
from shared import storage
from shared.backbones import load_backbone, save_backbone
from shared.synthetic import write_synthetic_dataset

SIZE = 28  # a 2x2 patch grid for the tiny /14 backbone


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    data = write_synthetic_dataset(str(root / "data"), num_train=6, num_val=2, size=(32, 32))
    torch.manual_seed(0)
    backbone = load_backbone("vits14", None, tiny=True, device="cpu")
    weights = str(root / "enc.safetensors")
    save_backbone(backbone, weights)
    return root, data, backbone, weights


def _spec(data, backbone, weights, indices=(0, 1, 2, 3, 4), seed=7, size=200):
    cfg = MemoryConfig(size=size, executor="local", images_per_shard=2, batch_size=3)
    spec = BankSpec(EncoderRef("vits14", weights, True), encoder_identity(backbone),
                    DatasetRef("synthetic", data, "train"), tuple(indices), SIZE,
                    cfg.model_dump(mode="json"), seed, "segmentation", 6)
    return spec, cfg


def test_bank_is_deterministic_and_well_formed(setup):
    root, data, backbone, weights = setup
    spec, cfg = _spec(data, backbone, weights)
    a = build_memory_bank(spec, str(root / "a"), cfg, log=lambda m: None)
    b = build_memory_bank(spec, str(root / "b"), cfg, log=lambda m: None)
    fa, va = a.load_all()
    fb, vb = b.load_all()
    assert torch.equal(fa, fb) and torch.equal(va, vb)
    assert fa.dtype == torch.float16 and fa.shape[1] == 32 and va.shape[1] == 6
    assert a.size == fa.shape[0] == sum(s["count"] for s in a.manifest["shards"])
    assert len(a.manifest["shards"]) == 3  # 5 images, 2 per shard
    torch.testing.assert_close(fa.float().norm(dim=1), torch.ones(len(fa)), atol=2e-3, rtol=0)
    torch.testing.assert_close(va.float().sum(dim=1), torch.ones(len(va)), atol=2e-3, rtol=0)
    # patches_per_image = 200 // (5 x 2) = 20 > 4 patches: every eligible patch is kept
    assert a.manifest["patches_per_image"] == 20 and a.size <= 5 * 2 * 4
    # another seed gives other augmentations
    other, _ = _spec(data, backbone, weights, seed=8)
    fc = build_memory_bank(other, str(root / "c"), cfg, log=lambda m: None).load_all()[0]
    assert fc.shape != fa.shape or not torch.equal(fc, fa)


def test_rerun_skips_finished_shards_and_rebuilds_missing_ones(setup):
    root, data, backbone, weights = setup
    spec, cfg = _spec(data, backbone, weights)
    uri = str(root / "resume")
    first = build_memory_bank(spec, uri, cfg, log=lambda m: None)
    reference = first.load_all()
    storage.remove(storage.join(uri, "bank.json"))
    storage.remove(shard_uris(uri, 1)["marker"])
    logs = []
    again = build_memory_bank(spec, uri, cfg, log=logs.append)
    assert "1 shards built" in logs[0]
    assert all(torch.equal(x, y) for x, y in zip(again.load_all(), reference, strict=True))


def test_bank_refuses_another_encoder(setup):
    root, data, backbone, weights = setup
    spec, cfg = _spec(data, backbone, weights)
    bank = build_memory_bank(spec, str(root / "a"), cfg, log=lambda m: None)
    torch.manual_seed(1)
    other = load_backbone("vits14", None, tiny=True, device="cpu")
    with pytest.raises(BankError, match="another encoder.*weights_sha256"):
        bank.check_encoder(encoder_identity(other), SIZE)
    with pytest.raises(BankError, match="input size"):
        bank.check_encoder(encoder_identity(backbone), 56)
    bank.check_encoder(encoder_identity(backbone), SIZE)  # the right one passes
    # a different bank at the same URI is refused, not silently mixed
    spec2, _ = _spec(data, backbone, weights, indices=(0, 1))
    with pytest.raises(BankError, match="already holds a different memory bank"):
        build_memory_bank(spec2, str(root / "a"), cfg, log=lambda m: None)


def test_worker_refuses_weights_that_do_not_match_the_identity(setup):
    root, data, backbone, weights = setup
    torch.manual_seed(2)
    other = load_backbone("vits14", None, tiny=True, device="cpu")
    spec, cfg = _spec(data, other, weights)  # identity of `other`, file of `backbone`
    with pytest.raises(BankError, match="another encoder"):
        build_memory_bank(spec, str(root / "bad"), cfg, log=lambda m: None)


def test_incomplete_bank_is_named(tmp_path):
    with pytest.raises(BankError, match="bank.json is missing"):
        MemoryBank(str(tmp_path / "nothing"))


def test_random_encoder_without_file_is_refused_for_ray(setup):
    root, data, backbone, _ = setup
    spec, _ = _spec(data, backbone, None)
    with pytest.raises(ValueError, match="save it"):
        build_memory_bank(spec, str(root / "x"), MemoryConfig(executor="ray"))


def test_shards_are_fp16_npy(setup):
    root, data, backbone, weights = setup
    spec, cfg = _spec(data, backbone, weights)
    bank = build_memory_bank(spec, str(root / "a"), cfg, log=lambda m: None)
    arr = np.load(shard_uris(bank.uri, 0)["features"])
    assert arr.dtype == np.float16


def test_shard_content_does_not_depend_on_loader_threads(setup):
    from evaluation.memory import build_shard

    _, data, backbone, weights = setup
    spec, _ = _spec(data, backbone, weights)
    dataset = spec.dataset.open()
    one = build_shard(spec, [0, 3, 4], backbone, dataset, torch.device("cpu"), threads=1)
    three = build_shard(spec, [0, 3, 4], backbone, dataset, torch.device("cpu"), threads=3)
    assert all(np.array_equal(a, b) for a, b in zip(one, three, strict=True))


def test_a_shard_finished_under_another_fingerprint_is_rebuilt(setup):
    root, data, backbone, weights = setup
    spec, cfg = _spec(data, backbone, weights)
    uri = str(root / "foreign")
    reference = build_memory_bank(spec, uri, cfg, log=lambda m: None).load_all()
    storage.remove(storage.join(uri, "bank.json"))
    # shard 1 as another bank left it: its own marker and fingerprint, other features
    shard = shard_uris(uri, 1)
    marker = storage.read_json(shard["marker"])
    assert marker["fingerprint"] == spec.fingerprint()
    storage.write_json(shard["marker"], {**marker, "fingerprint": {**marker["fingerprint"],
                                                                   "seed": spec.seed + 1}})
    stale = np.load(shard["features"])
    np.save(shard["features"], np.zeros_like(stale), allow_pickle=False)
    logs = []
    again = build_memory_bank(spec, uri, cfg, log=logs.append)
    assert "1 shards built" in logs[0]
    assert storage.read_json(shard["marker"])["fingerprint"] == spec.fingerprint()
    assert all(torch.equal(x, y) for x, y in zip(again.load_all(), reference, strict=True))
