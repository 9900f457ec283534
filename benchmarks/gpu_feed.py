"""Does ``encode_dataset`` keep a GPU busy? Measured on any machine, with the GPU emulated.

Run from the repository root, with nothing else running::

    python benchmarks/gpu_feed.py             # about 5 minutes on 2 cores
    python benchmarks/gpu_feed.py --files 160 # quicker, noisier

On a GPU the model's thread launches the encoder's kernels and then waits for the device without holding
the GIL; the CPU's part is to have the next batch ready. This benchmark replaces the VAE's ``encode`` by a
wait of a fixed time per image (``time.sleep``, which also releases the GIL) returning zeros, so that what
is measured is the feeding alone: reading 2 MP photo-like JPEGs (``benchmarks/stage1.py``'s generator,
quality 90; ``--photos`` different ones, hard-linked as ``--files`` files so that a run is long enough for its
start and end to count little) with the fast reader at ``--size 512``, on ``default_workers()`` threads, in
batches of 16.

For two emulated devices, one slower than reading and one faster, it prints images/s of:

- reading alone (``iter_images``, the pipeline's own reader);
- the device alone (the same waits on batches already in memory);
- ``encode_dataset`` as it is: batches stacked on a helper thread, one batch ahead of the model;
- ``encode_dataset`` with each batch stacked on the model's thread (as before the helper), for comparison;

and the pipeline's throughput against the slower of the two stages (target, as for a model on the CPU:
>= 0.9x). Runs alternate between the two pipelines, and the medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dataset import make_vae
from stage1 import _table, photo

from vae_toolkit import batching, encoding
from vae_toolkit.dataset import default_workers, encode_dataset, iter_images

BATCH = 16
SIZE = 512


def _write(args: tuple[Path, int]) -> None:
    path, seed = args
    photo(1920, 1080, seed).save(path, quality=90)


def emulated_vae(per_image_s: float) -> Any:
    """A tiny AutoencoderKL whose ``encode`` waits ``per_image_s`` per image without the GIL, like a GPU."""
    vae = make_vae()  # benchmarks/dataset.py's tiny VAE (sample_size 512): only its encode is replaced

    def encode(x: torch.Tensor, return_dict: bool = True) -> Any:
        n, _, h, w = x.shape
        time.sleep(per_image_s * n)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=torch.zeros(n, 4, h // 8, w // 8)))

    vae.encode = encode
    return vae


@contextmanager
def stacked_on_the_models_thread() -> Iterator[None]:
    """The pipeline as before the helper thread: the model's thread stacks each batch itself."""

    def inline(batches: Any) -> Iterator[Any]:
        for batch in batches:
            if isinstance(batch, tuple):
                yield batch
            else:
                yield [batching.Item(key, stat, image) for key, stat, image in batch], None

    real = encoding.stacked_batches
    encoding.stacked_batches = inline  # type: ignore[assignment]
    try:
        yield
    finally:
        encoding.stacked_batches = real


def reading_alone(paths: list[Path], workers: int) -> float:
    start = time.perf_counter()
    for _ in iter_images([(p.name, p) for p in paths], SIZE, workers=workers):
        pass
    return len(paths) / (time.perf_counter() - start)


def device_alone(vae: Any, n: int) -> float:
    x = torch.zeros(BATCH, 3, SIZE, SIZE)
    encoder = encoding._Encoder(vae, sample=False, seed=0, store_dtype=torch.float32)
    items = [batching.Item(str(i), (0, 0), x[i]) for i in range(BATCH)]
    start = time.perf_counter()
    for _ in range(max(1, n // BATCH)):
        encoder(items, x)
    return max(1, n // BATCH) * BATCH / (time.perf_counter() - start)


def pipeline(vae: Any, src: Path, n: int, workers: int, tmp: Path) -> float:
    with tempfile.TemporaryDirectory(dir=tmp) as out:
        start = time.perf_counter()
        summary = encode_dataset(vae, src, out, size=SIZE, batch_size=BATCH, workers=workers, progress=False)
        seconds = time.perf_counter() - start
    assert summary.encoded == n, summary
    return n / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=48, help="different photos generated")
    parser.add_argument("--files", type=int, default=480, help="files read (hard links to the photos)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device-ms", type=float, nargs="+", default=[12.0, 4.0], help="emulated ms per image")
    args = parser.parse_args()
    workers = default_workers()
    print(
        f"{workers} decoding threads, {args.files} files ({args.photos} different photos 1920x1080), "
        f"batches of {BATCH}, --size {SIZE}",
        flush=True,
    )
    misses = 0
    with tempfile.TemporaryDirectory(prefix="vae_toolkit_gpu_feed_") as tmp_name:
        tmp = Path(tmp_name)
        unique, src = tmp / "unique", tmp / "photos"
        unique.mkdir()
        src.mkdir()
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write, [(unique / f"{i:04d}.jpg", i) for i in range(args.photos)]))
        for i in range(args.files):
            (src / f"{i:05d}.jpg").hardlink_to(unique / f"{i % args.photos:04d}.jpg")
        paths = sorted(src.glob("*.jpg"))
        rows = []
        for ms in args.device_ms:
            vae = emulated_vae(ms / 1000)
            results: dict[str, list[float]] = {"read": [], "device": [], "helper": [], "inline": []}
            for r in range(args.rounds):
                results["read"].append(reading_alone(paths, workers))
                results["device"].append(device_alone(vae, args.files))
                for name in ("helper", "inline") if r % 2 == 0 else ("inline", "helper"):
                    if name == "helper":
                        results[name].append(pipeline(vae, src, args.files, workers, tmp))
                    else:
                        with stacked_on_the_models_thread():
                            results[name].append(pipeline(vae, src, args.files, workers, tmp))
            med = {k: statistics.median(v) for k, v in results.items()}
            slower = min(med["read"], med["device"])
            ok = med["helper"] / slower >= 0.9
            misses += not ok
            rows.append(
                (
                    f"{ms:g} ms/image",
                    f"{med['read']:.1f}",
                    f"{med['device']:.1f}",
                    f"{med['helper']:.1f} ({med['helper'] / slower:.2f}x)",
                    f"{med['inline']:.1f} ({med['inline'] / slower:.2f}x)",
                    "met" if ok else "MISSED",
                )
            )
            print(f"{ms:g} ms/image: " + ", ".join(f"{k} {v}" for k, v in results.items()), flush=True)
    headers = (
        "emulated device",
        "reading alone img/s",
        "device alone img/s",
        "pipeline img/s (vs slower)",
        "stacked on model thread img/s",
        "status (>= 0.9x)",
    )
    _table(headers, rows)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
