"""Stage 1 of encoding (file -> ``[3, 512, 512]`` tensor) on photo-sized JPEGs: exact reader vs fast reader.

Run from the repository root::

    python benchmarks/stage1.py            # about 2 minutes on 2 cores
    python benchmarks/stage1.py --quick    # fewer photos and rounds

It generates photo-like JPEGs (quality 90) at 4000x3000 (12 MP) and 1920x1080 (2 MP) into a temporary
directory, and prints, measured in this one run:

- images/s per core (one thread; CPU time of the thread, so that other processes on the machine do not count)
  of three readers: the one the dataset encoder used before the fast reader
  (``open_image`` + ``pil_to_tensor(target_size=512)`` when ``open_image`` still copied RGB images with
  ``convert("RGB")``); the exact reader now, ``load_for_encoding(p, 512, exact=True)`` (the same values, without
  that copy); and the fast reader ``load_for_encoding(p, 512)``. The targets are on the fast reader against the
  one before (>= 3.5x at 12 MP, >= 1.8x at 2 MP);
- the median PSNR of the fast reader's output against the exact reader's (target: >= 45 dB), on 8-bit values
  (``255 * (x + 1) / 2``, peak 255, mean over all pixels and channels);
- the throughput of 2 threads against 1 thread for both readers, and the CPU time the 2-thread run used per
  second of wall time: PIL releases the GIL while decoding and resizing, numpy while converting, so 2 threads
  use up to 2 cores (on a machine shared with other processes the throughput gain is capped by the cores
  they leave free; the CPU time shows whether the threads ran at once).

Exact and fast calls alternate on every photo and round, so that load from other processes slows both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import vae_toolkit
from vae_toolkit import available_cpus, load_for_encoding, pil_to_tensor

SIZE = 512
SHAPES = {"12 MP": (4000, 3000), "2 MP": (1920, 1080)}
TARGETS = {"12 MP": 3.5, "2 MP": 1.8}
PSNR_TARGET = 45.0


# --- photo-like test images ---------------------------------------------------------------------


def _pink_noise(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    """A ``1/f**beta`` amplitude-spectrum field (natural images: beta ~ 1), zero mean, unit std, float32."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    shape = (h, w // 2 + 1)
    spectrum = (rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)) / (
        f**beta
    )
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(h, w)).astype(np.float32)
    return field / field.std()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: what a camera records, never flat colours or uniform noise.

    A 1/f luminance field (the spectrum of natural scenes) with a smoother 1/f colour field, a lighting
    gradient, a dozen objects with sharp edges, a band of fine oriented texture (fabric-like), the
    camera's optics (Gaussian blur of 0.7 px: MTF50 about 0.27 cycles/pixel, a typical camera) and then
    sensor noise (read noise plus signal-dependent shot noise, independent per channel).
    """
    rng = np.random.default_rng(seed)
    h, w = height, width
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    base = rng.uniform(60, 180, 3).astype(np.float32)
    gx, gy = rng.uniform(-90, 90, 2)
    luma = _pink_noise(rng, h, w, 1.0) * 28 + gx * x + gy * y
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = base[c] + luma + _pink_noise(rng, h, w, 1.6) * 8
    del luma
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.2) * min(w, h)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radii = r * rng.uniform(0.6, 1.4, 7)
        draw.polygon(
            [(float(cx + q * np.cos(a)), float(cy + q * np.sin(a))) for a, q in zip(angles, radii, strict=True)],
            fill=int(rng.integers(60, 255)),
        )
    img += (np.asarray(mask, dtype=np.float32) / 255)[..., None] * rng.uniform(-90, 90, 3).astype(np.float32)
    theta, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
    grating = np.sin((x * w * np.cos(theta) + y * h * np.sin(theta)) * np.float32(2 * np.pi / period))
    img += (grating * ((y > 0.55) & (y < 0.85)) * 25)[..., None]
    optics = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    img = np.asarray(optics, dtype=np.float32)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * (1.5 + 0.012 * img)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# --- measurements -------------------------------------------------------------------------------


def before_reader(path: Path) -> torch.Tensor:
    """Stage 1 before the fast reader: ``open_image`` (which then copied RGB images) + ``pil_to_tensor``."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return pil_to_tensor(rgb, target_size=SIZE)


def exact_reader(path: Path) -> torch.Tensor:
    """The exact reader now: the same values as ``before_reader``."""
    return load_for_encoding(path, SIZE, exact=True)


