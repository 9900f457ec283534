"""Benchmark vae-toolkit against the physical floor of each operation.

Run from the repository root::

    python benchmarks/run.py            # full run, well under 3 minutes on 2 cores
    python benchmarks/run.py --quick    # fewer repetitions

Each row times the library and its floor alternately (lib, floor, lib, floor, ...) and reports
medians; the ratio is computed within the same run, so that a busy machine moves both sides.
Images and the tiny VAE are generated into a temporary directory. The exit code is always 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# huggingface_hub reads these when it is imported: set them before anything imports it.
_TMP = Path(tempfile.mkdtemp(prefix="vae_toolkit_bench_"))
os.environ["HF_HOME"] = str(_TMP / "hf_home")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vae_toolkit  # noqa: E402
from vae_toolkit import (  # noqa: E402
    VAELoader,
    add_model_config,
    load_and_preprocess_image,
    load_images,
    tensor_to_pil,
)

TINY_VAE_KWARGS = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=32,
)

ROWS: list[tuple[str, str, str, str, str]] = []


# --- helpers ------------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def interleaved(lib, floor, rounds: int, inner: int = 1) -> tuple[float, float]:
    """Median seconds per call of ``lib`` and ``floor``, alternating which goes first each round."""
    lib(), floor()  # warm up
    times: dict[str, list[float]] = {"lib": [], "floor": []}
    for r in range(rounds):
        order = (("lib", lib), ("floor", floor)) if r % 2 == 0 else (("floor", floor), ("lib", lib))
        for name, fn in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return statistics.median(times["lib"]), statistics.median(times["floor"])


def ratio_row(operation: str, lib: float, floor: float, target: float) -> None:
    ratio = lib / floor
    ok = "met" if ratio <= target else "MISSED"
    ROWS.append((operation, fmt_time(lib), fmt_time(floor), f"{ratio:.2f}x", f"<= {target:.2f}x ({ok})"))


def photo(size: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth gradients and shading plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x * 200 + 30, y * 180 + 40, (x + y) * 100 + 20], axis=-1)
    img += (40 * np.sin(x * 12 + seed) * np.cos(y * 9))[..., None]
    img += rng.normal(0.0, 12.0, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def run_child(code: str) -> str:
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip().splitlines()[-1]


# --- rows ---------------------------------------------------------------------------------------


def bench_import(reps: int) -> None:
    # Each fresh child times `import torch`, then `import vae_toolkit` on top of it: what the library
    # adds beyond torch, free of the +-20% spread of torch's own import between processes.
    code = (
        "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
        "import vae_toolkit; t2 = time.perf_counter(); print(t1 - t0, t2 - t0)"
    )
    floor, lib = [], []
    for _ in range(reps):
        torch_t, total_t = map(float, run_child(code).split())
        floor.append(torch_t)
        lib.append(total_t)
    ratio_row("import vae_toolkit vs import torch", statistics.median(lib), statistics.median(floor), 1.10)


def bench_decode(paths: dict[str, Path], rounds: int) -> None:
    for label, path, inner in (
        ("512² PNG", paths["png"], 3),
        ("512² JPEG", paths["jpg"], 5),
        ("1024² PNG", paths["big"], 1),
    ):
        size = Image.open(path).size[0]

        def lib(path=path, size=size):
            load_and_preprocess_image(path, target_size=size)

        def floor(path=path):
            np.asarray(Image.open(path).convert("RGB"))

        lib_t, floor_t = interleaved(lib, floor, rounds, inner)
        ratio_row(f"load_and_preprocess_image {label}", lib_t, floor_t, 1.15)


def bench_tensor_to_pil(rounds: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 512, 512) * 2.2 - 1.1  # a decoded image overshoots [-1, 1] a little
    hwc = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)

    xa = x.numpy()

    def floor():
        # One pass of arithmetic over the float tensor (numpy, like the library: a 2-thread torch op
        # stalls on OpenMP barriers when another process holds a core, which would inflate the floor).
        np.multiply(xa, np.float32(127.5))
        Image.fromarray(hwc)

    lib_t, floor_t = interleaved(lambda: tensor_to_pil(x), floor, rounds, 10)
    ratio_row("tensor_to_pil 512²", lib_t, floor_t, 1.30)


def bench_load_images(paths: list[Path], rounds: int) -> None:
    def sequential():
        for p in paths:
            load_and_preprocess_image(p)

    lib_t, floor_t = interleaved(lambda: load_images(paths), sequential, rounds)
    speedup = floor_t / lib_t
    ok = "met" if speedup >= 1.6 else "MISSED"
    ROWS.append(
        (
            f"load_images {len(paths)}×512² PNG vs sequential calls ({os.cpu_count()} CPUs)",
            fmt_time(lib_t),
            fmt_time(floor_t),
            f"{speedup:.2f}x faster",
            f">= 1.60x faster ({ok})",
        )
    )


def bench_loader(model_dir: Path, rounds: int) -> None:
    from diffusers import AutoencoderKL

    n = 2000
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            VAELoader()
        times.append((time.perf_counter() - t0) / n)
    construct = statistics.median(times)
    ok = "met" if construct < 1e-3 else "MISSED"
    ROWS.append(("VAELoader()", fmt_time(construct), "-", "-", f"< 1 ms ({ok})"))

    add_model_config("bench-tiny", {"repo_id": str(model_dir), "subfolder": None})
    loader = VAELoader()
    loader.load_sd_vae("bench-tiny", device="cpu")
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            loader.load_sd_vae("bench-tiny", device="cpu")
        times.append((time.perf_counter() - t0) / n)
    hit = statistics.median(times)
    ok = "met" if hit < 50e-6 else "MISSED"
    ROWS.append(("load_sd_vae cache hit", fmt_time(hit), "-", "-", f"< 50 µs ({ok})"))

    def lib():
        VAELoader().load_sd_vae("bench-tiny", device="cpu")

    def floor():
        AutoencoderKL.from_pretrained(str(model_dir))

    lib_t, floor_t = interleaved(lib, floor, rounds)
    ratio_row("cold load_sd_vae (tiny local model) vs from_pretrained", lib_t, floor_t, 1.05)


def bench_device_rss(reps: int) -> None:
    code = (
        "import gc, json, psutil, torch, vae_toolkit\n"
        "p = psutil.Process(); gc.collect(); before = p.memory_info().rss\n"
        "dm = vae_toolkit.DeviceManager(); info = dm.get_device_info()\n"
        "gc.collect(); print(json.dumps(p.memory_info().rss - before))"
    )
    growth = statistics.median(float(run_child(code)) for _ in range(reps))
    ok = "met" if growth < 1024**2 else "MISSED"
    ROWS.append(
        (
            "RSS growth of DeviceManager() + get_device_info() (CPU)",
            f"{growth / 1024:.0f} KiB",
            "-",
            "-",
            f"< 1 MiB ({ok})",
        )
    )


# --- main ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier medians)")
    args = parser.parse_args()
    q = args.quick
    started = time.perf_counter()

    images = _TMP / "images"
    images.mkdir()
    photo(512).save(images / "photo512.png")
    photo(512).save(images / "photo512.jpg", quality=90)
    photo(1024).save(images / "photo1024.png")
    batch = []
    for i in range(64):
        p = images / f"batch{i:02d}.png"
        photo(512, seed=i).save(p)
        batch.append(p)
    model_dir = _TMP / "tiny_vae"
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the raw floor would log the missing-accelerate notice each load

    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE_KWARGS).save_pretrained(model_dir, safe_serialization=True)

    print(
        f"vae-toolkit {vae_toolkit.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}{' (quick)' if q else ''}",
        flush=True,
    )
    bench_import(4 if q else 10)
    bench_decode(
        {"png": images / "photo512.png", "jpg": images / "photo512.jpg", "big": images / "photo1024.png"},
        8 if q else 25,
    )
    bench_tensor_to_pil(8 if q else 25)
    bench_load_images(batch, 3 if q else 7)
    bench_loader(model_dir, 6 if q else 15)
    bench_device_rss(2 if q else 3)

    headers = ("operation", "vae-toolkit median", "floor median", "ratio", "target")
    widths = [max(len(r[i]) for r in [headers, *ROWS]) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print()
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in ROWS:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print(f"\n({time.perf_counter() - started:.0f} s; `python benchmarks/run.py{' --quick' if q else ''}`)")
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as err:  # a benchmark reports, it does not fail a pipeline
        print(f"benchmark failed: {type(err).__name__}: {err}", file=sys.stderr)
    finally:
        import shutil

        shutil.rmtree(_TMP, ignore_errors=True)
    sys.exit(0)
