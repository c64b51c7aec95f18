"""Linear probe: learns a linearly separable patch code exactly, fails on noise, runs end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evaluation.datasets import open_dataset
from evaluation.linear import (
    evaluate_linear_probe,
    extract_features,
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
    assert out["train_images"] == 4 and out["val_images"] == 2
    # the same probe by hand: features at 28 px, the head trained on train, scored on val
    feats, labels = extract_features(backbone, train, range(4), 28, device="cpu")
    head = train_linear_probe(feats, labels, train.num_classes, train.ignore_index, epochs=2,
                              device="cpu")
    val_feats, val_labels = extract_features(backbone, val, range(2), 28, device="cpu")
    with torch.no_grad():
        logits = head(val_feats.permute(0, 3, 1, 2).float())  # (2, C, 2, 2)
        pred = F.interpolate(logits, size=(28, 28), mode="bilinear").argmax(1).reshape(-1)
    truth = val_labels.reshape(-1).long()
    keep = truth != val.ignore_index
    conf = torch.bincount(truth[keep] * val.num_classes + pred[keep],
                          minlength=val.num_classes ** 2).view(val.num_classes, -1).double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    assert out["miou"] == pytest.approx((tp[union > 0] / union[union > 0]).mean().item(),
                                        abs=1e-12)
