"""Pretrain the demo's tiny base encoder: dense contrastive learning on unlabeled synthetic scenes.

    python -m demo.pretrain --out demo/weights/vits14-tiny-base.safetensors

Real users start DIP from a pretrained encoder (DINOv2R), whose features already carry structure:
K-means over them gives pseudo-classes that mean something, and post-training sharpens them. A
random-init tiny encoder has no such structure, so the demo starts from this one instead. It is
made without any label: two views of the same scene (crops on the patch grid, each with its own
colour transform) and an InfoNCE loss that asks each patch to find its own counterpart among all
patches of the batch (a dense form of instance discrimination). The scenes are drawn from a seed
stream of their own, so they never coincide with the demo's train or validation scenes. Colours
are random per object in the scenes and per view here, so the features learn shape and texture.

The result is deterministic on a given machine and torch build (seeded, one thread); it is shipped
as a small weight file so the demo needs neither this script's minutes nor a network.
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
import torch
import typer
from torch import nn
from torch.nn import functional as F

app = typer.Typer(add_completion=False, help=__doc__)

PRETRAIN_STREAM = 7_001  # SeedSequence tag of the pretraining scenes (the demo's splits use 0, 1)


def pretraining_scenes(count: int, side: int, seed: int) -> np.ndarray:
    """(count, side, side, 3) uint8 scenes from a seed stream disjoint from the demo's splits."""
    from shared.synthetic import make_scene

    states = np.random.SeedSequence([seed, PRETRAIN_STREAM]).generate_state(count, dtype=np.uint64)
    return np.stack([make_scene(int(s), (side, side))[0] for s in states])


def colour_transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: a random channel permutation, per-channel gain and offset, and grey with p=0.2.
    ``images``: (B, 3, H, W) float in [0, 1]."""
    b = images.shape[0]
    perm = torch.argsort(torch.rand(b, 3, generator=generator), dim=1)
    out = torch.gather(images, 1, perm[:, :, None, None].expand_as(images))
    gain = 0.6 + 0.8 * torch.rand(b, 3, 1, 1, generator=generator)
    offset = 0.3 * (torch.rand(b, 3, 1, 1, generator=generator) - 0.5)
    out = out * gain + offset
    grey = torch.rand(b, 1, 1, 1, generator=generator) < 0.2
    out = torch.where(grey, out.mean(dim=1, keepdim=True).expand_as(out), out)
    return out.clamp(0, 1)


def crop_on_grid(images: torch.Tensor, offsets: torch.Tensor, crop: int, patch: int) -> torch.Tensor:
    """Crops of ``crop`` pixels at patch-grid ``offsets`` (B, 2) (rows, cols in patches)."""
    return torch.stack([img[:, r * patch:r * patch + crop, c * patch:c * patch + crop]
                        for img, (r, c) in zip(images, offsets.tolist(), strict=True)])


def matched_patches(first: torch.Tensor, second: torch.Tensor, off1: torch.Tensor,
                    off2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of the scene patches seen by both views, in the same order: (N, D) twice.

    first/second: (B, g, g, D) dense features of the two views; off1/off2: (B, 2) grid offsets.
    Scene patch (r, c) is view 1's (r - off1) and view 2's (r - off2).
    """
    g = first.shape[1]
    rows = torch.arange(g)
    a, b = [], []
    for i in range(first.shape[0]):
        delta = (off2[i] - off1[i]).tolist()  # view-1 index = view-2 index + delta
        r1 = rows[(rows - delta[0] >= 0) & (rows - delta[0] < g)]
        c1 = rows[(rows - delta[1] >= 0) & (rows - delta[1] < g)]
        a.append(first[i][r1][:, c1].reshape(-1, first.shape[-1]))
        b.append(second[i][r1 - delta[0]][:, c1 - delta[1]].reshape(-1, first.shape[-1]))
    return torch.cat(a), torch.cat(b)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``q`` and of ``k`` are positives, every other row a negative."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = q @ k.T / temperature
    target = torch.arange(q.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def pretrain_base(backbone_name: str = "vits14", steps: int = 1500, batch: int = 32,
                  scenes: int = 2048, crop_patches: int = 8, slack: int = 3,
                  lr: float = 2e-3, temperature: float = 0.1, seed: int = 0,
                  log=print) -> nn.Module:
    """The tiny backbone after ``steps`` of dense contrastive pretraining (see the module doc)."""
    from shared.backbones import load_backbone

    torch.manual_seed(seed)
    backbone = load_backbone(backbone_name, None, tiny=True, device="cpu").train()
    patch = backbone.patch_size
    crop, side = crop_patches * patch, (crop_patches + slack) * patch
    pool = torch.from_numpy(pretraining_scenes(scenes, side, seed)).permute(0, 3, 1, 2)
    dim = backbone.embed_dim
    projector = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
    params = list(backbone.parameters()) + list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        pick = torch.randint(scenes, (batch,), generator=generator)
        images = pool[pick].float() / 255
        off1 = torch.randint(slack + 1, (batch, 2), generator=generator)
        off2 = torch.randint(slack + 1, (batch, 2), generator=generator)
        views = [colour_transform(crop_on_grid(images, off, crop, patch), generator)
                 for off in (off1, off2)]
        dense = backbone.dense_features(torch.cat(views))
        q, k = matched_patches(dense[:batch], dense[batch:], off1, off2)
        loss = info_nce(projector(q), projector(k), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s")
    return backbone.eval()


@app.command()
def main(
    out: Annotated[str, typer.Option(help="weight file to write (.safetensors)")] =
        "demo/weights/vits14-tiny-base.safetensors",
    backbone: Annotated[str, typer.Option(help="registered backbone (its tiny variant)")] = "vits14",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1500,
    batch: Annotated[int, typer.Option(help="scenes per step (two views each)")] = 32,
    seed: Annotated[int, typer.Option(help="seed of the scenes, the init and the views")] = 0,
) -> None:
    """Pretrain the tiny base encoder the demo starts from and write it as safetensors."""
    from shared.backbones import save_backbone

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions, the same file on every run
    try:
        model = pretrain_base(backbone, steps=steps, batch=batch, seed=seed,
                              log=lambda m: typer.echo(m, err=True))
    finally:
        torch.set_num_threads(threads)
    save_backbone(model, out)
    typer.echo(out)


if __name__ == "__main__":
    app()
