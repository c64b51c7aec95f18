"""Registry of ViT encoders (timm), with dense and global feature extraction and weight files.

Every registered backbone is a timm ``VisionTransformer`` built with ``num_classes=0`` and
``dynamic_img_size=True``, so any input whose sides are multiples of the patch size works (the
position embeddings are interpolated). Images come in as float RGB in [0, 1]; the backbone applies
its own mean/std, so data pipelines do not depend on which encoder runs.

    dense  = last-layer patch tokens after the final norm, prefix (CLS + registers) removed
             -> (B, H/p, W/p, D)
    global = CLS token after the final norm -> (B, D)

Weights come from the model hub (``"hub"``), a file at any path or fsspec URI (safetensors, or a
torch state dict read with ``weights_only=True``), or nowhere (``None``: random init).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import timm
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from shared import storage

# Architecture of every tiny variant: the same timm class and options, only smaller.
TINY_ARGS = {"embed_dim": 32, "depth": 4, "num_heads": 2}
# LayerScale gamma of a tiny variant at init. The full models' 1e-5 (DINOv2's init, meant for
# weights that are then pretrained at length) would leave a random tiny encoder's blocks switched
# off: its output is its patch embedding, and a few hundred post-training steps barely wake them.
TINY_LAYER_SCALE = 1.0
# Wrappers that training code and checkpoint formats put around a timm state dict.
NESTING_KEYS = ("state_dict", "model", "encoder")
KEY_PREFIXES = ("module.", "backbone.", "model.")
_LISTED = 5  # how many offending keys an error message shows per kind


class WeightsError(ValueError):
    """A weight file does not match the backbone: names the file and the offending keys."""


@dataclass(frozen=True)
class BackboneSpec:
    """One registered encoder: its timm id and everything a pipeline needs to feed it."""

    name: str
    timm_id: str  # "<architecture>.<pretrained tag>", as timm.create_model takes it
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    num_prefix_tokens: int  # CLS + register tokens in front of the patch tokens
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # training crop (Resize 256 + CenterCrop 224)
    label_input_size: int  # labeling: whole image resized to a 32 x 32 patch grid
    eval_input_size: int  # in-context evaluation
    hub_id: str  # Hugging Face repository timm pulls the pretrained weights from
    layer_scale: bool = False  # blocks scale their residual branches by learned gammas (LayerScale)

    @property
    def arch(self) -> str:
        """The timm architecture name (the id without its pretrained tag)."""
        return self.timm_id.split(".", 1)[0]


def _dinov2_reg(name: str, size: str, dim: int, depth: int, heads: int) -> BackboneSpec:
    timm_id = f"vit_{size}_patch14_reg4_dinov2.lvd142m"
    return BackboneSpec(
        name=name, timm_id=timm_id, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads,
        num_prefix_tokens=5, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        input_size=224, label_input_size=448, eval_input_size=504, hub_id=f"timm/{timm_id}",
        layer_scale=True,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "vits14": _dinov2_reg("vits14", "small", 384, 12, 6),
    "vitb14": _dinov2_reg("vitb14", "base", 768, 12, 12),
    "vitl14": _dinov2_reg("vitl14", "large", 1024, 24, 16),
    # OpenAI CLIP was trained with QuickGELU; timm's plain "clip" variant would swap in exact GELU
    # on the same weights. Both read the same hub repository.
    "clip_vitb16": BackboneSpec(
        name="clip_vitb16", timm_id="vit_base_patch16_clip_quickgelu_224.openai", patch_size=16,
        embed_dim=768, depth=12, num_heads=12, num_prefix_tokens=1, mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD, input_size=224, label_input_size=512, eval_input_size=512,
        hub_id="timm/vit_base_patch16_clip_224.openai",
    ),
    "mae_vitb16": BackboneSpec(
        name="mae_vitb16", timm_id="vit_base_patch16_224.mae", patch_size=16, embed_dim=768,
        depth=12, num_heads=12, num_prefix_tokens=1, mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, input_size=224, label_input_size=512, eval_input_size=512,
        hub_id="timm/vit_base_patch16_224.mae",
    ),
}


def list_backbones() -> list[str]:
    """Names of all registered backbones."""
    return sorted(BACKBONES)


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; an unknown name raises KeyError listing the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(
            f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}"
        ) from None


def create_timm_model(
    spec: BackboneSpec | str, pretrained: bool = False, tiny: bool = False
) -> nn.Module:
    """The plain timm model of a spec (headless, any input size); tiny: same family, tiny size."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    extra = dict(TINY_ARGS) if tiny else {}
    if tiny and spec.layer_scale:
        extra["init_values"] = TINY_LAYER_SCALE
    model_id = spec.timm_id if pretrained else spec.arch
    return timm.create_model(
        model_id, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **extra
    )


