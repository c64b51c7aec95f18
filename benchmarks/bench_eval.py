"""In-context evaluation throughput: memory-bank build images/s, and search queries/s for a
bank of N patches with every backend, with peak host memory.

Bank build: synthetic scenes (written under --workdir), the real builder (in-process executor,
so the figure is one worker's; a Ray job scales it by the number of workers), fp16 shards.
Search: a random fp16 bank of --bank-patches x --dim patches, written to disk (--workdir) in
shards of --shard-patches and streamed back (the first --cache-gib kept in memory, on the GPU
with --cache-on-device); --queries query patches; exact top-k with torch (float32, and float16
+ float32 re-scoring on GPUs) and faiss (flat), optionally faiss IVF; then the streamed label
transfer of --classes-wide values. Peak RSS shows the host memory stays bounded.

    python benchmarks/bench_eval.py --tiny --build-images 32 --bank-patches 200000 --dim 384
    python benchmarks/bench_eval.py --backbone vits14 --build-images 64 --input-size 504
    python benchmarks/bench_eval.py --bank-patches 10240000 --dim 384 --queries 1000000 \\
        --shard-patches 1048576 --device cuda --skip-build --skip-faiss \\
        --cache-on-device --cache-gib 40 --workdir /tmp/bench    # full size on a GPU
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch

from evaluation.bank import FORMAT, MANIFEST, MemoryBank, encoder_identity, write_shard
from evaluation.config import MemoryConfig
from evaluation.memory import BankSpec, DatasetRef, EncoderRef, build_memory_bank
from evaluation.search import FaissIVFSearch, FaissSearch, TorchSearch, transfer_from_shards
from shared import storage
from shared.backbones import load_backbone, save_backbone
from shared.devices import default_device
from shared.synthetic import write_synthetic_dataset


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_build(args, device: torch.device) -> dict:
    """Images/s of the bank builder on synthetic scenes at the given input size."""
    work = args.workdir or tempfile.mkdtemp(prefix="bench-eval-")
    data = write_synthetic_dataset(f"{work}/data", num_train=args.build_images, num_val=1,
                                   size=(args.image_size, args.image_size))
    torch.manual_seed(0)
    # random init: throughput does not depend on the weights, and no download is needed
    backbone = load_backbone(args.backbone, None, tiny=args.tiny, device=device)
    weights = f"{work}/encoder.safetensors"
    save_backbone(backbone, weights)
    cfg = MemoryConfig(size=args.build_images * 2 * 500, executor="local",
                       images_per_shard=args.build_images, batch_size=args.batch)
    spec = BankSpec(EncoderRef(args.backbone, weights, args.tiny), encoder_identity(backbone),
                    DatasetRef("synthetic", data, "train"), tuple(range(args.build_images)),
                    args.input_size, cfg.model_dump(mode="json"), 0, "segmentation", 6)
    start = time.perf_counter()
    bank = build_memory_bank(spec, f"{work}/bank-{time.time_ns()}", cfg, log=lambda m: None)
    seconds = time.perf_counter() - start
    return {"images": args.build_images, "epochs": cfg.epochs, "seconds": seconds,
            "images_per_s": args.build_images / seconds, "patches": bank.size}


def write_random_bank(uri: str, n: int, dim: int, shard: int, classes: int) -> MemoryBank:
    """A bank of n random unit fp16 features and random histograms, written shard by shard
    (only one shard is ever in memory)."""
    gen = torch.Generator().manual_seed(0)
    shards = []
    for index, offset in enumerate(range(0, n, shard)):
        rows = min(shard, n - offset)
        feats = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=1)
        values = torch.rand(rows, classes, generator=gen)
        write_shard(uri, index, feats.half().numpy(), values.half().numpy(), {"bench": True})
        shards.append({"index": index, "count": rows})
    storage.write_json(storage.join(uri, MANIFEST), {
        "format": FORMAT, "encoder": {"bench": "random"}, "shards": shards, "total": n,
        "num_values": classes, "input_size": None})
    return MemoryBank(uri)


def bench_search(args, device: torch.device) -> list[dict]:
    """Queries/s of each backend against one fp16 bank on disk, streamed shard by shard (the
    first --cache-gib of it kept in memory); transfer time on top."""
    work = args.workdir or tempfile.mkdtemp(prefix="bench-eval-")
    bank = write_random_bank(f"{work}/random-bank-{time.time_ns()}", args.bank_patches, args.dim,
                             args.shard_patches, args.classes)
    bank.cache_bytes = int(args.cache_gib * 2**30)
    bank.device_cache_bytes = int(args.cache_gib * 2**30) if args.cache_on_device else 0
    queries = torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(1))
    shard_device = device if args.cache_on_device else torch.device("cpu")
    backends = [(f"torch-{name}", TorchSearch(k=args.k, device=device,
                                              query_chunk=args.query_chunk,
                                              dtype=getattr(torch, name)))
                for name in args.torch_dtypes.split(",")]
    if not args.skip_faiss:
        backends.append(("faiss", FaissSearch(k=args.k)))
    if args.ivf:
        backends.append(("faiss_ivf", FaissIVFSearch(k=args.k, nlist=args.nlist,
                                                     nprobe=args.nprobe)))
    rows, reference = [], None
    for name, searcher in backends:
        if name == "faiss_ivf":
            t0 = time.perf_counter()
            searcher.build(bank.feature_shards())
            build_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            shards = bank.feature_shards(shard_device if name.startswith("torch") else None)
            sims, idx = searcher.search(queries, shards)
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds = min(times)  # the machine may be shared: the fastest repeat is the cleanest
        t0 = time.perf_counter()
        transfer_from_shards(sims, idx, bank.value_shards(), args.classes, 0.07)
        transfer_s = time.perf_counter() - t0
        row = {"backend": name, "seconds": seconds, "queries_per_s": args.queries / seconds,
               "transfer_s": transfer_s, "peak_rss_gib": peak_rss_gib()}
        if reference is None:
            reference = idx
        else:
            row["top1_agreement"] = float((idx[:, 0] == reference[:, 0]).float().mean())
        if name == "faiss_ivf":
            row["index_build_s"] = build_s
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="vits14")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--build-images", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128, help="synthetic scene side")
    parser.add_argument("--input-size", type=int, default=504)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--bank-patches", type=int, default=200_000, help="N")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shard-patches", type=int, default=65_536)
    parser.add_argument("--queries", type=int, default=4096)
    parser.add_argument("--query-chunk", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--skip-faiss", action="store_true", help="no exact faiss timing")
    parser.add_argument("--ivf", action="store_true", help="also time the approximate IVF index")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--cache-on-device", action="store_true",
                        help="keep bank shards in GPU memory (up to --cache-gib)")
    parser.add_argument("--cache-gib", type=float, default=0.0,
                        help="bank kept in memory between passes (0: stream from disk)")
    parser.add_argument("--torch-dtypes", default=None,
                        help="torch matmul dtypes, e.g. float32,float16 (default: float32 on "
                             "CPU, float32,float16 on CUDA; low precision = re-scored exactly)")
    parser.add_argument("--device", default=str(default_device()))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="search timings: best of n")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.torch_dtypes is None:
        args.torch_dtypes = "float32,float16" if device.type == "cuda" else "float32"
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    if not args.skip_build:
        b = bench_build(args, device)
        size = "tiny" if args.tiny else "full"
        print(f"\nbank build ({args.backbone} {size}, {args.input_size}px, {b['epochs']} epochs):"
              f" {b['images']} images in {b['seconds']:.2f}s = {b['images_per_s']:.2f} images/s,"
              f" {b['patches']} patches, peak RSS {peak_rss_gib():.2f} GiB")
    if args.skip_search:
        return
    rows = bench_search(args, device)
    print(f"\nsearch: bank {args.bank_patches} x {args.dim} fp16 on disk in shards of "
          f"{args.shard_patches} ({args.cache_gib} GiB cached), {args.queries} queries, "
          f"k={args.k}")
    print("| backend | seconds | queries/s | transfer s | top-1 agree | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        agree = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else "ref"
        print(f"| {r['backend']} | {r['seconds']:.3f} | {r['queries_per_s']:.0f} | "
              f"{r['transfer_s']:.3f} | {agree} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
