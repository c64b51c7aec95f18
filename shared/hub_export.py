"""An encoder in the model hub layout: a folder timm loads offline, ready to upload as it is.

    <folder>/model.safetensors   the timm state dict (the same bytes as encoder.safetensors)
    <folder>/config.json         timm's hub config: architecture, num_classes=0, model_args
                                 (the sizes of a tiny variant) and pretrained_cfg (input size,
                                 crop, interpolation, mean/std of the training geometry)
    <folder>/README.md           the model card: how to load it, the training config and, when
                                 given, the evaluation table

Loading needs no network:

    timm.create_model("<architecture>", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="<folder>/model.safetensors"))
    timm.create_model("local-dir:<folder>", pretrained=True)   # reads config.json itself
"""

from __future__ import annotations

import json

import yaml
from timm.models import get_pretrained_cfg

from shared import storage
from shared.backbones import Backbone, save_backbone

HUB_FOLDER = "encoder-hub"  # beside encoder.safetensors in a training output
WEIGHTS_NAME = "model.safetensors"
DEFAULT_CROP, DEFAULT_RESIZE = 224, 256  # the training geometry: Resize(256) + CenterCrop(224)
HUB_LICENSES = {"apache-2.0", "mit", "cc-by-4.0", "cc-by-nc-4.0"}  # ids the hub knows by name


def model_args(backbone: Backbone) -> dict:
    """The timm.create_model keyword arguments that rebuild this encoder's architecture.

    Headless, CLS pooling (the global feature), any input size; ``img_size`` is the one the
    model was built at, so that learned position embeddings load as they are (a builder would
    otherwise take the config's input size and resample them); a tiny variant adds its sizes.
    """
    args = {"num_classes": 0, "global_pool": "token", "dynamic_img_size": True,
            "img_size": list(backbone.model.patch_embed.img_size)}
    if backbone.tiny:
        args.update(embed_dim=backbone.embed_dim, depth=len(backbone.blocks),
                    num_heads=backbone.blocks[0].attn.num_heads)
    return args


def hub_config(backbone: Backbone, crop: int = DEFAULT_CROP, resize: int = DEFAULT_RESIZE) -> dict:
    """config.json in timm's hub format; ``crop``/``resize``: the geometry it was trained at."""
    spec = backbone.spec
    base = get_pretrained_cfg(spec.timm_id)
    pretrained_cfg = {
        "architecture": spec.arch, "tag": "dip", "custom_load": False,
        "input_size": [3, crop, crop],
        "test_input_size": [3, spec.eval_input_size, spec.eval_input_size],
        "fixed_input_size": False, "interpolation": "bilinear", "crop_pct": crop / resize,
        "crop_mode": "center", "mean": list(spec.mean), "std": list(spec.std), "num_classes": 0,
        "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
        "license": base.license if base is not None else None,
    }
    return {
        "architecture": spec.arch, "num_classes": 0, "num_features": backbone.embed_dim,
        "global_pool": "token", "model_args": model_args(backbone),
        "pretrained_cfg": pretrained_cfg,
        "dip": {"backbone": spec.name, "base_model": spec.timm_id, "tiny": backbone.tiny,
                "patch_size": backbone.patch_size, "num_prefix_tokens": backbone.num_prefix_tokens,
                "eval_input_size": spec.eval_input_size},
    }


def _load_snippet(config: dict, folder_name: str) -> str:
    args = {k: v for k, v in config["model_args"].items() if k != "num_classes"}
    extra = "".join(f", {k}={v!r}" for k, v in args.items())
    return (f'model = timm.create_model(\n    "{config["architecture"]}", pretrained=True, '
            f'num_classes=0{extra},\n'
            f'    pretrained_cfg_overlay=dict(file="{folder_name}/{WEIGHTS_NAME}"))')


def model_card(config: dict, train_config: dict | None = None,
               evaluation: str | None = None) -> str:
    """README.md of the folder: front matter, loading, features, training config, evaluation."""
    dip, pcfg = config["dip"], config["pretrained_cfg"]
    front = {"library_name": "timm", "tags": ["image-feature-extraction", "timm", "dip"]}
    if pcfg["license"] in HUB_LICENSES:
        front["license"] = pcfg["license"]
    else:  # e.g. the DINOv3 license: the weights derive from the base model's
        front.update(license="other", license_name=pcfg["license"] or "unknown")
    if not dip["tiny"]:
        front["base_model"] = f"timm/{dip['base_model']}"
    size = "its tiny variant, random init before training" if dip["tiny"] else ""
    p, prefix = dip["patch_size"], dip["num_prefix_tokens"]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {dip['backbone']}: DIP post-trained encoder", "",
        f"`{dip['base_model']}` ({size or 'full size'}) after DIP, dense in-context "
        "post-training; the training head is dropped, this is the encoder alone.", "",
        "## Use", "", "```python", "import timm", "",
        _load_snippet(config, "encoder-hub"),
        'model = timm.create_model("local-dir:encoder-hub", pretrained=True)  # the same, '
        "from config.json", "```", "",
        f"Inputs: RGB normalised with mean {pcfg['mean']} and std {pcfg['std']}; sides multiples "
        f"of {p} (trained at {pcfg['input_size'][1]}, evaluated at {dip['eval_input_size']}).",
        f"Dense features: `model.forward_features(x)[:, {prefix}:]` (last-layer patch tokens "
        "after the final norm, CLS and registers removed); global feature: the CLS token "
        "`forward_features(x)[:, 0]` (`model(x)`).", "",
    ]
    if train_config is not None:
        lines += ["## Training config", "", "```yaml",
                  yaml.safe_dump(train_config, sort_keys=False).strip(), "```", ""]
    if evaluation:
        lines += ["## Evaluation", "", evaluation.strip(), ""]
    return "\n".join(lines)


def save_hub_export(backbone: Backbone, folder: str, train_config: dict | None = None,
                    evaluation: str | None = None) -> str:
    """Write the hub folder (weights, config.json, README.md) at any URI; returns the folder.

    ``train_config``: the resolved training config (its crop and resize set the input size);
    ``evaluation``: a markdown results table for the model card. Equal inputs, equal bytes.
    """
    train = train_config or {}
    config = hub_config(backbone, int(train.get("crop", DEFAULT_CROP)),
                        int(train.get("resize", DEFAULT_RESIZE)))
    save_backbone(backbone, storage.join(folder, WEIGHTS_NAME))
    storage.write_text(storage.join(folder, "config.json"), json.dumps(config, indent=2) + "\n")
    storage.write_text(storage.join(folder, "README.md"),
                       model_card(config, train_config, evaluation))
    return folder
