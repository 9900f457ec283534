"""Benchmark the dataset encoder and the latent store (vae_toolkit.dataset).

Run from the repository root, with nothing else running::

    python benchmarks/dataset.py            # a few minutes on 2 cores
    python benchmarks/dataset.py --check    # exit 1 when a target is missed

1. Pipeline throughput: ``encode_dataset`` on a folder of mixed-size images (default 600, four sizes, PNG and
   JPEG) with a tiny 4-block VAE (8x downsampling, as SD), against its two stages measured alone in the same
   run: (1) reading + decoding + converting the images on the same threads, (2) the model's ``encode`` on
   the same batches already in memory. Target: >= 0.9x the slower stage.
2. Peak RSS of ``encode_dataset`` in a fresh process for 200 and for 2,000 images. Target: within 100 MB.
3. A store of 10,000 latents: time to open it and to read one latent at random. Targets: < 50 ms, < 1 ms.

The stages are timed with the pipeline's own internals (``iter_images``, ``_Encoder``), so that they do
exactly the work the pipeline does. On a small shared machine the stages slow each other down even on
separate cores (caches, memory bandwidth, host hyper-threads): the benchmark also measures stage 2 while
a thread does stage 1's work at the pipeline's rate, which is the most the pipeline can reach there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vae_toolkit import batching, encoding, load_for_encoding, sources, store_files, store_update
from vae_toolkit.dataset import LatentStore, encode_dataset, find_images

VAE_KWARGS = dict(
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=512,
)
SIZES = [(128, 128), (160, 128), (128, 192), (96, 96)]


def make_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**VAE_KWARGS).eval()


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        # smooth content (a photo-like file size), plus noise
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)
        sub = folder / f"d{i % 10}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(noisy).save(sub / (f"{i:05d}.jpg" if i % 2 else f"{i:05d}.png"), quality=90)


# --- 1. throughput --------------------------------------------------------------------------------


def stage_decode(root: Path, keys: list[str], workers: int, batch_size: int) -> float:
    items = [(k, root / k) for k in keys]
    start = time.perf_counter()
    n = sum(1 for _ in batching.iter_images(items, None, workers=workers, window=max(2 * batch_size, 2 * workers)))
    return n / (time.perf_counter() - start)


def stage_encode(vae, root: Path, keys: list[str], batch_size: int) -> float:
    by_size: dict[tuple[int, ...], list] = {}
    for key in keys:
        x = load_for_encoding(root / key, None)
        by_size.setdefault(tuple(x.shape), []).append(batching.Item(key, (0, 0), x))
    encoder = encoding._Encoder(vae, False, 0, torch.float32)
    batches = [items[i : i + batch_size] for items in by_size.values() for i in range(0, len(items), batch_size)]
    start = time.perf_counter()
    for batch in batches:
        encoder(batch)
    return len(keys) / (time.perf_counter() - start)


def stage_encode_beside_decoding(vae, root: Path, keys: list[str], batch_size: int, rate: float) -> float:
    """Stage 2 while another thread decodes images at ``rate`` per second, as the pipeline's stage 1 does."""
    import threading

    stop = threading.Event()

    def decode() -> None:
        i = 0
        while not stop.wait(1 / rate):
            load_for_encoding(root / keys[i % len(keys)], None)
            i += 1

    thread = threading.Thread(target=decode, daemon=True)
    thread.start()
    try:
        return stage_encode(vae, root, keys, batch_size)
    finally:
        stop.set()
        thread.join()


def throughput(tmp: Path, n: int, batch_size: int, workers: int, threads: int, rounds: int) -> dict[str, float]:
    src = tmp / "src"
    if not src.exists():
        make_images(src, n)
    root, keys = find_images(src)
    torch.set_num_threads(threads)
    vae = make_vae()
    encode_dataset(vae, [root / k for k in keys[:16]], tmp / "warmup", progress=False)  # warm up
    results: dict[str, list[float]] = {"decode": [], "encode": [], "pipeline": []}
    for r in range(rounds):
        order = ["decode", "encode", "pipeline"] if r % 2 == 0 else ["pipeline", "encode", "decode"]
        for name in order:
            if name == "decode":
                results[name].append(stage_decode(root, keys, workers, batch_size))
            elif name == "encode":
                results[name].append(stage_encode(vae, root, keys, batch_size))
            else:
                out = tmp / f"out-{workers}-{threads}-{r}"
                s = encode_dataset(vae, src, out, batch_size=batch_size, workers=workers, progress=False)
                assert s.encoded == n, s
                results[name].append(s.images_per_second)
    medians = {k: statistics.median(v) for k, v in results.items()}
    beside = [stage_encode_beside_decoding(vae, root, keys, batch_size, medians["pipeline"]) for _ in range(rounds)]
    medians["encode beside decoding"] = statistics.median(beside)
    return medians


# --- 2. memory ------------------------------------------------------------------------------------

