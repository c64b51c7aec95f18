"""Per-batch work of the labeling stages: decode, segment + pool, pseudo-label. No Ray here.

Batches are dicts of equal-length numpy columns (Ray Data's "numpy" batch format); images of
different sizes travel as object arrays. The Ray wiring is in ``labeling/pipeline.py``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from labeling.config import LabelConfig
from labeling.pseudo_classes import class_areas, pool_segment_features, pseudo_label_map
from shared import storage
from shared.images import decode_image, decode_png, encode_png, resize_image, to_tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_images(root: str) -> list[tuple[str, str]]:
    """(image_id, uri) of every image below ``root``, sorted; the id is the relative path sans extension."""
    fs, base = storage.url_to_fs(root)
    if not fs.exists(base):
        raise FileNotFoundError(f"image folder not found: {root}")
    found = sorted(p for p in fs.find(base) if p.lower().endswith(IMAGE_EXTENSIONS))
    out = []
    for path in found:
        rel = posixpath.relpath(path, base.rstrip("/")) if base else path
        out.append((posixpath.splitext(rel)[0], storage.join(root, rel)))
    return out


def object_column(items: list[Any]) -> np.ndarray:
    """A 1-D object array holding ``items`` as they are (numpy would stack equal-shaped arrays)."""
    col = np.empty(len(items), dtype=object)
    col[:] = items
    return col


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Read and decode each ``uri``; a failure marks the row status="error" with the reason."""
    images, status, errors = [], [], []
    for uri in batch["uri"]:
        try:
            images.append(decode_image(storage.read_bytes(str(uri)), name=str(uri)))
            status.append("ok")
            errors.append("")
        except Exception as exc:  # recorded in the images table, the run goes on
            images.append(np.zeros((1, 1, 3), np.uint8))
            status.append("error")
            errors.append(f"{type(exc).__name__}: {exc}")
    out = dict(batch)
    out["image"] = object_column(images)
    out["status"] = np.array(status, dtype=object)
    out["error"] = np.array(errors, dtype=object)
    return out


@dataclass
class LabelingModels:
    """The segmenter and the encoder of one labeling worker, loaded once."""

    segmenter: Any
    backbone: torch.nn.Module
    device: torch.device
    feature_size: int

    @classmethod
    def load(cls, cfg: LabelConfig, device: str | None = None) -> LabelingModels:
        from shared.backbones import load_backbone

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # random-init (tiny) models must be the same in every actor of every stage
        torch.manual_seed(cfg.seed)
        segmenter = build_segmenter(cfg, dev)
        backbone = load_backbone(cfg.backbone, weights=cfg.weights, tiny=cfg.tiny, device=dev)
        backbone.eval()
        return cls(segmenter, backbone, dev, cfg.feature_size)

    @torch.no_grad()
    def encode(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (B, g, g, D) and global (B, D) features of whole images resized to feature_size."""
        size = (self.feature_size, self.feature_size)
        batch = torch.stack([resize_image(to_tensor(im), size) for im in images]).to(self.device)
        dense, glob = self.backbone.features(batch)
        return dense.float(), glob.float()


def build_segmenter(cfg: LabelConfig, device: torch.device):
    """The configured segmenter; ``tiny`` builds DiffCut on a random-init SDXL-shaped pipeline."""
    from labeling.segmenter import get_segmenter

    if cfg.segmenter != "diffcut":
        return get_segmenter(cfg.segmenter, device=device)
    from labeling.diffcut import DiffCutFeatureExtractor, encode_empty_prompt, tiny_sdxl_components

    dc = cfg.diffcut
    options = dict(resolution=dc.resolution, timestep=dc.timestep, seed=dc.seed, device=device,
                   vae_dtype=getattr(torch, dc.vae_dtype))
    extractor = None
    if cfg.tiny:
        parts = tiny_sdxl_components(seed=cfg.seed)
        prompt = encode_empty_prompt([parts["tokenizer"], parts["tokenizer_2"]],
                                     [parts["text_encoder"], parts["text_encoder_2"]])
        extractor = DiffCutFeatureExtractor(parts["unet"], parts["vae"], parts["scheduler"],
                                            prompt, **options)
        options = {}
    return get_segmenter("diffcut", extractor=extractor, source=dc.model, tau=dc.tau,
                         alpha=dc.alpha, batch_size=cfg.batch_size, use_pamr=dc.pamr, **options)


def segment_batch(models: LabelingModels, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Segments, pooled segment features, segment areas and the global feature of each image."""
    n = len(batch["uri"])
    ok = [i for i in range(n) if batch["status"][i] == "ok"]
    images = [batch["image"][i] for i in ok]
    seg_png = [b""] * n
    pooled = [b""] * n
    areas = [b""] * n
    nseg = np.zeros(n, np.int32)
    height = np.array([im.shape[0] for im in batch["image"]], np.int32)
    width = np.array([im.shape[1] for im in batch["image"]], np.int32)
    glob_out = np.zeros((n, models.backbone.embed_dim), np.float32)
    if ok:
        segmaps = models.segmenter.segment(images)
        dense, glob = models.encode(images)
        for j, i in enumerate(ok):
            seg = torch.from_numpy(segmaps[j].astype(np.int64)).to(models.device)
            s = int(seg.max()) + 1
            feats, area = pool_segment_features(dense[j], seg, s)
            seg_png[i] = encode_png(segmaps[j].astype(np.uint16))
            pooled[i] = feats.cpu().numpy().astype(np.float32).tobytes()
            areas[i] = area.cpu().numpy().astype(np.float32).tobytes()
            nseg[i] = s
            glob_out[i] = glob[j].cpu().numpy()
    return {
        "image_id": batch["image_id"],
        "uri": batch["uri"],
        "shard": batch["shard"],
        "status": batch["status"],
        "error": batch["error"],
        "height": np.where(batch["status"] == "ok", height, 0).astype(np.int32),
        "width": np.where(batch["status"] == "ok", width, 0).astype(np.int32),
        "num_segments": nseg,
        "segments_png": object_column(seg_png),
        "pooled": object_column(pooled),
        "areas": object_column(areas),
        "global": glob_out,
    }


def label_batch(
    models: LabelingModels, centroids: torch.Tensor, batch: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Pseudo-label map (16-bit PNG) and classes present with their areas, for each image."""
    images = list(batch["image"])
    dense, _ = models.encode(images)
    cents = centroids.to(models.device)
    labels_png, class_ids, class_area = [], [], []
    for j, png in enumerate(batch["segments_png"]):
        seg = torch.from_numpy(decode_png(png).astype(np.int64)).to(models.device)
        labels = pseudo_label_map(dense[j], seg, cents)  # (H, W)
        labels_png.append(encode_png(labels.cpu().numpy().astype(np.uint16)))
        ids, area = class_areas(labels)
        class_ids.append(ids.tobytes())
        class_area.append(area.astype(np.float32).tobytes())
    return {
        "image_id": batch["image_id"],
        "shard": batch["shard"],
        "labels_png": object_column(labels_png),
        "class_ids": object_column(class_ids),
        "class_areas": object_column(class_area),
    }
