"""Packed training input: the crops and label maps of a label set, prepared once, read in shards.

The training geometry has no randomness (Resize + CenterCrop, no augmentation), so every image a
pair names is prepared once, with exactly :meth:`PairEpisodes.prepare`, and stored bit for bit.
Layout of one pack at ``<root>/<key>/`` (root: ``<labels>/packed`` unless given; key: the label
set's fingerprint, the geometry, the shard size and the packed images, hashed):

    shards/shard-00000.images.npy   uint8 (n, 3, c, c) crops
    shards/shard-00000.labels.npy   uint8 (n, c, c) label maps, uint16 when a value exceeds 255
    done/shard-00000.json           shard marker, written after both blobs: ids, dtypes, offsets
    index.parquet                   image_id, shard, row
    pack.json                       identity and per-shard summary; written last: pack complete

Why raw ``.npy`` blobs: reading costs a copy, no decoding; NumPy reads the header (dtype,
shape) without this module; a local pack is memory-mapped, so every loader worker shares one page
cache instead of holding its own copy; and rows have a fixed size at a known offset, so a single
image of another shard is one ranged read from object storage. Nothing is compressed: lossless
codecs gain little on natural-image crops and would cost more CPU than the whole read.

Images go to shards in the order of a hash of their id, so a shard is a random sample of the set
whatever the listing order (scene folders, cities) was. See :func:`window_order` for the shuffle.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import Dataset
from tqdm import tqdm

from shared import storage
from shared.seeds import derive_generator
from shared.storage_policy import call
from training.episodes import PairEpisodes, crop_item

FORMAT_VERSION = 1
PARTS = ("images", "labels")


class PackError(ValueError):
    """A packed input cannot be built or read (foreign, incomplete, Ray missing); names the URI."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _hash_key(image_id: str) -> tuple[bytes, str]:
    return hashlib.blake2b(image_id.encode(), digest_size=8).digest(), image_id


def pack_plan(source: PairEpisodes, shard_size: int) -> list[list[str]]:
    """Image ids per shard: every image a pair names, in hash order, ``shard_size`` per shard."""
    ids = sorted(set(source.query_ids) | set(source.positive_ids), key=_hash_key)
    return [ids[i : i + shard_size] for i in range(0, len(ids), shard_size)]


def pack_identity(source: PairEpisodes, plan: list[list[str]], shard_size: int) -> dict:
    """What a pack's bytes depend on; two label sets sharing a fingerprint differ in ``images``."""
    digest = hashlib.sha256("\n".join(i for ids in plan for i in ids).encode()).hexdigest()
    return {"format_version": FORMAT_VERSION, "labelset_fingerprint": source.labelset.meta.get(
        "fingerprint"), "resize": source.resize, "crop": source.crop, "shard_size": shard_size,
        "images": digest[:32]}


def pack_uri(labels_uri: str, identity: dict, root: str | None = None) -> str:
    """``<root>/<key>``: readable geometry, then a hash of the whole identity."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    key = (f"r{identity['resize']}-c{identity['crop']}-s{identity['shard_size']}-"
           f"{hashlib.sha256(text.encode()).hexdigest()[:16]}")
    return storage.join(root or storage.join(labels_uri, "packed"), key)


# --------------------------------------------------------------------------- building


def prepare_shard(source: PairEpisodes, ids: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Crops (n,3,c,c) uint8, label maps (n,c,c) uint8|uint16, and values >= K per image id."""
    c = source.crop
    images = np.empty((len(ids), 3, c, c), np.uint8)
    labels = np.empty((len(ids), c, c), np.uint16)  # label maps are uint16 PNGs: always fits
    beyond = {}
    for row, image_id in enumerate(ids):
        image, label_map = source.load(image_id)
        high = np.unique(label_map[label_map >= source.num_classes])
        if high.size:  # checked against the run's ignore_index when the pack is opened
            beyond[image_id] = high.tolist()
        crop, crop_labels = crop_item(image, label_map, source.resize, source.crop)
        images[row] = crop.numpy()
        labels[row] = crop_labels.numpy()
    if labels.size and int(labels.max()) <= 255:
        labels = labels.astype(np.uint8)
    return images, labels, beyond


def _write_npy(uri: str, array: np.ndarray) -> dict:
    with storage.atomic_open(uri, "wb") as handle:
        np.lib.format.write_array(handle, array, allow_pickle=False)
        end = handle.tell()
    return {"dtype": array.dtype.str, "shape": list(array.shape), "offset": end - array.nbytes}


