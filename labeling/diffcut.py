"""DiffCut features: SSD-1B self-attention tokens of whole images.

`DiffCutFeatureExtractor`: the image resized (not cropped) to resolution x resolution
(1024) in [0, 1], mapped to [-1, 1]; VAE posterior mean x scaling_factor (VAE in float32 by default);
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps at t = 50 with one fixed-seed eps shared by every image
(drawn once, from a CPU or a CUDA generator: labeling.config.DIFFCUT_PRESETS names the protocols);
one UNet pass conditioned on the empty prompt (SDXL: both text encoders' penultimate states,
the pooled embedding and the size time ids, computed once), capturing the output of
unet.down_blocks[-1].attentions[-1].transformer_blocks[-1].attn1 and stopping the UNet right there.
Tokens (B, h*w, C) are L2-normalised (32 x 32 x 1280 for SSD-1B at 1024). The segments come from
`labeling.segmenter.DiffCutSegmenter` (recursive NCut, concept assignment, optional PAMR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.devices import default_device

SSD1B_HUB_ID = "segmind/SSD-1B"
HOOKED_LAYER = "down_blocks[-1].attentions[-1].transformer_blocks[-1].attn1"


@dataclass(frozen=True)
class PromptEmbeddings:
    """SDXL conditioning for one prompt: token states (1, L, D) and pooled text embedding (1, P)."""

    states: Tensor
    pooled: Tensor


class _HookedLayerReached(Exception):
    """Raised by the forward hook to stop the UNet once the hooked layer has run."""


@torch.no_grad()
def encode_empty_prompt(tokenizers: list, text_encoders: list) -> PromptEmbeddings:
    """SDXL empty-prompt conditioning: concat of both encoders' penultimate states, pooled from the last."""
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        ids = tokenizer(
            [""], padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        out = encoder(ids.input_ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])  # (1, L, D_i)
        pooled = out[0]  # text_embeds of the projection model (the last encoder)
    if pooled is None or pooled.ndim != 2:
        raise ValueError(
            "the last text encoder must return a pooled (1, P) embedding (CLIPTextModelWithProjection)"
        )
    return PromptEmbeddings(torch.cat(states, dim=-1).float().cpu(), pooled.float().cpu())


def add_noise(z0: Tensor, eps: Tensor, alpha_bar: float) -> Tensor:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (forward diffusion at one timestep).

    The scheduler's own ``add_noise`` computes the same expression, but takes both square roots
    in the tensors' float32 with torch, whose CPU kernel is not always correctly rounded (on an
    x86 CPU, sqrt(abar_50) of SDXL's schedule comes out one ulp high): its z_t, hence the
    segments, would depend on the device. Here the roots are taken in float64 and rounded once, so z_t
    is the same everywhere.
    """
    return alpha_bar**0.5 * z0 + (1.0 - alpha_bar) ** 0.5 * eps


def sdxl_time_ids(height: int, width: int) -> Tensor:
    """SDXL micro-conditioning: original size, crop top-left (0, 0), target size -> (1, 6)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def default_unet_dtype(device: torch.device) -> torch.dtype:
    """float16 on a GPU (as the reference DiffCut runs the UNet), float32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def vae_compute_dtype(vae_dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE computes in: its own, except float16, which computes in float32.

    DiffCut's released code loads the pipeline in float16 and encodes under
    torch.autocast("cuda", dtype=torch.float32), which casts each convolution, linear layer and
    norm to float32: the weights are float16-rounded, the arithmetic is float32 (float16
    arithmetic overflows in the SDXL VAE). Rounding the weights once and computing in float32
    gives the same numbers on every device.
    """
    return torch.float32 if vae_dtype == torch.float16 else vae_dtype


