"""Benchmark the training cache: ``encode --buckets`` against ``--size`` of about the same area, and ``--flip``.

Run from the repository root, with nothing else running::

    python benchmarks/buckets.py            # about a minute on 2 cores
    python benchmarks/buckets.py --check    # exit 1 when a target is missed

On the same camera-like JPEGs of mixed aspect ratios (default 48, 1600x1200, 1200x1600, 1920x1080, 1000x1000),
in one run, rounds interleaved, medians:

1. ``encode_dataset(buckets=A)`` vs ``encode_dataset(size=A)``: the same pixel area per image, so the model
   does the same work. Target: >= 0.9x (bucketing adds no slower stage).
2. ``flip=True`` vs without, both with ``size=A``: the flip asks for a second encode of each image. Target:
   the time with flips <= 2x the time without (the flip costs at most the second encode).

The model is the tiny 4-block VAE of ``benchmarks/dataset.py`` (8x downsampling, as SD).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from dataset import make_vae

from vae_toolkit.dataset import encode_dataset

SIZES = [(1600, 1200), (1200, 1600), (1920, 1080), (1000, 1000)]


def make_photos(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = 128 + 60 * np.sin(x / (37 + i))[..., None] + 50 * np.cos(y / (23 + i))[..., None]
        pixels = np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)


def timed(vae, src: Path, out: Path, batch_size: int, **kwargs) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = encode_dataset(vae, src, out, batch_size=batch_size, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    assert not summary.failed and summary.encoded > 0, summary
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--area", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    vae = make_vae()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_photos(tmp / "src", args.images)
        timed(vae, tmp / "src", tmp / "warm", args.batch_size, size=args.area)  # warm-up
        runs: dict[str, list[float]] = {"size": [], "buckets": [], "size+flip": []}
        for _ in range(args.rounds):
            runs["size"].append(timed(vae, tmp / "src", tmp / "a", args.batch_size, size=args.area))
            runs["buckets"].append(timed(vae, tmp / "src", tmp / "b", args.batch_size, buckets=args.area))
            runs["size+flip"].append(timed(vae, tmp / "src", tmp / "c", args.batch_size, size=args.area, flip=True))
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "images": args.images,
        "area": args.area,
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "images_per_second": {k: round(args.images / v, 2) for k, v in median.items()},
        "buckets_vs_size": round(median["size"] / median["buckets"], 3),
        "flip_cost_vs_second_encode": round(median["size+flip"] / median["size"], 3),
    }
    print(json.dumps(result, indent=1))
    ok = result["buckets_vs_size"] >= 0.9 and result["flip_cost_vs_second_encode"] <= 2.0
    if args.check and not ok:
        print("a target is missed: buckets >= 0.9x size, flip <= 2x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