def write_shard(uri: str, shard: int, ids: list[str], source: PairEpisodes) -> dict:
    """Prepare and write one shard; its marker, written last, commits it. Returns the marker."""
    images, labels, beyond = prepare_shard(source, ids)
    marker = {"shard": shard, "ids": ids, "beyond": beyond}
    for part, array in zip(PARTS, (images, labels), strict=True):
        marker[part] = _write_npy(storage.join(uri, "shards", f"{shard_name(shard)}.{part}.npy"),
                                  array)
    storage.write_json(storage.join(uri, "done", f"{shard_name(shard)}.json"), marker)
    return marker


def _claim(uri: str, identity: dict) -> None:
    """Record the identity before any shard, so a resume never mixes shards of two packs."""
    progress = storage.join(uri, "_identity.json")
    if not storage.exists(progress):
        storage.write_json(progress, identity)
    stored = storage.read_json(progress)
    if stored != identity:
        raise PackError(f"{uri} holds a packed input of another label set or geometry "
                        f"({stored} != {identity}); remove it or choose another packed_root")


def _done_markers(uri: str, plan: list[list[str]]) -> dict[int, dict]:
    found = storage.glob(storage.join(uri, "done", "shard-*.json"))
    markers = {m["shard"]: m for m in (json.loads(b) for b in storage.read_many(found))}
    for shard, marker in markers.items():
        if shard >= len(plan) or marker["ids"] != plan[shard]:
            raise PackError(f"{uri}: shard marker {shard_name(shard)} lists other images than "
                            "this label set packs; the folder was written by something else")
    return markers


def _build_on_ray(uri: str, todo: list[int], plan: list[list[str]], source: PairEpisodes, bar):
    import ray  # only when asked for: local builds need no Ray

    if not ray.is_initialized():
        raise PackError(f"packing {uri} with Ray was asked for, but Ray is not initialised "
                        "(call ray.init first, or build locally)")
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    source_ref = ray.put(source)
    pending = [task.remote(uri, s, plan[s], source_ref) for s in todo]
    markers = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        markers.append(ray.get(ready[0]))
        bar.update(1)
    return markers


def build_pack(source: PairEpisodes, uri: str, plan: list[list[str]], identity: dict,
               use_ray: bool = False, progress: bool = True) -> dict:
    """Write the shards that are missing (resumable per shard), then the index and ``pack.json``.

    Locally one shard at a time, or as one Ray task per shard with ``use_ray``. Concurrent
    builders of one pack write the same bytes (every write is atomic), so a race costs time only.
    """
    _claim(uri, identity)
    markers = _done_markers(uri, plan)
    todo = [s for s in range(len(plan)) if s not in markers]
    with tqdm(total=len(plan), initial=len(markers), desc="pack", unit="shard",
              disable=not progress) as bar:
        if use_ray:
            new = _build_on_ray(uri, todo, plan, source, bar)
        else:
            new = []
            for shard in todo:
                new.append(write_shard(uri, shard, plan[shard], source))
                bar.update(1)
    markers.update({m["shard"]: m for m in new})
    ordered = [markers[s] for s in range(len(plan))]
    index = pa.table({
        "image_id": pa.array([i for m in ordered for i in m["ids"]], pa.string()),
        "shard": pa.array(np.repeat(np.arange(len(plan)), [len(m["ids"]) for m in ordered]),
                          pa.int32()),
        "row": pa.array(np.concatenate([np.arange(len(m["ids"])) for m in ordered]), pa.int32()),
    })
    storage.write_parquet(storage.join(uri, "index.parquet"), index)
    doc = {"identity": identity, "num_images": index.num_rows,
           "shards": [{k: v for k, v in m.items() if k != "ids"} for m in ordered]}
    storage.write_json(storage.join(uri, "pack.json"), doc)
    return doc


# --------------------------------------------------------------------------- reading


