"""The DIP training model: a partly frozen encoder and an MLP head on its dense patch features.

Query and support images pass through the same encoder and head. The head only exists during
training; the export is the encoder alone.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.backbones import Backbone, load_backbone
from training.incontext import incontext_loss, patchify_labels, soft_nn_predict


def make_head(embed_dim: int, hidden_mult: int = 7, out_dim: int = 6144) -> nn.Sequential:
    """Linear(D, 7D) -> GELU -> Linear(7D, 6144) -> LayerNorm(6144), applied per patch."""
    hidden = hidden_mult * embed_dim
    return nn.Sequential(
        nn.Linear(embed_dim, hidden),
        nn.GELU(),
        nn.Linear(hidden, out_dim),
        nn.LayerNorm(out_dim),
    )


def freeze_encoder(encoder: Backbone, trainable_blocks: int = 3) -> list[str]:
    """Freeze every encoder parameter except the last ``trainable_blocks`` blocks and the final norm.

    Returns the names (relative to ``encoder``) of the parameters left trainable.
    """
    blocks = list(encoder.blocks)
    if trainable_blocks > len(blocks):
        raise ValueError(
            f"cannot train the last {trainable_blocks} blocks of {encoder.spec.name}: it has {len(blocks)}"
        )
    encoder.requires_grad_(False)
    live = [encoder.norm, *blocks[len(blocks) - trainable_blocks :]]
    for module in live:
        module.requires_grad_(True)
    return [name for name, p in encoder.named_parameters() if p.requires_grad]


class DIPModel(nn.Module):
    """Encoder + head; ``forward`` maps images (B,3,H,W) in [0,1] to patch embeddings (B,N,E)."""

    def __init__(
        self,
        encoder: Backbone,
        trainable_blocks: int = 3,
        head_hidden_mult: int = 7,
        head_dim: int = 6144,
    ):
        super().__init__()
        self.encoder = encoder
        self.trainable_names = freeze_encoder(encoder, trainable_blocks)
        self.head = make_head(encoder.embed_dim, head_hidden_mult, head_dim)
        self.patch_size = encoder.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dense = self.encoder.dense_features(images)  # (B,h,w,D)
        return self.head(dense.flatten(1, 2))  # (B,h*w,D) -> (B,h*w,E)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters training changes (unfrozen encoder part + head), detached, on CPU."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trainable_state`; names must match exactly."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or extra:
            raise ValueError(f"trainable state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])


def task_loss(
    model: nn.Module,
    query_images: torch.Tensor,
    query_labels: torch.Tensor,
    support_images: torch.Tensor,
    support_labels: torch.Tensor,
    support_index: torch.Tensor,
    num_classes: int,
    patch_size: int,
    temperature: float = 0.07,
    kind: str = "released",
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Loss of a batch of in-context tasks.

    query_images (B,3,H,W), query_labels (B,H,W); support_images (M,3,H,W) and support_labels
    (M,H,W) hold the batch's positives; support_index (B,S) lists, per task, which of the M
    support images form its support set (its own positive first, then the distractors).
    """
    b, s = support_index.shape
    feats = model(torch.cat([query_images, support_images]))  # (B+M,N,E), one pass for both
    query, support = feats[:b], feats[b:]  # (B,N,E), (M,N,E)
    values = patchify_labels(support_labels, num_classes, patch_size, ignore_index)  # (M,N,C)
    n = support.shape[1]
    keys = support[support_index].reshape(b, s * n, -1)  # (B,S,N,E) -> (B,S*N,E)
    vals = values[support_index].reshape(b, s * n, -1)  # (B,S,N,C) -> (B,S*N,C)
    pred = soft_nn_predict(query, keys, vals, temperature)  # (B,N,C)
    return incontext_loss(pred, query_labels, patch_size, kind, ignore_index)


def build_model(
    backbone: str,
    weights: str | None = "hub",
    tiny: bool = False,
    trainable_blocks: int = 3,
    head_hidden_mult: int = 7,
    head_dim: int = 6144,
    device: torch.device | str | None = None,
) -> DIPModel:
    """Load the encoder from the backbone registry and attach a freshly initialised head."""
    encoder = load_backbone(backbone, weights=weights, tiny=tiny, device=device)
    model = DIPModel(encoder, trainable_blocks, head_hidden_mult, head_dim)
    return model.to(device) if device is not None else model
