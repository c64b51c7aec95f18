"""The DIP training model: a partly frozen encoder and an MLP head on its dense patch features.

Query and support images pass through the same encoder and head. The head only exists during
training; the export is the encoder alone. Also the step's plumbing: narrow label maps checked on
the host and moved without waiting for the device, TF32 on CUDA, mixed precision, peak memory.
"""

from __future__ import annotations

import contextlib
import resource
import sys

import torch
from torch import nn

from shared.backbones import Backbone, load_backbone
from training.incontext import incontext_loss, patchify_labels, soft_nn_predict_indexed

HEAD_NORM_EPS = 1e-6  # the released head's LayerNorm eps (torch's default is 1e-5)


def make_head(embed_dim: int, hidden_mult: int = 7, out_dim: int = 6144,
              norm_eps: float = HEAD_NORM_EPS) -> nn.Sequential:
    """Linear(D, 7D) -> GELU -> Linear(7D, 6144) -> LayerNorm(6144, eps), applied per patch.

    eps is not a weight: a state dict saved with any eps loads into a head with any other.
    """
    hidden = hidden_mult * embed_dim
    return nn.Sequential(
        nn.Linear(embed_dim, hidden),
        nn.GELU(),
        nn.Linear(hidden, out_dim),
        nn.LayerNorm(out_dim, eps=norm_eps),
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
        head_norm_eps: float = HEAD_NORM_EPS,
    ):
        super().__init__()
        self.encoder = encoder
        self.trainable_names = freeze_encoder(encoder, trainable_blocks)
        self.head = make_head(encoder.embed_dim, head_hidden_mult, head_dim, head_norm_eps)
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
    check_labels: bool = True,
) -> torch.Tensor:
    """Loss of a batch of in-context tasks.

    query_images (B,3,H,W), query_labels (B,H,W); support_images (M,3,H,W) and support_labels
    (M,H,W) hold the batch's positives; support_index (B,S) lists, per task, which of the M
    support images form its support set (its own positive first, then the distractors).
    Labels may be any integer dtype. ``check_labels=False`` skips the label range checks, which
    wait for the device: the training loop checks each batch on the host instead.
    """
    b = support_index.shape[0]
    feats = model(torch.cat([query_images, support_images]))  # (B+M,N,E), one pass for both
    query, support = feats[:b], feats[b:]  # (B,N,E), (M,N,E)
    values = patchify_labels(support_labels, num_classes, patch_size, ignore_index,
                             check_values=check_labels)  # (M,N,C)
    pred = soft_nn_predict_indexed(query, support, values, support_index, temperature)  # (B,N,C)
    return incontext_loss(pred, query_labels, patch_size, kind, ignore_index,
                          check_values=check_labels)


def build_model(
    backbone: str,
    weights: str | None = "hub",
    tiny: bool = False,
    trainable_blocks: int = 3,
    head_hidden_mult: int = 7,
    head_dim: int = 6144,
    device: torch.device | str | None = None,
    head_norm_eps: float = HEAD_NORM_EPS,
) -> DIPModel:
    """Load the encoder from the backbone registry and attach a freshly initialised head."""
    encoder = load_backbone(backbone, weights=weights, tiny=tiny, device=device)
    model = DIPModel(encoder, trainable_blocks, head_hidden_mult, head_dim, head_norm_eps)
    return model.to(device) if device is not None else model


def label_dtype(num_classes: int, ignore_index: int | None = None) -> torch.dtype:
    """The smallest of uint8 / int16 / int32 holding every class id and the ignore index."""
    low = min(0, ignore_index if ignore_index is not None else 0)
    high = max(num_classes - 1, ignore_index if ignore_index is not None else 0)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ValueError(f"{num_classes} classes with ignore index {ignore_index} do not fit in int32")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int | None,
                       name: str = "labels") -> None:
    """ValueError unless every value of the host tensor is a class id in [0, K) or the ignore index."""
    if labels.numel() == 0 or (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
        return
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bad.any():
        raise ValueError(f"{name} hold {int(labels[bad][0])}, outside [0, {num_classes}) and not "
                         f"the ignore index {ignore_index}")


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device, num_classes: int,
                    ignore_index: int | None = None) -> dict[str, torch.Tensor]:
    """Move a host batch to ``device`` without waiting for it: label maps (keys ending ``labels``)
    checked on the host and narrowed to :func:`label_dtype`, everything else (uint8 images, the
    support index) as it is.

    The checks happen here, on the host, so that the step can skip its own (which would wait for
    the device); narrow labels move 2-8x fewer bytes than int64.
    """
    dtype = label_dtype(num_classes, ignore_index)
    moved = {}
    for key, value in batch.items():
        if key.endswith("labels"):
            if value.dtype in (torch.uint16, torch.uint32):
                value = value.to(torch.int64)  # torch has no min/max/compare for these on CPU
            check_label_values(value, num_classes, ignore_index, name=f"batch {key}")
            value = value.to(dtype)
        if device.type == "cuda" and not value.is_pinned():
            value = value.pin_memory()  # a copy from pageable memory would wait for the device
        moved[key] = value.to(device, non_blocking=True)
    return moved


@contextlib.contextmanager
def fast_matmul(device: torch.device):
    """TF32 matmuls and convolutions on CUDA for the duration (the previous flags are restored)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def autocast(precision: str, device: torch.device):
    """Mixed precision of the forward pass: autocast to bf16 or fp16 on CUDA; none on a CPU
    (CPU autocast is slow or missing for many ops) or for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16: a dynamic loss scaler, as the released training uses (torch.amp.GradScaler: scale
    the loss, unscale the gradients, skip a step whose gradients hold inf or NaN and halve the
    scale); None for bf16 and fp32, whose range needs none. It runs on a CPU too, so the CPU
    path is the GPU's, in fp32 arithmetic."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def optimizer_step(optimizer, scaler: torch.amp.GradScaler | None) -> float:
    """One optimizer step; with a loss scaler, skipped when a gradient holds inf or NaN.

    Returns the loss scale the step's gradients were computed with (1 without a scaler).
    """
    if scaler is None:
        optimizer.step()
        return 1.0
    scale = scaler.get_scale()
    scaler.step(optimizer)  # unscales, then steps only if every gradient is finite
    scaler.update()  # halves the scale after a skipped step, grows it after a run of good ones
    return scale


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA max_memory_allocated on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
