"""Benchmark of ``vae_toolkit.evaluate``: what the metrics cost, and memory that does not grow with the images.

(a) Throughput: ``evaluate`` with one model, LPIPS (AlexNet) and rFID (2048-d) on, vs encode + decode of the
    same images in the same run (read on the same threads, the same batches, encode, decode and the lossless
    ``tensor_to_pil``, no metrics), both once per round in alternating order; the median of the rounds' ratios
    is the figure (target >= 0.85). rFID ends with one matrix square root of 2048x2048 per model, a fixed cost
    of the run (tens of seconds on 2 cores) that a real evaluation spreads over thousands of images: it is timed
    apart, and the ratio is given with and without it.
(b) Peak RSS of a whole ``evaluate`` with its report and rFID, 200 vs 2,000 images, each in a fresh process
    (target: less than 100 MB apart): only the rows, the pictured images and rFID's running sums are kept.

The metrics' networks get seeded random weights in the real files' layouts (tests/metric_weights.py), planted in
a temporary TORCH_HOME: they cost what the real ones cost, and nothing is downloaded.

The VAE of (a) is ``--vae sd`` (default): the architecture of the Stable Diffusion VAE (AutoencoderKL with
block_out_channels 128/256/512/512, 2 layers per block; random weights, as none can be downloaded here), so
that the model costs what a user's model costs; or ``--vae tiny``, the 4-block test VAE (8x downsampling, a
few thousand parameters), where the metrics are measured against a model that costs almost nothing. (b)
uses the tiny VAE. Timings on a shared machine are noisy: read the ratios, measured in one run.

    python benchmarks/evaluate.py [--vae sd|tiny] [--images 16] [--size 256] [--rounds 5] [--rss 200 2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import metric_weights
from dataset import make_images, make_vae, peak_rss

from vae_toolkit import metrics
from vae_toolkit.dataset import find_images, iter_images
from vae_toolkit.evaluate import evaluate, reconstruct


def encode_decode(vae, root: Path, keys: list[str], size: int | None, batch_size: int, workers: int) -> float:
    """Seconds to read, encode, decode and convert every image (batches of equal size), without metrics."""
    start = time.perf_counter()
    buckets: dict[tuple[int, ...], list[torch.Tensor]] = {}
    items = [(k, root / k) for k in keys]
    for _, _, x in iter_images(items, size, workers=workers, window=max(2 * batch_size, 2 * workers)):
        bucket = buckets.setdefault(tuple(x.shape), [])
        bucket.append(x)
        if len(bucket) >= batch_size:
            reconstruct(vae, torch.stack(buckets.pop(tuple(x.shape))))
    for shape in list(buckets):
        reconstruct(vae, torch.stack(buckets.pop(shape)))
    return time.perf_counter() - start


def sd_vae():
    """The Stable Diffusion VAE's architecture (diffusers' defaults for SD 1.x), random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=512,
    ).eval()