class PackedImages:
    """Read access to a complete pack: image id -> (shard, row) -> uint8 crop, int64 label map.

    A local pack is memory-mapped. From object storage, up to ``resident`` whole shards are held
    (one sequential read each); a row of any other shard is fetched with ranged reads.
    """

    def __init__(self, uri: str, resident: int = 4):
        self.uri, self.resident = uri, resident
        try:
            self.meta = storage.read_json(storage.join(uri, "pack.json"))
        except FileNotFoundError:
            raise PackError(f"{uri} is not a complete packed input: pack.json is missing "
                            "(not built yet, or the build was interrupted)") from None
        table = storage.read_parquet(storage.join(uri, "index.parquet"))
        self.rows = dict(zip(table.column("image_id").to_pylist(), zip(
            table.column("shard").to_pylist(), table.column("row").to_pylist(), strict=True),
            strict=True))
        self.local = isinstance(storage.url_to_fs(uri)[0], LocalFileSystem)
        self._reset()

    def _reset(self) -> None:
        self._shards: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict:  # picklable for loader workers; each maps or reads anew
        return {k: v for k, v in self.__dict__.items() if k != "_shards"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def num_shards(self) -> int:
        return len(self.meta["shards"])

    def blob_uri(self, shard: int, part: str) -> str:
        return storage.join(self.uri, "shards", f"{shard_name(shard)}.{part}.npy")

    def _load(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = []
        for part in PARTS:
            info, uri = self.meta["shards"][shard][part], self.blob_uri(shard, part)
            if self.local:
                arrays.append(np.load(storage.url_to_fs(uri)[1], mmap_mode="r"))
            else:  # one sequential read; the array is a read-only view of the bytes
                arrays.append(np.frombuffer(storage.read_bytes(uri), info["dtype"],
                                            offset=info["offset"]).reshape(info["shape"]))
        return arrays[0], arrays[1]

    def shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Crops and label maps of one shard, kept among the ``resident`` most recent."""
        if shard in self._shards:
            self._shards.move_to_end(shard)
        else:
            self._shards[shard] = self._load(shard)
            # local maps cost no memory, only a descriptor each: keep more of them
            while len(self._shards) > (self.resident if not self.local else 64):
                self._shards.popitem(last=False)
        return self._shards[shard]

    def _locate(self, image_id: str) -> tuple[int, int]:
        if image_id not in self.rows:
            raise PackError(f"image {image_id!r} is not in the packed input {self.uri}")
        return self.rows[image_id]

    @property
    def label_dtype(self) -> torch.dtype:
        """The dtype of the label maps :meth:`gather` returns."""
        stored = {summary["labels"]["dtype"] for summary in self.meta["shards"]}
        return torch.uint8 if stored <= {"|u1"} else torch.int32

    def gather(self, image_ids: list[str], whole: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops (n,3,c,c) uint8 and label maps (n,c,c) of ``image_ids``, in that order.

        Label maps come as uint8 when every shard stores them so, else int32 (torch has few
        uint16 operations): 8x or 2x fewer bytes per batch than int64, widened on the device.

        ``whole``: load each image's shard whole (the order keeps them few). Otherwise rows of
        shards not held are fetched with concurrent ranged reads (local packs are mapped anyway).
        """
        where = [self._locate(i) for i in image_ids]
        c = self.meta["identity"]["crop"]
        images = torch.empty((len(where), 3, c, c), dtype=torch.uint8)
        labels = torch.empty((len(where), c, c), dtype=self.label_dtype)
        out_images, out_labels = images.numpy(), labels.numpy()  # views: numpy copies and casts
        far = [] if whole or self.local else [k for k, (s, _) in enumerate(where)
                                             if s not in self._shards]
        for k, (image, label_map) in zip(far, self._read_rows([where[k] for k in far]),
                                         strict=True):
            out_images[k], out_labels[k] = image, label_map
        for k in sorted(set(range(len(where))) - set(far)):
            shard, row = where[k]
            shard_images, shard_labels = self.shard(shard)
            out_images[k], out_labels[k] = shard_images[row], shard_labels[row]
        return images, labels

    def _read_rows(self, rows: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        if not rows:
            return []
        uris, starts, ends, infos = [], [], [], []
        for shard, row in rows:
            for part in PARTS:
                info = self.meta["shards"][shard][part]
                size = int(np.prod(info["shape"][1:])) * np.dtype(info["dtype"]).itemsize
                uris.append(self.blob_uri(shard, part))
                starts.append(info["offset"] + row * size)
                ends.append(starts[-1] + size)
                infos.append(info)
        fs, _ = storage.url_to_fs(self.uri)
        paths = [storage.url_to_fs(u)[1] for u in uris]
        blobs = call("read", f"{uris[0]} (and {len(uris) - 1} more ranges)", fs.cat_ranges,
                     paths, starts, ends)
        arrays = [np.frombuffer(b, i["dtype"]).reshape(i["shape"][1:])
                  for b, i in zip(blobs, infos, strict=True)]
        return [(arrays[k], arrays[k + 1]) for k in range(0, len(arrays), 2)]


def window_order(item_shard: np.ndarray, num_shards: int, seed: int, epoch: int,
                 window: int) -> torch.Tensor:
    """The permutation of the items (pairs) used in ``epoch``; item i lives in shard item_shard[i].

    The shards are permuted (seeded by (seed, epoch)) and cut into windows of ``window``
    consecutive shards; the items of each window are permuted uniformly; the windows follow one
    another. Every item appears exactly once, and a reader needs only one window of shards at a
    time. Distance from a uniform shuffle: an epoch is num_shards / window blocks, each a uniform
    shuffle of the pairs of window x shard_size images (a random sample of the set, since images
    go to shards by a hash of their id). Two pairs of the same window land in the same effective
    batch of B with probability about B / (pairs of the window) instead of B / (all pairs); pairs
    of different windows never do. A query's own pairs share its shard, so they meet in a batch
    that much more often (ViT-S defaults, 5 pairs per image: about 2% instead of 0.07% on COCO).
    """
    gen = derive_generator(seed, 3, epoch)
    shard_order = torch.randperm(num_shards, generator=gen).tolist()
    grouped = torch.from_numpy(np.argsort(item_shard, kind="stable"))  # items by shard
    starts = np.concatenate([[0], np.cumsum(np.bincount(item_shard, minlength=num_shards))])
    blocks = []
    for w in range(0, num_shards, window):
        members = torch.cat([grouped[starts[s] : starts[s + 1]] for s in shard_order[w : w + window]])
        blocks.append(members[torch.randperm(len(members), generator=gen)])
    return torch.cat(blocks)


class PackedEpisodes(Dataset):
    """The items of :class:`PairEpisodes` (same pairs, same tensors) served from a pack."""

    def __init__(self, source: PairEpisodes, images: PackedImages, window: int = 4):
        self.uri, self.num_classes = source.uri, source.num_classes
        self.query_ids, self.positive_ids = source.query_ids, source.positive_ids
        self.images, self.window = images, window
        self.query_shard = np.array([images.rows[q][0] for q in self.query_ids], np.int64)
        _check_classes(source, images)

    def __len__(self) -> int:
        return len(self.query_ids)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The permutation of the pairs used in ``epoch`` (see :func:`window_order`)."""
        return window_order(self.query_shard, self.images.num_shards, seed, epoch, self.window)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The items ``indices`` stacked: queries from whole shards, positives where they lie."""
        query, query_labels = self.images.gather([self.query_ids[i] for i in indices])
        positive, positive_labels = self.images.gather([self.positive_ids[i] for i in indices],
                                                       whole=False)
        return {"query": query, "query_labels": query_labels, "positive": positive,
                "positive_labels": positive_labels}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.batch([index]).items()}


def _check_classes(source: PairEpisodes, images: PackedImages) -> None:
    """The class check of :meth:`PairEpisodes.prepare`, on the values >= K recorded per image."""
    for summary in images.meta["shards"]:
        for image_id, values in summary["beyond"].items():
            source.check_classes(image_id, np.asarray(values))


def packed_episodes(source: PairEpisodes, root: str | None = None, shard_size: int = 1024,
                    window: int = 4, use_ray: bool = False, build: bool = True,
                    progress: bool = True) -> PackedEpisodes:
    """The pack of ``source`` (built first when missing and ``build``), as a training dataset."""
    plan = pack_plan(source, shard_size)
    identity = pack_identity(source, plan, shard_size)
    uri = pack_uri(source.uri, identity, root)
    if not storage.exists(storage.join(uri, "pack.json")):
        if not build:
            raise PackError(f"packed input {uri} is not built (rank 0 or the driver builds it)")
        build_pack(source, uri, plan, identity, use_ray, progress)
    images = PackedImages(uri, resident=window)
    if images.meta["identity"] != identity:
        raise PackError(f"{uri}/pack.json was made for {images.meta['identity']}, not {identity}")
    return PackedEpisodes(source, images, window)


__all__ = ["PackError", "PackedEpisodes", "PackedImages", "build_pack",
           "pack_identity", "pack_plan", "pack_uri", "packed_episodes", "window_order"]
