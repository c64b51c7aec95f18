"""Dense features of evaluation images: the one loop that feeds views to an encoder in batches.

Used by the memory-bank builder (augmented views of memory images), the in-context queries and
the linear probe (whole images resized to S x S). Decoding runs in threads a bounded number of
images ahead of the encoder, so host memory holds a few batches whatever the dataset size.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from shared.images import eval_geometry, to_tensor

Item = TypeVar("Item")
Result = TypeVar("Result")


def threaded_map(fn: Callable[[Item], Result], items: Iterable[Item], threads: int = 4,
                 ahead: int = 32) -> Iterator[Result]:
    """``fn`` of each item, in order, computed in ``threads`` threads at most ``ahead`` items
    ahead of the consumer."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > max(1, ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def dense_batches(backbone, views: Iterable[tuple[torch.Tensor, Any]], batch_size: int,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, list]]:
    """(image (3, S, S), payload) pairs, ``batch_size`` at a time through the encoder.

    Yields per batch the dense features (B, h, w, D) as the encoder returns them (on
    ``device``, computed in inference mode) and the payloads of the batch's views, in order.
    """
    views = iter(views)
    while chunk := list(itertools.islice(views, batch_size)):
        with torch.inference_mode():
            batch = torch.stack([image for image, _ in chunk]).to(device)  # (B, 3, S, S)
            dense = backbone.dense_features(batch)  # (B, h, w, D)
        yield dense, [payload for _, payload in chunk]


def resized_view(dataset, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (3, S, S) and target (S, S) of dataset item ``index``, the whole image resized."""
    image, target = dataset.load(int(index))
    return eval_geometry(to_tensor(image), torch.from_numpy(target), size)


def encode_resized(backbone, dataset, indices: Sequence[int], size: int, batch_size: int,
                   device: torch.device, normalize: Callable[[torch.Tensor], torch.Tensor],
                   threads: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, h, w, D) and targets (N, S, S) of the whole images at ``indices`` resized
    to (S, S); ``normalize`` turns each batch's dense features into what is kept (on the CPU)."""
    views = threaded_map(lambda i: resized_view(dataset, i, size), indices, threads,
                         ahead=2 * batch_size)
    feats, targets = [], []
    for dense, batch_targets in dense_batches(backbone, views, batch_size, device):
        feats.append(normalize(dense))
        targets.append(torch.stack(batch_targets))
    if not feats:
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: no images to encode")
    return torch.cat(feats), torch.cat(targets)