def throughput(
    tmp: Path, n: int, size: int | None, batch_size: int, workers: int, rounds: int, which: str
) -> tuple[dict[str, float], list[float]]:
    """(images/s of each side over all rounds, the ratio evaluate / encode + decode of each round).

    Each round runs both sides back to back, in alternating order; the figure is the median of the per-round
    ratios, so that the slow drifts of a shared machine move both sides of a ratio alike.
    """
    src = tmp / "throughput"
    make_images(src, n)
    root, keys = find_images(src)
    vae = sd_vae() if which == "sd" else make_vae()
    times: dict[str, list[float]] = {"encode + decode": [], "evaluate": [], "rfid square root": []}
    real_compute = metrics.FrechetInceptionDistance.compute

    def run_evaluate() -> float:
        spent = [0.0]

        def timed_compute(self, **kwargs):
            began = time.perf_counter()
            try:
                return real_compute(self, **kwargs)
            finally:
                spent[0] += time.perf_counter() - began

        metrics.FrechetInceptionDistance.compute = timed_compute
        try:
            start = time.perf_counter()
            evaluate({"m": vae}, src, size=size, batch_size=batch_size, workers=workers, progress=False,
                     lpips="alex", fid=True)  # fmt: skip
            total = time.perf_counter() - start
        finally:
            metrics.FrechetInceptionDistance.compute = real_compute
        times["rfid square root"].append(spent[0])
        return total

    encode_decode(vae, root, keys[:batch_size], size, batch_size, workers)  # warm up
    run_evaluate()
    for r in range(rounds):
        if r % 2 == 0:
            times["encode + decode"].append(encode_decode(vae, root, keys, size, batch_size, workers))
            times["evaluate"].append(run_evaluate())
        else:
            times["evaluate"].append(run_evaluate())
            times["encode + decode"].append(encode_decode(vae, root, keys, size, batch_size, workers))
    ratios = [b / e for b, e in zip(times["encode + decode"], times["evaluate"], strict=True)]
    per_image = [
        b / (e - s)
        for b, e, s in zip(times["encode + decode"], times["evaluate"], times["rfid square root"][1:], strict=True)
    ]
    rates = {label: n / statistics.median(t) for label, t in times.items() if label != "rfid square root"}
    rates["rfid square root s"] = statistics.median(times["rfid square root"])
    return rates, ratios, per_image


RSS_CHILD = """
import sys
sys.path.insert(0, {bench!r})
from dataset import make_vae
from vae_toolkit.evaluate import evaluate
r = evaluate({{"tiny": make_vae()}}, sys.argv[1], sys.argv[2], batch_size=8, progress=False, lpips="alex", fid=True)
assert len(r.rows) == int(sys.argv[3]), len(r.rows)
# VmHWM: the peak RSS of this program (KiB); ru_maxrss would also count the parent's RSS at the fork
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", choices=["sd", "tiny"], default="sd", help="the model of (a) (sd)")
    parser.add_argument("--images", type=int, default=16, help="images for the throughput rounds (16)")
    parser.add_argument("--size", type=int, default=256, help="--size of the throughput rounds (256; 0: own size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rss", type=int, nargs="*", default=[200, 2000], help="image counts for peak RSS")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "torch"
        metric_weights.plant(home / "hub" / "checkpoints")
        os.environ["TORCH_HOME"], os.environ["HF_HUB_OFFLINE"] = str(home), "1"  # children inherit them
        rates, ratios, per_image = throughput(
            Path(tmp), args.images, args.size or None, args.batch_size, args.workers, args.rounds, args.vae
        )
        base, ev = rates["encode + decode"], rates["evaluate"]
        at = args.size or "their own size"
        print(f"(a) {args.vae} VAE, {args.images} images at {at} px, batch {args.batch_size}, "
              f"{args.rounds} rounds (each side once per round, alternating which goes first):")  # fmt: skip
        print(f"    encode + decode {base:.1f} images/s, evaluate {ev:.1f} images/s (medians)")
        print(f"    ratio evaluate (LPIPS + rFID) / encode + decode: median {statistics.median(ratios):.2f} of the "
              f"rounds' {', '.join(f'{r:.2f}' for r in ratios)}, the whole run")  # fmt: skip
        print(f"    without rFID's one square root per model ({rates['rfid square root s']:.1f} s a run): median "
              f"{statistics.median(per_image):.2f} of {', '.join(f'{r:.2f}' for r in per_image)} "
              "(target >= 0.85)")  # fmt: skip
        if args.rss:
            rss = {n: peak_rss(Path(tmp), n, RSS_CHILD) for n in args.rss}
            print(
                "(b) peak RSS of evaluate with its report: "
                + ", ".join(f"{n} images {v:.0f} MiB" for n, v in rss.items())
            )
            if len(rss) == 2:
                (n1, a), (n2, b) = rss.items()
                print(f"    difference {b - a:+.0f} MiB for {n2 - n1} more images (target < 100 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
