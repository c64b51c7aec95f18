"""Training data: (query, positive) pairs of a label set, prepared crops, and in-context tasks.

The data order is a pure function of (seed, epoch) and the support sets of a pure function of
(seed, epoch, step, micro-batch, rank), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from shared.images import load_image, train_geometry
from shared.labelset import LabelSet
from shared.seeds import derive_generator


class EpisodeError(ValueError):
    """The label set cannot feed training (missing images, too few pairs, batch too small)."""


class PairEpisodes(Dataset):
    """Item i = the i-th (query, positive) pair: uint8 crops (3,c,c) and int64 label maps (c,c)."""

    def __init__(self, labels_uri: str, resize: int = 256, crop: int = 224, cache: bool = False,
                 ignore_index: int | None = None):
        self.uri = labels_uri
        self.resize, self.crop = resize, crop
        self.ignore_index = ignore_index
        self.labelset = LabelSet(labels_uri)
        self.num_classes = int(self.labelset.num_classes)
        pairs = self.labelset.pairs()
        if pairs.num_rows == 0:
            raise EpisodeError(f"label set {labels_uri} has no (query, positive) pairs")
        self.query_ids = [str(x) for x in pairs.column("query_id").to_pylist()]
        self.positive_ids = [str(x) for x in pairs.column("positive_id").to_pylist()]
        self.image_uris = self._usable_images()
        self._check_pairs()
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def _usable_images(self) -> dict[str, str]:
        table = self.labelset.images()
        ids = table.column("image_id").to_pylist()
        uris = table.column("uri").to_pylist()
        status = table.column("status").to_pylist()
        return {str(i): str(u) for i, u, s in zip(ids, uris, status, strict=True) if s == "ok"}

    def _check_pairs(self) -> None:
        for row, (q, p) in enumerate(zip(self.query_ids, self.positive_ids, strict=True)):
            for role, image_id in (("query", q), ("positive", p)):
                if image_id not in self.image_uris:
                    raise EpisodeError(
                        f"label set {self.uri}: pair {row} names {role} image {image_id!r}, which "
                        "is not an image of the images table with status 'ok'"
                    )

    def __len__(self) -> int:
        return len(self.query_ids)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The permutation of the pairs used in ``epoch``: a uniform shuffle."""
        return epoch_order(len(self), seed, epoch)

    def load(self, image_id: str) -> tuple[torch.Tensor, np.ndarray]:
        """One image (3,H,W) uint8 and its pseudo-label map (H,W) uint16 at the image's own size."""
        uri = self.image_uris[image_id]
        pixels = np.require(load_image(uri), requirements="W")  # torch wants a writable array
        image = torch.from_numpy(pixels).permute(2, 0, 1)  # (H,W,3) -> (3,H,W) uint8
        labels = self.labelset.label_map(image_id)
        if tuple(labels.shape) != tuple(image.shape[1:]):
            raise EpisodeError(
                f"label set {self.uri}: label map of {image_id!r} is {labels.shape}, but the image "
                f"{uri} is {tuple(image.shape[1:])}"
            )
        return image, labels

    def check_classes(self, image_id: str, values: np.ndarray) -> None:
        """EpisodeError if ``values`` (label values of ``image_id``) hold a class >= K."""
        valid = values if self.ignore_index is None else values[values != self.ignore_index]
        if valid.size and int(valid.max()) >= self.num_classes:
            raise EpisodeError(
                f"label set {self.uri}: pseudo-label map of {image_id!r} holds class "
                f"{int(valid.max())}, but the set has {self.num_classes} classes"
            )

    def prepare(self, image_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Load one image and its pseudo-label map and apply the training geometry jointly."""
        if self._cache is not None and image_id in self._cache:
            return self._cache[image_id]
        image, labels = self.load(image_id)
        self.check_classes(image_id, labels)
        item = crop_item(image, labels, self.resize, self.crop)
        if self._cache is not None:
            self._cache[image_id] = item
        return item

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The items ``indices`` stacked (see :func:`collate`)."""
        return collate([self[i] for i in indices])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        query, query_labels = self.prepare(self.query_ids[index])
        positive, positive_labels = self.prepare(self.positive_ids[index])
        return {
            "query": query,
            "query_labels": query_labels,
            "positive": positive,
            "positive_labels": positive_labels,
        }


def crop_item(image: torch.Tensor, labels: np.ndarray, resize: int, crop: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training geometry of one (3,H,W) uint8 image and its (H,W) map: (3,c,c), (c,c) int64."""
    crop_image, crop_labels = train_geometry(image, torch.from_numpy(labels.astype(np.int64)),
                                             resize, crop)
    return crop_image.contiguous(), crop_labels.contiguous()


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch (images stay uint8; the loop converts them on the device)."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class Batched(Dataset):
    """A dataset with a ``batch(indices)`` method, indexed by lists of indices.

    For a DataLoader with ``sampler=TaskBatches(...)`` and ``batch_size=None``: each micro-batch
    is built in one call, so a dataset can gather it straight into batch tensors.
    """

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.data.batch(indices)


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the pairs used in ``epoch``."""
    gen = derive_generator(seed, 1, epoch)
    return torch.randperm(num_items, generator=gen)


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Optimizer steps per epoch; the last incomplete effective batch is dropped."""
    steps = num_items // batch_size
    if steps == 0:
        raise EpisodeError(f"{num_items} pairs are fewer than one effective batch of {batch_size}")
    return steps


DISTRACTOR_MODES = ("distinct", "released")
RELEASED_DEVICE_BATCH = 4  # the per-device batch of the released code, whose positives it permutes


def check_task_batch(micro_batch_size: int, num_distractors: int, mode: str = "distinct") -> None:
    """Distractors come from the positives of the same per-device batch.

    ``distinct`` draws each task's distractors from the other positives, so it needs a batch of
    at least n + 1; ``released`` works on groups of 4 tasks, so it needs a multiple of 4.
    """
    if mode not in DISTRACTOR_MODES:
        raise EpisodeError(f"unknown distractors mode {mode!r}; expected one of {DISTRACTOR_MODES}")
    if mode == "distinct" and micro_batch_size < num_distractors + 1:
        raise EpisodeError(
            f"a per-device batch of {micro_batch_size} cannot give each task {num_distractors} "
            f"distractors drawn from the other positives: it needs at least {num_distractors + 1}"
        )
    if mode == "released" and micro_batch_size % RELEASED_DEVICE_BATCH:
        raise EpisodeError(
            f"released distractors permute groups of {RELEASED_DEVICE_BATCH} tasks: a per-device "
            f"batch of {micro_batch_size} is not a multiple of {RELEASED_DEVICE_BATCH}"
        )


def sample_support(batch_size: int, num_distractors: int, generator: torch.Generator,
                   mode: str = "distinct") -> torch.Tensor:
    """Support sets (B, 1+n): row i = [i, then the indices of task i's n distractors].

    ``distinct``: n distinct indices != i, drawn without replacement from the batch.
    ``released``: the batch is cut into groups of 4 consecutive tasks; distractor j of task i is
    pi_j(i) for n independent random permutations pi_j of i's group, so a distractor is the
    task's own positive with probability 1/4 and, with n > 3, some distractor always repeats.
    """
    check_task_batch(batch_size, num_distractors, mode)
    if mode == "released":
        return _released_support(batch_size, num_distractors, generator)
    rows = []
    for i in range(batch_size):
        others = torch.randperm(batch_size - 1, generator=generator)[:num_distractors]
        others = others + (others >= i).long()  # skip the task's own positive
        rows.append(torch.cat([torch.tensor([i]), others]))
    return torch.stack(rows)  # (B, 1+n)


def _released_support(batch_size: int, num_distractors: int, generator: torch.Generator):
    """Support sets of the ``released`` mode (see :func:`sample_support`)."""
    g = RELEASED_DEVICE_BATCH
    groups = []
    for start in range(0, batch_size, g):
        perms = [torch.randperm(g, generator=generator) for _ in range(num_distractors)]
        columns = torch.stack(perms, dim=1) if perms else torch.zeros(g, 0, dtype=torch.long)
        own = torch.arange(g)[:, None]  # (g,1)
        groups.append(start + torch.cat([own, columns], dim=1))  # (g, 1+n)
    return torch.cat(groups)  # (B, 1+n)


def support_generator(seed: int, epoch: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator of the support sets of one micro-batch (independent of any global state)."""
    return derive_generator(seed, 2, epoch, step, micro, rank)


class TaskBatches:
    """Per-rank index lists of micro-batches, from global step ``start_step`` to the end of training.

    Global step g of epoch e = g // steps_per_epoch uses order[s*B : (s+1)*B] (s = g mod steps),
    split into accumulation micro-batches of (world x micro) and then into ranks. ``order(seed,
    epoch)`` gives the permutation of an epoch (default :func:`epoch_order`); it must be a pure
    function of its arguments, so that a resumed run sees the batches it would have seen.
    """

    def __init__(
        self,
        num_items: int,
        seed: int,
        batch_size: int,
        micro_batch_size: int,
        world_size: int,
        rank: int,
        total_steps: int,
        start_step: int = 0,
        order: Callable[[int, int], torch.Tensor] | None = None,
    ):
        self.num_items, self.seed = num_items, seed
        self.order = order or (lambda seed, epoch: epoch_order(num_items, seed, epoch))
        self.batch_size, self.micro = batch_size, micro_batch_size
        self.world_size, self.rank = world_size, rank
        self.steps = steps_per_epoch(num_items, batch_size)
        self.accum = batch_size // (micro_batch_size * world_size)
        self.total_steps, self.start_step = total_steps, start_step

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum

    def position(self, k: int) -> tuple[int, int, int]:
        """(epoch, global step, micro index) of the k-th micro-batch this object yields."""
        step, micro = divmod(k, self.accum)
        step += self.start_step
        return step // self.steps, step, micro

    def __iter__(self) -> Iterator[list[int]]:
        order, order_epoch = None, -1
        for k in range(len(self)):
            epoch, step, micro = self.position(k)
            if epoch != order_epoch:
                order, order_epoch = self.order(self.seed, epoch), epoch
            begin = (step % self.steps) * self.batch_size
            begin += (micro * self.world_size + self.rank) * self.micro
            yield order[begin : begin + self.micro].tolist()
