"""On a CUDA machine: does reading photos keep the GPU busy, and do the metrics cost little beside the model?

Run from the repository root on a machine with a GPU::

    python benchmarks/gpu.py [--photos 192] [--megapixels 2 12] [--batch-size 16]

It generates photo-like JPEGs (benchmarks/stage1.py's generator, quality 90) on all cores, builds the Stable
Diffusion VAE's architecture (random weights: the cost of the real model, no download) in float16 on the GPU,
and prints, for each photo size:

- the model alone (encode of 512² batches already on the GPU), images/s;
- ``encode_dataset`` with the fast reader (default) and with ``exact_resize=True``, images/s, with the
  decoding threads ``default_workers()`` gives;
- ``evaluate`` of the same photos against encode + decode of the same batches (no metrics), images/s, ratio,
  after one warm-up batch (the first call of the metrics' kernels costs more than the rest of a short run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from evaluate import encode_decode, sd_vae
from stage1 import photo

from vae_toolkit import latents
from vae_toolkit.dataset import default_workers, encode_dataset, find_images
from vae_toolkit.evaluate import evaluate

SIZES = {2: (1920, 1080), 12: (4000, 3000)}


def _write(args: tuple[Path, int, int, int]) -> None:
    path, w, h, seed = args
    photo(w, h, seed).save(path, quality=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=192)
    parser.add_argument("--megapixels", type=int, nargs="+", default=[2, 12], choices=sorted(SIZES))
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 1
    vae = sd_vae().to("cuda", torch.float16)
    print(f"{torch.cuda.get_device_name(0)}; {os.cpu_count()} CPUs, {default_workers()} decoding threads", flush=True)
    with torch.inference_mode():
        x = torch.randn(args.batch_size, 3, 512, 512, device="cuda", dtype=torch.float16)
        latents.encode(vae, x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            latents.encode(vae, x)
        torch.cuda.synchronize()
        alone = 5 * args.batch_size / (time.perf_counter() - start)
    print(f"model alone (encode, 512², float16): {alone:.0f} images/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for mp in args.megapixels:
            w, h = SIZES[mp]
            src = tmp / f"{mp}mp"
            src.mkdir()
            start = time.perf_counter()
            with ProcessPoolExecutor() as pool:
                list(pool.map(_write, [(src / f"{i:04d}.jpg", w, h, i) for i in range(args.photos)]))
            print(f"{mp} MP: {args.photos} photos generated in {time.perf_counter() - start:.0f} s", flush=True)
            for exact in (False, True):
                out = tmp / f"out-{mp}-{exact}"
                s = encode_dataset(vae, src, out, model="sd-arch", size=512, batch_size=args.batch_size,
                                   exact_resize=exact, progress=False)  # fmt: skip
                reader = "exact" if exact else "fast"
                print(f"  encode_dataset, {reader} reader: {s.images_per_second:.0f} images/s "
                      f"({s.images_per_second / alone:.2f}x the model alone)", flush=True)  # fmt: skip
            root, keys = find_images(src)
            evaluate(
                {"sd-arch": vae}, src, size=512, batch_size=args.batch_size, limit=args.batch_size, progress=False
            )
            base = len(keys) / encode_decode(vae, root, keys, 512, args.batch_size, default_workers())
            start = time.perf_counter()
            evaluate({"sd-arch": vae}, src, size=512, batch_size=args.batch_size, progress=False)
            ev = len(keys) / (time.perf_counter() - start)
            print(f"  evaluate {ev:.0f} images/s vs encode + decode {base:.0f} images/s: ratio {ev / base:.2f}",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
