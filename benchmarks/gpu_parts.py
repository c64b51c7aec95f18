"""The labeling parts of the GPU suite: the DiffCut models, the cut, the encoders, the actor.

Models are full-size architectures with random weights, built offline from the diffusers
configs in ``benchmarks/configs/`` (the SSD-1B UNet, the SDXL VAE, the DDIM schedule) and from
timm with ``pretrained=False`` (DINOv2R); the FLOPs and the time per call of a network do not
depend on its weights. What does depend on them is how many segments the cut finds, so the
actor's cut and concept assignment run on other segment counts than with trained weights (the
row reports them), and ``ncut_b64`` cuts DiffCut-shaped synthetic tokens instead.

Each part takes the suite's context (device, sizes, work folder, a cache shared by the parts of
its group) and returns its row: a one-line result, the numbers behind it, and the achieved
TFLOP/s where the work has a FLOP count.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
from pathlib import Path
from typing import Any

import torch
from bench_ncut import synthetic_diffcut_features
from bench_segment_worker import SIZES
from gpu_measure import count_flops, matmul_precision, median, rate_fields, time_calls

from labeling.diffcut import DiffCutFeatureExtractor, PromptEmbeddings, vae_compute_dtype

CONFIGS = Path(__file__).resolve().parent / "configs"
PROMPT_TOKENS = 77  # CLIP's context length: the empty prompt is padded to it
TAU, ALPHA = 0.5, 10.0  # the paper's cut settings


def read_arch_config(name: str, class_name: str) -> dict[str, Any]:
    """An architecture config of ``benchmarks/configs``, checked to be a ``class_name`` config."""
    path = CONFIGS / name
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"architecture config {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"architecture config {path} is not valid JSON: {exc}") from None
    if config.get("_class_name") != class_name:
        raise ValueError(f"architecture config {path}: _class_name is "
                         f"{config.get('_class_name')!r}, expected {class_name!r}")
    return config


def random_prompt(unet_config: dict[str, Any], seed: int = 0) -> PromptEmbeddings:
    """Random empty-prompt conditioning of the UNet's widths: the text encoders' output is an
    input to the UNet like any other, so they need not be built."""
    gen = torch.Generator().manual_seed(seed)
    width = unet_config["cross_attention_dim"]
    pooled = (unet_config["projection_class_embeddings_input_dim"]
              - 6 * unet_config["addition_time_embed_dim"])  # minus the six SDXL time ids
    return PromptEmbeddings(torch.randn(1, PROMPT_TOKENS, width, generator=gen),
                            torch.randn(1, pooled, generator=gen))


def build_extractor(sizes, device: torch.device) -> DiffCutFeatureExtractor:
    """DiffCut's extractor on random-init UNet and VAE built from the configs on ``device``
    (the meta device builds it without memory, for counting FLOPs)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet_config = read_arch_config(sizes.unet_config, "UNet2DConditionModel")
    vae_config = read_arch_config(sizes.vae_config, "AutoencoderKL")
    scheduler = DDIMScheduler.from_config(read_arch_config(sizes.scheduler_config,
                                                           "DDIMScheduler"))
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no host copy of 1.3B parameters
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    return DiffCutFeatureExtractor(unet, vae, scheduler, random_prompt(unet_config),
                                   resolution=sizes.resolution, device=device)


def extractor(ctx) -> DiffCutFeatureExtractor:
    if "extractor" not in ctx.cache:
        ctx.cache["extractor"] = build_extractor(ctx.sizes, ctx.device)
    return ctx.cache["extractor"]


def latent_side(ex: DiffCutFeatureExtractor) -> int:
    """The VAE latent's side for the extractor's input (every VAE block but the last halves it)."""
    return ex.resolution // 2 ** (len(ex.vae.config.block_out_channels) - 1)


def labeling_flops(ctx) -> dict[str, int]:
    """FLOPs per image of the VAE encoder and of the UNet up to the hooked layer (meta device)."""
    if "labeling_flops" not in ctx.cache:
        meta = build_extractor(ctx.sizes, torch.device("meta"))
        side, latent = ctx.sizes.resolution, latent_side(meta)
        ctx.cache["labeling_flops"] = {
            "vae": count_flops(lambda: meta.encode(torch.zeros(1, 3, side, side, device="meta"))),
            "unet": count_flops(lambda: meta.hooked_tokens(
                torch.zeros(1, meta.vae.config.latent_channels, latent, latent, device="meta"))),
        }
    return ctx.cache["labeling_flops"]