def fast_reader(path: Path) -> torch.Tensor:
    return load_for_encoding(path, SIZE)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two ``[-1, 1]`` tensors on the 8-bit scale (peak 255)."""
    mse = float((((a.double() - b.double()) * 127.5) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def per_image_seconds(paths: Sequence[Path], readers: dict[str, Callable[[Path], object]], rounds: int):
    """CPU seconds per image of each reader: the mean over photos of the median over rounds.

    CPU time of the calling thread (``time.thread_time``, user + system), so that other processes taking the
    core away do not count; readers (and their order) alternate on each photo and round.
    """
    names = list(readers)
    times: dict[str, list[list[float]]] = {n: [[] for _ in paths] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for i, p in enumerate(paths):
            for n in order:
                t0 = time.thread_time()
                readers[n](p)
                times[n][i].append(time.thread_time() - t0)
    return {n: statistics.fmean(statistics.median(t) for t in times[n]) for n in names}


def threaded_throughput(
    paths: Sequence[Path], reader: Callable[[Path], object], threads: int, repeat: int
) -> tuple[float, float]:
    """(images/s, CPU seconds of this process per wall second) reading ``paths`` ``repeat`` times on ``threads``."""
    work = list(paths) * repeat
    t0, c0 = time.perf_counter(), time.process_time()
    if threads == 1:
        for p in work:
            reader(p)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(reader, work):
                pass
    wall = time.perf_counter() - t0
    return len(work) / wall, (time.process_time() - c0) / wall


def thread_scaling(
    paths: Sequence[Path], reader: Callable[[Path], object], repeat: int, trials: int
) -> tuple[float, float, float]:
    """(1-thread images/s, 2-thread images/s, 2-thread CPU s per wall s): medians over alternating trials."""
    one: list[float] = []
    two: list[float] = []
    cpu: list[float] = []
    for t in range(trials):
        for threads in (1, 2) if t % 2 == 0 else (2, 1):
            rate, busy = threaded_throughput(paths, reader, threads, repeat)
            if threads == 1:
                one.append(rate)
            else:
                two.append(rate)
                cpu.append(busy)
    return statistics.median(one), statistics.median(two), statistics.median(cpu)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer photos and rounds (noisier)")
    args = parser.parse_args(argv)
    photos = {"12 MP": 2 if args.quick else 4, "2 MP": 3 if args.quick else 6}
    rounds = 3 if args.quick else 5
    torch.set_num_threads(1)  # the readers use PIL and numpy; keep torch's pool from competing for the cores
    started = time.perf_counter()
    print(
        f"vae-toolkit {vae_toolkit.__version__}, torch {torch.__version__}, Pillow {Image.__version__}, "
        f"Python {sys.version.split()[0]}, {available_cpus()} CPUs available{' (quick)' if args.quick else ''}",
        flush=True,
    )
    rows, thread_rows, misses = [], [], 0
    with tempfile.TemporaryDirectory(prefix="vae_toolkit_stage1_") as tmp:
        for label, (w, h) in SHAPES.items():
            paths = []
            for i in range(photos[label]):
                p = Path(tmp) / f"{label.replace(' ', '')}_{i}.jpg"
                photo(w, h, seed=1000 * w + i).save(p, quality=90)
                paths.append(p)
            mb = statistics.fmean(p.stat().st_size for p in paths) / 1e6
            print(f"{label}: {len(paths)} photos {w}x{h}, {mb:.1f} MB each on average", flush=True)
            readers = {"before": before_reader, "exact": exact_reader, "fast": fast_reader}
            for reader in readers.values():  # warm up
                reader(paths[0])
            secs = per_image_seconds(paths, readers, rounds)
            speedup = secs["before"] / secs["fast"]
            psnrs = [psnr(fast_reader(p), exact_reader(p)) for p in paths]
            med = statistics.median(psnrs)
            ok = speedup >= TARGETS[label] and med >= PSNR_TARGET
            misses += not ok
            rows.append(
                (
                    label,
                    f"{1 / secs['before']:.1f}",
                    f"{1 / secs['exact']:.1f}",
                    f"{1 / secs['fast']:.1f}",
                    f"{speedup:.2f}x (>= {TARGETS[label]}x)",
                    f"{secs['exact'] / secs['fast']:.2f}x",
                    f"{med:.1f} dB (min {min(psnrs):.1f}, >= {PSNR_TARGET:.0f})",
                    "met" if ok else "MISSED",
                )
            )
            for name, reader in (("exact", exact_reader), ("fast", fast_reader)):
                one, two, cpu = thread_scaling(paths, reader, repeat=1 if label == "12 MP" else 2, trials=rounds)
                thread_rows.append(
                    (f"{label} {name}", f"{one:.1f}", f"{two:.1f}", f"{two / one:.2f}x", f"{cpu:.2f} cores")
                )
    _table(
        (
            "photos",
            "before img/s/core",
            "exact img/s/core",
            "fast img/s/core",
            "fast / before",
            "fast / exact",
            "PSNR fast vs exact",
            "status",
        ),
        rows,
    )
    _table(("reader", "1 thread img/s", "2 threads img/s", "2 vs 1 thread", "2 threads CPU/wall"), thread_rows)
    print(
        f"\n({time.perf_counter() - started:.0f} s; `python benchmarks/stage1.py{' --quick' if args.quick else ''}`)"
    )
    return 1 if misses else 0


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    cells = [tuple(headers), *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    print()
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(wd) for c, wd in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")


if __name__ == "__main__":
    sys.exit(main())