def make_noise(shape: tuple[int, ...], seed: int, noise_device: str, device: torch.device) -> Tensor:
    """The fixed eps (float32, on `device`) from a generator seeded `seed` on `noise_device`.

    A CPU generator gives the same eps on every machine; a CUDA generator gives the released
    code's eps, which no CPU can draw: asking for it off a GPU is an error, not a fallback.
    """
    if noise_device == "cpu":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=gen).to(device)
    if noise_device != "cuda":
        raise ValueError(f"diffcut.noise_device must be 'cpu' or 'cuda', got {noise_device!r}")
    if device.type != "cuda":
        raise ValueError(
            f"diffcut.noise_device 'cuda' (preset 'released') draws the noise from a CUDA generator, "
            f"but DiffCut runs on {device}: run it on a GPU, or set diffcut.noise_device: cpu "
            "(the same seed on the CPU generator gives other noise, hence other segments)"
        )
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device)


def _to(model, device: torch.device, dtype: torch.dtype):
    """Frozen eval-mode model on device, cast only when its dtype differs."""
    if model.dtype != dtype:
        model = model.to(dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


class DiffCutFeatureExtractor:
    """SSD-1B (SDXL-type) UNet self-attention tokens of images, as DiffCut segments them."""

    def __init__(
        self,
        unet,
        vae,
        scheduler,
        prompt: PromptEmbeddings,
        resolution: int = 1024,
        timestep: int = 50,
        seed: int = 0,
        device: str | torch.device | None = None,
        unet_dtype: torch.dtype | None = None,
        vae_dtype: torch.dtype = torch.float32,
        noise_device: str = "cpu",
        antialias: bool = True,
    ):
        self.device = default_device(device)
        self.unet_dtype = unet_dtype or default_unet_dtype(self.device)
        self.vae_dtype = vae_dtype
        self.unet = _to(unet, self.device, self.unet_dtype)
        if vae_dtype == torch.float16:  # float16-rounded weights, float32 arithmetic
            vae = _to(vae, self.device, torch.float16)
        self.vae = _to(vae, self.device, vae_compute_dtype(vae_dtype))
        self.scheduler = scheduler
        self.resolution, self.timestep, self.seed = resolution, timestep, seed
        self.noise_device, self.antialias = noise_device, antialias
        self.alpha_bar = float(scheduler.alphas_cumprod[timestep])
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % down:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE's downsampling {down}"
            )
        latent = resolution // down
        self.noise = make_noise(
            (1, vae.config.latent_channels, latent, latent), seed, noise_device, self.device
        )  # (1, 4, R/8, R/8), shared by every image
        self.prompt_states = prompt.states.to(self.device, self.unet_dtype)
        self.added_cond = {
            "text_embeds": prompt.pooled.to(self.device, self.unet_dtype),
            "time_ids": sdxl_time_ids(resolution, resolution).to(self.device, self.unet_dtype),
        }
        self.layer = self.unet.down_blocks[-1].attentions[-1].transformer_blocks[-1].attn1

    @classmethod
    def from_pretrained(
        cls, source: str = SSD1B_HUB_ID, variant: str | None = None, **kwargs: Any
    ) -> DiffCutFeatureExtractor:
        """Load UNet, VAE, scheduler, tokenizers and text encoders from a hub id or a pipeline folder."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        device = default_device(kwargs.get("device"))
        unet_dtype = kwargs.get("unet_dtype") or default_unet_dtype(device)
        vae_dtype = kwargs.get("vae_dtype", torch.float32)
        try:
            unet = UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", variant=variant, torch_dtype=unet_dtype
            )
            vae = AutoencoderKL.from_pretrained(
                source, subfolder="vae", variant=variant, torch_dtype=vae_dtype
            )
            config = DDIMScheduler.load_config(source, subfolder="scheduler")
            tokenizers = [
                CLIPTokenizer.from_pretrained(source, subfolder=f)
                for f in ("tokenizer", "tokenizer_2")
            ]
            encoders = [
                CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant),
                CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", variant=variant
                ),
            ]
        except OSError as exc:
            raise OSError(
                f"cannot load the SDXL-type pipeline from {source!r} (a hub id or a folder with unet/, vae/, "
                f"scheduler/, tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/): {exc}"
            ) from exc
        scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing")
        prompt = encode_empty_prompt(tokenizers, [e.eval() for e in encoders])
        del encoders  # only the cached embeddings are needed from here on
        return cls(unet, vae, scheduler, prompt, **kwargs)

    @property
    def token_grid(self) -> tuple[int, int]:
        """(h, w) of the hooked layer's token map."""
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_down = 2 ** (len(self.unet.config.block_out_channels) - 1)
        side = self.resolution // down // unet_down
        return side, side

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, R, R) images in [0, 1] -> VAE posterior mean x scaling_factor, (B, 4, R/8, R/8) float32."""
        x = (2.0 * images - 1.0).to(self.device, vae_compute_dtype(self.vae_dtype))
        return self.vae.encode(x).latent_dist.mean.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def hooked_tokens(self, latents: Tensor, early_stop: bool = True) -> Tensor:
        """Output of the hooked self-attention for noisy latents (B, 4, h, w) -> (B, tokens, C)."""
        captured: list[Tensor] = []

        def hook(module, args, output):
            captured.append(output)
            if early_stop:
                raise _HookedLayerReached

        batch = latents.shape[0]
        handle = self.layer.register_forward_hook(hook)
        try:
            self.unet(
                latents.to(self.device, self.unet_dtype),
                torch.full((batch,), self.timestep, device=self.device, dtype=torch.long),
                encoder_hidden_states=self.prompt_states.expand(batch, -1, -1),
                added_cond_kwargs={k: v.expand(batch, -1) for k, v in self.added_cond.items()},
            )
        except _HookedLayerReached:
            pass
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"the hooked layer {HOOKED_LAYER} ran {len(captured)} times, expected once"
            )
        return captured[0]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [0, 1] -> L2-normalised tokens (B, h*w, C) float32."""
        size = (self.resolution, self.resolution)
        if images.shape[-2:] != size:
            images = F.interpolate(
                images.float(), size=size, mode="bilinear", align_corners=False,
                antialias=self.antialias,
            )
        z0 = self.encode(images.clamp(0.0, 1.0))
        zt = add_noise(z0, self.noise.expand_as(z0), self.alpha_bar)
        return F.normalize(self.hooked_tokens(zt).float(), dim=-1)


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """Random-init SDXL-structured pipeline parts, small enough for a CPU (tests, offline demos).

    Same block structure as SDXL / SSD-1B: down blocks DownBlock2D, CrossAttnDownBlock2D,
    CrossAttnDownBlock2D; two CLIP text encoders (the second with a projection); "text_time"
    conditioning; an 8x-downsampling VAE; the UNet downsamples 4x, so resolution R gives (R/32)^2 tokens.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    text = dict(
        vocab_size=len(vocab), intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=24,  # 8 + 16: the two text encoders' widths
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            scaling_factor=0.13025,
        )
        encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, **text))
        encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=16, projection_dim=16, **text)
        )
    return {
        "unet": unet,
        "vae": vae,
        "scheduler": DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="trailing",
        ),
        "tokenizer": CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        "tokenizer_2": CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        "text_encoder": encoder.eval(),
        "text_encoder_2": encoder_2.eval(),
    }


def tiny_extractor(weights_seed: int = 0, parts: dict[str, Any] | None = None,
                   **kwargs: Any) -> DiffCutFeatureExtractor:
    """DiffCut on a random-init SDXL-structured pipeline: the one builder of the tiny DiffCut.

    ``parts`` (default: ``tiny_sdxl_components(weights_seed)``) are the pipeline's modules; the
    empty prompt is encoded from its tokenizers and text encoders, and ``kwargs`` go to
    :class:`DiffCutFeatureExtractor` (resolution, ``seed`` of the noise, device, dtypes, ...).
    The extractor casts and moves the UNet and VAE it is given, in place.
    """
    parts = tiny_sdxl_components(weights_seed) if parts is None else parts
    prompt = encode_empty_prompt([parts["tokenizer"], parts["tokenizer_2"]],
                                 [parts["text_encoder"], parts["text_encoder_2"]])
    return DiffCutFeatureExtractor(parts["unet"], parts["vae"], parts["scheduler"], prompt,
                                   **kwargs)