@contextlib.contextmanager
def vae_in(ex: DiffCutFeatureExtractor, dtype: torch.dtype):
    """The extractor with a copy of its VAE in ``dtype`` for the duration (as the vae_dtype
    setting builds it), its own VAE kept for the parts after."""
    saved = ex.vae, ex.vae_dtype
    if dtype != ex.vae_dtype:
        ex.vae, ex.vae_dtype = copy.deepcopy(ex.vae).to(vae_compute_dtype(dtype)), dtype
    try:
        yield ex
    finally:
        ex.vae, ex.vae_dtype = saved


def rate_row(ctx, per_s: float, unit: str, batch: int, times: list[float],
             flops_per_item: float | None, precision: str | None, batch_name: str = "batch",
             **metrics: Any) -> dict:
    """The row of a throughput part: items/s, ms/item, the calls timed, TFLOP/s."""
    result = f"{per_s:,.1f} {unit}/s ({1000 / per_s:,.2f} ms each, {batch_name} {batch})"
    return {"result": result, **rate_fields(ctx.device, flops_per_item, per_s, precision),
            "metrics": {f"{unit}_per_s": per_s, f"ms_per_{unit[:-1]}": 1000 / per_s,
                        "batch": batch, "calls": len(times), "median_call_s": median(times),
                        "best_call_s": min(times), "flops_per_item": flops_per_item, **metrics}}


@torch.no_grad()
def part_unet(ctx) -> dict:
    """SSD-1B UNet from noisy latents up to the hooked self-attention, stopped there."""
    ex, batch = extractor(ctx), ctx.sizes.label_batch
    latent = latent_side(ex)
    latents = torch.randn(batch, ex.vae.config.latent_channels, latent, latent,
                          device=ctx.device)  # (B, 4, R/8, R/8)
    out = {}
    times = time_calls(lambda: out.update(tokens=ex.hooked_tokens(latents)), ctx.device,
                       ctx.budget)
    return rate_row(ctx, batch / median(times), "images", batch, times,
                    labeling_flops(ctx)["unet"], matmul_precision(ex.unet_dtype),
                    dtype=str(ex.unet_dtype), tokens=list(out["tokens"].shape))


@torch.no_grad()
def part_vae(ctx, dtype: torch.dtype) -> dict:
    """SDXL VAE encoder (posterior mean x scaling factor) of 1024 x 1024 images in ``dtype``."""
    side, batch = ctx.sizes.resolution, ctx.sizes.label_batch
    images = torch.rand(batch, 3, side, side, device=ctx.device)  # (B, 3, R, R) in [0, 1]
    out = {}
    with vae_in(extractor(ctx), dtype) as ex:
        times = time_calls(lambda: out.update(z=ex.encode(images)), ctx.device, ctx.budget)
        compute = vae_compute_dtype(ex.vae_dtype)
    return rate_row(ctx, batch / median(times), "images", batch, times,
                    labeling_flops(ctx)["vae"], matmul_precision(compute, "conv"),
                    dtype=str(compute), finite=bool(torch.isfinite(out["z"]).all()))


def part_ncut(ctx) -> dict:
    """Batched recursive NCut of DiffCut-shaped tokens (32 x 32 x 1280), one batch of 64."""
    from labeling.ncut import NCutWorkspace, batched_recursive_ncut

    s = ctx.sizes
    feats = synthetic_diffcut_features(s.ncut_batch, s.ncut_grid, s.ncut_channels).to(ctx.device)
    workspace, out = NCutWorkspace(), {}  # kept across calls, as the segmenter keeps it

    def cut() -> None:
        out["labels"] = batched_recursive_ncut(feats, TAU, ALPHA, workspace=workspace)

    times = time_calls(cut, ctx.device, ctx.budget)
    segments = (out["labels"].amax(dim=1) + 1).float()  # (B,) segments per image
    row = rate_row(ctx, s.ncut_batch / median(times), "images", s.ncut_batch, times, None, None,
                   tokens=[s.ncut_grid**2, s.ncut_channels],
                   segments_per_image=float(segments.mean()))
    row["result"] += f", {row['metrics']['segments_per_image']:.1f} segments/image"
    return row