class Backbone(nn.Module):
    """A timm ViT behind one interface: [0,1] RGB images in, dense and global features out."""

    def __init__(self, spec: BackboneSpec, model: nn.Module):
        super().__init__()
        self.spec = spec
        self.model = model
        # Non-persistent: the state dict stays exactly the timm model's (under "model.").
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_size(self) -> int:
        return self.model.patch_embed.patch_size[0]

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    @property
    def norm(self) -> nn.Module:
        return self.model.norm

    def check_input_size(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (H/p, W/p) of an input size; ValueError unless both are multiples of p."""
        p = self.patch_size
        if height % p or width % p or height < p or width < p:
            raise ValueError(
                f"backbone {self.spec.name!r} needs input height and width that are positive "
                f"multiples of its patch size {p}; got {height}x{width} "
                f"(e.g. {max(p, height // p * p)}x{max(p, width // p * p)})"
            )
        return height // p, width // p

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, for float RGB images in [0, 1] of shape (B, 3, H, W)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"backbone {self.spec.name!r} expects images of shape (B, 3, H, W); "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"backbone {self.spec.name!r} expects float images in [0, 1]; got {images.dtype}"
            )
        self.check_input_size(images.shape[2], images.shape[3])
        images = images.to(self.mean.device)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All last-layer tokens after the final norm: (B, prefix + H/p * W/p, D)."""
        return self.model.forward_features(self.normalize(images))

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (B, H/p, W/p, D) and global (B, D) features from one forward pass."""
        x = self.model.forward_features(self.normalize(images))  # (B, P + h*w, D)
        h, w = self.check_input_size(images.shape[-2], images.shape[-1])
        dense = x[:, self.num_prefix_tokens:].reshape(x.shape[0], h, w, x.shape[-1])
        return dense, x[:, 0]

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Last-layer patch tokens after the final norm, prefix removed: (B, H/p, W/p, D)."""
        return self.features(images)[0]

    def global_features(self, images: torch.Tensor) -> torch.Tensor:
        """CLS token after the final norm: (B, D)."""
        return self.features(images)[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dense_features(images)


def _read_bytes(uri: str) -> bytes:
    """The bytes of a weight file; FileNotFoundError says where it looked."""
    if not storage.isfile(uri):
        fs, path = storage.url_to_fs(uri)
        where = os.path.abspath(path) if isinstance(fs, LocalFileSystem) else uri
        raise FileNotFoundError(f"backbone weight file not found: {uri} (looked at {where})")
    return storage.read_bytes(uri)


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or torch checkpoint (weights_only), unwrapped, unprefixed."""
    data = _read_bytes(uri)
    try:
        if uri.endswith(".safetensors"):
            raw = safetensors_load(data)
        else:
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read backbone weights from {uri}: {exc}") from exc
    return unwrap_state_dict(raw, uri)


def unwrap_state_dict(raw: object, uri: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Take the state dict out of "state_dict"/"model"/"encoder" wrappers; drop shared prefixes."""
    while isinstance(raw, Mapping):
        inner = [k for k in NESTING_KEYS if isinstance(raw.get(k), Mapping)]
        if not inner:
            break
        raw = raw[inner[0]]
    if not isinstance(raw, Mapping) or not raw:
        raise WeightsError(f"{uri} holds no state dict (got {type(raw).__name__})")
    state = dict(raw)
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{uri}: entries that are not tensors: {bad[:_LISTED]}")
    return state


def _foreign_format(state: Mapping[str, torch.Tensor]) -> bool:
    """True for the original DINOv2 / OpenAI CLIP checkpoint layouts that timm converts."""
    return "mask_token" in state or "visual.class_embedding" in state


def _listing(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], uri: str) -> None:
    """Load every tensor of a timm-layout state dict; mismatches raise WeightsError (names file)."""
    if _foreign_format(state):
        state = checkpoint_filter_fn(dict(state), model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        lines = [f"weights in {uri} do not match the backbone:"]
        if missing:
            lines.append(f"  missing keys: {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {_listing(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches: {_listing(shapes)}")
            lines.append("  (weights of a tiny backbone load only with tiny=True, and vice versa)")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backbone(
    name: str,
    weights: str | os.PathLike | None = "hub",
    tiny: bool = False,
    device: str | torch.device | None = None,
) -> Backbone:
    """A registered backbone in eval mode on ``device`` (default: CUDA when present, else CPU).

    weights: "hub" (timm pretrained weights; for tiny=True, random init: no tiny hub weights
    exist), a path / fsspec URI of a safetensors or torch state-dict file (strict), or None
    (random init).
    """
    spec = get_spec(name)
    if weights == "hub" and not tiny:
        try:
            model = create_timm_model(spec, pretrained=True)
        except Exception as exc:
            raise RuntimeError(
                f"could not load pretrained {spec.timm_id} from the hub ({spec.hub_id}): {exc}; "
                "without network access pass a local weight file instead"
            ) from exc
    else:
        model = create_timm_model(spec, tiny=tiny)
        if weights is not None and weights != "hub":
            uri = os.fspath(weights)
            load_state_dict_strict(model, read_state_dict(uri), uri)
    backbone = Backbone(spec, model)
    return backbone.to(device or _default_device()).eval()


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order, compact, space-padded.

    safetensors writes the metadata map in hash order, which changes from call to call; sorted
    keys (tensor names and metadata alike) make equal states give equal bytes. The data section
    is untouched: its offsets are relative to its own start.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def save_backbone(backbone: Backbone | nn.Module, path: str | os.PathLike) -> None:
    """Write the timm model's state dict as safetensors (loadable by load_backbone or plain timm).

    Equal weights give byte-identical files: sorted names, sorted metadata, no timestamps.
    """
    uri = os.fspath(path)
    if not uri.endswith(".safetensors"):
        raise ValueError(f"backbone weights are saved as safetensors: {uri} must end .safetensors")
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(model.state_dict().items())}
    meta = {"format": "timm"}
    if isinstance(backbone, Backbone):
        meta.update(backbone=backbone.spec.name, timm_id=backbone.spec.timm_id)
    storage.write_bytes(uri, canonical_safetensors(safetensors_save(state, metadata=meta)))
