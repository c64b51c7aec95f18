"""Registry of ViT encoders (timm), with dense and global feature extraction and weight files.

Every registered backbone is a timm ViT (``VisionTransformer``; ``Eva`` for DINOv3, whose
rotary position embeddings replace the learned ones) built with ``num_classes=0`` and
``dynamic_img_size=True``, so any input whose sides are multiples of the patch size works (the
position embeddings are interpolated, or the rotary ones computed for the grid). Images come in
as float RGB in [0, 1]; the backbone applies its own mean/std, so data pipelines do not depend on
which encoder runs.

    dense  = last-layer patch tokens after the final norm, prefix (CLS + registers) removed
             -> (B, H/p, W/p, D)
    global = CLS token after the final norm -> (B, D)

Weights come from the model hub (``"hub"``), a file at any path or fsspec URI (safetensors, or a
torch state dict read with ``weights_only=True``; see shared/weight_files.py), or nowhere
(``None``: random init). An exported safetensors file records its backbone and whether it is
tiny in its metadata, so the file alone says what to build (:func:`backbone_from_weights`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import timm
import torch
from safetensors.torch import save as safetensors_save
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from shared import provenance, storage
from shared.devices import default_device
from shared.weight_files import (  # noqa: F401  (re-exported: the API always lived here)
    KEY_PREFIXES,
    NESTING_KEYS,
    WeightsError,
    canonical_safetensors,
    load_state_dict_strict,
    read_metadata,
    read_state_dict,
    read_weights,
    unwrap_state_dict,
)

# Architecture of every tiny variant: the same timm class and options, only smaller.
TINY_ARGS = {"embed_dim": 32, "depth": 4, "num_heads": 2}
# LayerScale gamma of a tiny variant at init. The full models' 1e-5 (DINOv2's init, meant for
# weights that are then pretrained at length) would leave a random tiny encoder's blocks switched
# off: its output is its patch embedding, and a few hundred post-training steps barely wake them.
TINY_LAYER_SCALE = 1.0
NOT_FILES = ("hub", "random")  # weights values that name no file


@dataclass(frozen=True)
class BackboneSpec:
    """One registered encoder: its timm id and everything a pipeline needs to feed it.

    The architecture's sizes (width, depth, heads, prefix tokens) are timm's: read them from the
    built model (``Backbone.embed_dim``, ``Backbone.num_prefix_tokens``), never from a copy here.
    """

    name: str
    timm_id: str  # "<architecture>.<pretrained tag>", as timm.create_model takes it
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    label_input_size: int  # labeling: whole image resized to a 32 x 32 patch grid
    eval_input_size: int  # in-context evaluation
    hub_id: str  # Hugging Face repository timm pulls the pretrained weights from
    layer_scale: bool = False  # blocks scale their residual branches by learned gammas (LayerScale)

    @property
    def arch(self) -> str:
        """The timm architecture name (the id without its pretrained tag)."""
        return self.timm_id.split(".", 1)[0]


def _dinov2_reg(name: str, size: str) -> BackboneSpec:
    timm_id = f"vit_{size}_patch14_reg4_dinov2.lvd142m"
    return BackboneSpec(
        name=name, timm_id=timm_id, patch_size=14, mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, label_input_size=448, eval_input_size=504,
        hub_id=f"timm/{timm_id}", layer_scale=True,
    )


def _dinov3(name: str, size: str) -> BackboneSpec:
    # CLS + 4 registers ("storage tokens") like DINOv2R; rotary positions, LayerScale, /16
    timm_id = f"vit_{size}_patch16_dinov3.lvd1689m"
    return BackboneSpec(
        name=name, timm_id=timm_id, patch_size=16, mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD, label_input_size=512, eval_input_size=512,
        hub_id=f"timm/{timm_id}", layer_scale=True,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "vits14": _dinov2_reg("vits14", "small"),
    "vitb14": _dinov2_reg("vitb14", "base"),
    "vitl14": _dinov2_reg("vitl14", "large"),
    # OpenAI CLIP was trained with QuickGELU; timm's plain "clip" variant would swap in exact GELU
    # on the same weights. Both read the same hub repository.
    "clip_vitb16": BackboneSpec(
        name="clip_vitb16", timm_id="vit_base_patch16_clip_quickgelu_224.openai", patch_size=16,
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, label_input_size=512, eval_input_size=512,
        hub_id="timm/vit_base_patch16_clip_224.openai",
    ),
    "mae_vitb16": BackboneSpec(
        name="mae_vitb16", timm_id="vit_base_patch16_224.mae", patch_size=16,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, label_input_size=512,
        eval_input_size=512, hub_id="timm/vit_base_patch16_224.mae",
    ),
    "dinov3_vits16": _dinov3("dinov3_vits16", "small"),
    "dinov3_vitb16": _dinov3("dinov3_vitb16", "base"),
    "dinov3_vitl16": _dinov3("dinov3_vitl16", "large"),
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

    def __init__(self, spec: BackboneSpec, model: nn.Module, tiny: bool = False):
        super().__init__()
        self.spec = spec
        self.model = model
        self.tiny = tiny  # the tiny variant of the spec's architecture (recorded in exports)
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
            _load_file(model, spec, os.fspath(weights), tiny)
    backbone = Backbone(spec, model, tiny=tiny)
    return backbone.to(default_device(device)).eval()


def _load_file(model: nn.Module, spec: BackboneSpec, uri: str, tiny: bool) -> None:
    """Strictly load a weight file; its recorded tiny flag must match, its recorded backbone is
    named when the weights do not fit (an explicit backbone wins over the file's)."""
    state, meta = read_weights(uri)
    if meta.get("tiny") in ("true", "false") and (meta["tiny"] == "true") != tiny:
        recorded_tiny = meta["tiny"] == "true"
        size, flag = ("tiny", "with --tiny") if recorded_tiny else ("full-size", "without --tiny")
        raise WeightsError(f"{uri} holds the weights of a {size} {meta.get('backbone', 'backbone')}"
                           f": load it with tiny={recorded_tiny} (on the command line: {flag})")
    try:
        load_state_dict_strict(model, state, uri)
    except WeightsError as exc:
        recorded = meta.get("backbone")
        if recorded and recorded != spec.name:
            raise WeightsError(f"{exc}\n  (the file records backbone {recorded!r}, not "
                               f"{spec.name!r}: leave the backbone out to use the file's)") from None
        raise


def backbone_from_weights(weights: str | os.PathLike | None) -> str | None:
    """The registered backbone a safetensors weight file records in its metadata, else None.

    None also for "hub", "random", no weights, a torch file, or a file that is not there yet
    (whoever loads it reports that). A recorded name that is not registered is a WeightsError.
    """
    if weights is None or os.fspath(weights) in NOT_FILES:
        return None
    uri = os.fspath(weights)
    if not uri.endswith(".safetensors") or not storage.isfile(uri):
        return None
    name = read_metadata(uri).get("backbone")
    if name is not None and name not in BACKBONES:
        raise WeightsError(f"{uri} records backbone {name!r}, which is not registered; known "
                           f"backbones: {', '.join(list_backbones())}")
    return name


def backbones_for_weights(weights: list[str]) -> list[str] | None:
    """Backbones for a list of weights whose files record theirs (evaluation pairs them).

    One recorded name serves every entry ("hub" and "random" included); different names need a
    file per entry, zipped in order; None when no file records one.
    """
    names = [backbone_from_weights(w) for w in weights]
    known = sorted({n for n in names if n})
    if len(known) <= 1:
        return known or None
    if any(n is None for n in names):
        raise WeightsError(f"the weight files record different backbones ({', '.join(known)}) and "
                           "some weights name none (hub/random/torch files): pass the backbones")
    return names


def backbone_override(cfg, field: str = "backbone") -> dict:
    """``{field: name}`` to resolve a stage config again with, when it leaves ``field`` unset
    (default, no YAML key, no flag) and its ``weights`` file records a backbone; else {}.

    An explicitly given backbone always wins. ``field="backbones"`` (evaluation) takes a list.
    """
    if field in cfg.model_fields_set:
        return {}
    weights = cfg.weights
    names = (backbones_for_weights(weights) if isinstance(weights, list)
             else backbone_from_weights(weights))
    return {field: names} if names else {}


def weights_identity(name: str, weights: str | os.PathLike | None = "hub", tiny: bool = False,
                     seed: int | None = None) -> dict:
    """What the weights ``load_backbone(name, weights, tiny)`` loads are, by content.

    A weight file: its sha256; "hub": the timm id, its hub repository and the revision the local
    cache holds; random init (None, "random", or "hub" with ``tiny``): ``seed``, the seed the
    caller draws the initial weights from. See shared/provenance.py.
    """
    spec = get_spec(name)
    if weights is None or weights == "random" or (weights == "hub" and tiny):
        return provenance.random_identity(seed)
    if weights == "hub":
        return provenance.hub_identity(spec.hub_id, timm_id=spec.timm_id)
    return provenance.path_identity(weights)


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
        meta.update(backbone=backbone.spec.name, timm_id=backbone.spec.timm_id,
                    tiny="true" if backbone.tiny else "false")
    storage.write_bytes(uri, canonical_safetensors(safetensors_save(state, metadata=meta)))