@torch.no_grad()
def part_encoder(ctx, name: str) -> dict:
    """A DINOv2R encoder's dense + global features at the labeling size, as the actors run it
    (float32, torch's default matmul precision)."""
    from shared.backbones import load_backbone

    s = ctx.sizes
    torch.manual_seed(0)
    backbone = load_backbone(name, weights=None, tiny=s.tiny, device=ctx.device)
    images = torch.rand(s.encoder_batch, 3, s.feature_size, s.feature_size, device=ctx.device)
    times = time_calls(lambda: backbone.features(images), ctx.device, ctx.budget)
    with torch.device("meta"):
        meta = load_backbone(name, weights=None, tiny=s.tiny, device="meta")
    flops = count_flops(lambda: meta.features(torch.zeros(1, 3, s.feature_size, s.feature_size,
                                                          device="meta")))
    return rate_row(ctx, s.encoder_batch / median(times), "images", s.encoder_batch, times,
                    flops, matmul_precision(torch.float32), size=s.feature_size,
                    width=backbone.embed_dim, depth=len(backbone.blocks))


def actor_images(ctx) -> tuple[list[str], list[str]]:
    """Image ids and URIs of procedural scenes of COCO-like sizes, written as JPEG files."""
    from shared import storage
    from shared.images import encode_jpeg
    from shared.synthetic import make_scene

    s, ids, uris = ctx.sizes, [], []
    for i in range(s.actor_images):
        height, width = SIZES[i % len(SIZES)]
        image, _ = make_scene(i, (height // s.actor_image_scale, width // s.actor_image_scale))
        ids.append(f"scene{i:05d}")
        uris.append(f"{ctx.work}/actor-images/{ids[-1]}.jpg")
        storage.write_bytes(uris[-1], encode_jpeg(image))
    return ids, uris


def part_actor(ctx) -> dict:
    """The whole segmenting actor: `segment_shard` (decode in threads, DiffCut with the fp32 VAE,
    the cut, concept assignment, the encoder, pooling, PNG maps, the shard's commit)."""
    from labeling.segmenter import DiffCutSegmenter
    from labeling.stages import LabelingModels, segment_shard
    from shared.backbones import load_backbone
    from shared.labelset import LabelSetWriter

    s, ex = ctx.sizes, extractor(ctx)
    ids, uris = actor_images(ctx)
    torch.manual_seed(1)
    backbone = load_backbone(s.actor_encoder, weights=None, tiny=s.tiny, device=ctx.device)
    segmenter = DiffCutSegmenter(extractor=ex, tau=TAU, alpha=ALPHA, batch_size=s.label_batch)
    models = LabelingModels(segmenter, backbone.eval(), ctx.device, s.feature_size)
    writer = LabelSetWriter(f"{ctx.work}/actor-labels", {"bench": "gpu_suite segment_actor"})
    shards = itertools.count()

    def shard() -> None:  # a new shard each call: a committed shard would be skipped
        ctx.cache["actor_shard"] = next(shards)
        segment_shard(models, writer, ctx.cache["actor_shard"], ids, uris, s.label_batch,
                      s.actor_threads)

    times = time_calls(shard, ctx.device, ctx.budget, min_calls=1)
    done = ctx.cache["actor_shard"]
    status = writer.read_shard_table("images", done, ["status", "error"]).to_pydict()
    failed = [e for st, e in zip(status["status"], status["error"], strict=True) if st != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(ids)} images failed, the first: {failed[0]}")
    segments = writer.read_shard_table("segments", done, ["segment_id"]).num_rows / len(ids)
    flops = labeling_flops(ctx)
    with torch.device("meta"):
        meta = load_backbone(s.actor_encoder, weights=None, tiny=s.tiny, device="meta")
    encoder = count_flops(lambda: meta.features(torch.zeros(1, 3, s.feature_size, s.feature_size,
                                                            device="meta")))
    per_image = flops["vae"] + flops["unet"] + encoder
    row = rate_row(ctx, len(ids) / median(times), "images", s.label_batch, times, per_image,
                   None, images_per_call=len(ids), segments_per_image=segments,
                   vae_dtype=str(ex.vae_dtype), unet_dtype=str(ex.unet_dtype),
                   encoder=s.actor_encoder, feature_size=s.feature_size)
    row["result"] += f", {segments:.1f} segments/image"
    dtypes = f"UNet {ex.unet_dtype}, VAE {ex.vae_dtype}, encoder torch.float32"
    row["notes"] = (f"{dtypes.replace('torch.', '')}: no single peak; segment counts come from "
                    "random weights")
    return row
