"""Linear probe: learns a linearly separable patch code exactly, fails on noise, runs end to end."""

from __future__ import annotations

import torch

from evaluation.datasets import open_dataset
from evaluation.linear import (
    evaluate_linear_probe,
    linear_head,
    run_linear_probe,
    train_linear_probe,
)
from shared.backbones import load_backbone
from shared.synthetic import write_synthetic_dataset


def _images_of_one_class(n=16, classes=4, dim=16, seed=0, informative=True):
    gen = torch.Generator().manual_seed(seed)
    cls = torch.arange(n) % classes
    feats = torch.randn(n, 3, 3, dim, generator=gen) * 0.1
    if informative:
        feats[..., :classes] += 3.0 * torch.nn.functional.one_hot(cls, classes)[:, None, None]
    labels = cls[:, None, None].expand(n, 12, 12).to(torch.uint8).clone()
    labels[:, 0, 0] = 255  # an ignored pixel
    return feats.half(), labels


def test_probe_learns_a_linear_code():
    feats, labels = _images_of_one_class()
    head = train_linear_probe(feats, labels, 4, epochs=15, lr=1e-1, batch_size=8, device="cpu")
    assert evaluate_linear_probe(head, feats, labels, 4) == 1.0
    assert isinstance(head, torch.nn.Conv2d) and head.kernel_size == (1, 1)


def test_probe_on_uninformative_features_is_poor():
    feats, labels = _images_of_one_class(informative=False)
    test_feats, test_labels = _images_of_one_class(seed=1, informative=False)
    head = train_linear_probe(feats, labels, 4, epochs=15, lr=1e-1, batch_size=8, device="cpu")
    assert evaluate_linear_probe(head, test_feats, test_labels, 4) < 0.6


def test_head_shape():
    head = linear_head(32, 5)
    assert head(torch.zeros(2, 32, 3, 4)).shape == (2, 5, 3, 4)


def test_run_linear_probe_on_synthetic_scenes(tmp_path):
    root = write_synthetic_dataset(str(tmp_path / "d"), num_train=4, num_val=2, size=(32, 32))
    torch.manual_seed(0)
    backbone = load_backbone("vits14", None, tiny=True, device="cpu")
    train, val = open_dataset("synthetic", root, "train"), open_dataset("synthetic", root, "val")
    out = run_linear_probe(backbone, train, val, 28, epochs=2, device="cpu")
    assert 0.0 <= out["miou"] <= 1.0 and out["train_images"] == 4