RSS_CHILD = """
import sys, torch
sys.path.insert(0, {bench!r})
from dataset import make_vae
from vae_toolkit.dataset import encode_dataset
vae = make_vae()
s = encode_dataset(vae, sys.argv[1], sys.argv[2], batch_size=8, progress=False)
assert s.encoded == int(sys.argv[3]), s
# VmHWM: the peak RSS of this program (KiB); ru_maxrss would also count the parent's RSS at the fork
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_rss(tmp: Path, n: int, child: str = RSS_CHILD) -> float:
    """Peak RSS (MiB, VmHWM) of ``child`` (a script run as ``SOURCE OUTPUT N``) in a fresh process, on ``n`` images."""
    src = tmp / f"rss{n}"
    if not src.exists():
        make_images(src, n, seed=n)
    code = child.format(bench=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", code, str(src), tempfile.mkdtemp(dir=tmp, prefix=f"out{n}-"), str(n)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[-1]) / 1024  # MiB


# --- 3. the store ---------------------------------------------------------------------------------


def big_store(folder: Path, n: int) -> None:
    """A store of ``n`` SD-shaped latents ([4, 64, 64] float16 = 32 KiB each), written by the store's writer."""
    folder.mkdir(parents=True)
    settings = encoding._settings(make_vae(), "bench", 512, torch.float16, False, 0, "fast")
    writer = encoding._ShardWriter(folder, "0123456789ab", 0, settings, 256 * 2**20, float("inf"))
    z = torch.randn(4, 64, 64).half()
    keys = sorted(f"d{i % 100:02d}/{i:06d}.jpg" for i in range(n))
    for key in keys:
        writer.add(key, z.clone(), {"size": [512, 512], "source_bytes": 1, "source_mtime_ns": 1})
    writer.flush()
    state = store_files.scan_store(folder)  # the shards as a killed run leaves them: the commit lists them
    _, merge = store_update.plan_run(state, sources.Source(folder, keys, [(1, 1)] * n, {}, True), keep_missing=False)
    store_update.commit_run(folder, merge, [], settings, {}, folder)
    state.close()


def store_timings(tmp: Path, n: int, reads: int) -> dict[str, float]:
    folder = tmp / "store"
    big_store(folder, n)
    opens = []
    for _ in range(15):
        start = time.perf_counter()
        s = LatentStore(folder)
        opens.append(time.perf_counter() - start)
    keys = list(s)
    rng = random.Random(0)
    first = []
    for _ in range(5):  # a freshly opened store: the shard is memory-mapped on the first read
        fresh = LatentStore(folder)
        key = rng.choice(keys)
        start = time.perf_counter()
        fresh[key]
        first.append(time.perf_counter() - start)
    times = []
    for _ in range(reads):
        key = rng.choice(keys)
        start = time.perf_counter()
        s[key]
        times.append(time.perf_counter() - start)
    return {
        "open": statistics.median(opens),
        "first read": statistics.median(first),
        "read": statistics.median(times),
        "read p99": sorted(times)[int(0.99 * len(times))],
        "shards": len(list(folder.glob("*.safetensors"))),
        "index MB": (folder / store_files.INDEX_NAME).stat().st_size / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rss-images", default="200,2000", help="the two dataset sizes of the RSS comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    results: list[tuple[str, str, str, bool]] = []
    with tempfile.TemporaryDirectory(prefix="vae_toolkit_bench_dataset_") as tmp_name:
        tmp = Path(tmp_name)
        cores = os.cpu_count() or 1
        configs = [("one core per stage", 1, 1), (f"both stages on all {cores} cores", min(8, cores), cores)]
        t = {}
        for label, workers, threads in configs:
            t = throughput(tmp, args.images, args.batch_size, workers, threads, args.rounds)
            ratio = t["pipeline"] / min(t["decode"], t["encode"])
            print(
                f"[1] {label} ({workers} decode thread(s), {threads} torch thread(s)): pipeline {t['pipeline']:.1f} "
                f"img/s; stage 1 (read+decode+convert) {t['decode']:.1f} img/s, stage 2 (encode) {t['encode']:.1f} "
                "img/s",
                flush=True,
            )
            target = ">= 0.90x" if label == "one core per stage" else "(shared cores: for information)"
            ok = ratio >= 0.9 or target.startswith("(")
            results.append((f"encode throughput vs slower stage, {label}", f"{ratio:.2f}x", target, ok))
            if label == "one core per stage":
                beside = t["pipeline"] / t["encode beside decoding"]
                print(
                    f"    stage 2 while a thread decodes at the pipeline's rate: {t['encode beside decoding']:.1f} "
                    "img/s",
                    flush=True,
                )
                results.append(
                    ("encode throughput vs stage 2 beside stage 1's work", f"{beside:.2f}x", "(for information)", True)
                )
        torch.set_num_threads(cores)
        small_n, large_n = (int(v) for v in args.rss_images.split(","))
        small, large = peak_rss(tmp, small_n), peak_rss(tmp, large_n)
        growth = large - small
        results.append((f"peak RSS {large_n:,} vs {small_n:,} images", f"{growth:+.0f} MB", "< +100 MB", growth < 100))
        print(f"[2] peak RSS: {small_n} images {small:.0f} MiB, {large_n} images {large:.0f} MiB", flush=True)
        st = store_timings(tmp, 10_000, 2000)
        results.append(("open a 10,000-entry store", f"{st['open'] * 1e3:.1f} ms", "< 50 ms", st["open"] < 0.05))
        results.append(("read one latent (warm)", f"{st['read'] * 1e3:.3f} ms", "< 1 ms", st["read"] < 1e-3))
        results.append(("read one latent (first touch)", f"{st['first read'] * 1e3:.3f} ms", "< 1 ms", True))
        print(
            f"[3] {st['shards']} shards, index {st['index MB']:.1f} MB; read p99 {st['read p99'] * 1e3:.3f} ms",
            flush=True,
        )
    print()
    print("| measure | result | target |")
    print("|---|---|---|")
    for name, value, target, ok in results:
        print(f"| {name} | {value} | {target}{'' if ok else ' (missed)'} |")
    print(json.dumps({"throughput": t, "store": st, "rss_mib": [small, large]}))
    return 1 if args.check and not all(ok for *_, ok in results) else 0


if __name__ == "__main__":
    sys.exit(main())
