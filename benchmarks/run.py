"""Benchmark vae-toolkit against the physical floor of each operation.

Run from the repository root::

    python benchmarks/run.py                     # full run, about a minute on 2 cores
    python benchmarks/run.py --quick             # fewer repetitions
    python benchmarks/run.py --check             # exit 1 when a row misses its target by more than SPREAD
    python benchmarks/run.py --only decode,tensor_to_pil

Each row times the library and its floor alternately (lib, floor, lib, floor, ...) and reports
medians; the ratio is computed within the same run, so that a busy machine moves both sides.
Images and the tiny VAE are generated into a temporary directory.

Exit status: 2 when a benchmark raised (the others still run and print); with ``--check``, 1 when a
ratio misses its target by more than ``SPREAD`` (the run-to-run spread README.md documents) or an
absolute bound is missed; else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vae_toolkit  # imports neither diffusers nor huggingface_hub
from vae_toolkit import (
    VAELoader,
    add_model_config,
    load_and_preprocess_image,
    load_images,
    tensor_to_pil,
)

# How far a ratio moves between runs on a shared 2-core machine (README.md, "Performance"). --check fails a
# row only when it misses its target by more than this, so that noise alone does not fail it.
SPREAD = 0.15

TINY_VAE_KWARGS = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=32,
)


@dataclasses.dataclass
class Row:
    operation: str
    lib: str = "-"
    floor: str = "-"
    ratio: str = "-"
    target: str = "-"
    status: str = "met"  # met | missed within spread | MISSED | ERROR


ROWS: list[Row] = []


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


def status(value: float, target: float, higher_is_better: bool = False, spread: float = SPREAD) -> str:
    """``met``; ``missed within spread`` when noise may explain the miss; else ``MISSED``."""
    miss = target - value if higher_is_better else value - target
    if miss <= 0:
        return "met"
    return "missed within spread" if miss <= spread else "MISSED"


def ratio_row(operation: str, lib: float, floor: float, target: float) -> None:
    ratio = lib / floor
    ROWS.append(
        Row(operation, fmt_time(lib), fmt_time(floor), f"{ratio:.2f}x", f"<= {target:.2f}x", status(ratio, target))
    )


def bound_row(operation: str, value: float, text: str, bound: float, bound_text: str) -> None:
    """An absolute bound (generous by design): any miss is a failure."""
    ROWS.append(Row(operation, text, target=f"< {bound_text}", status="met" if value < bound else "MISSED"))


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
        with Image.open(path) as img:
            size = img.size[0]

        def lib(path=path, size=size):
            load_and_preprocess_image(path, target_size=size)

        def floor(path=path):
            with Image.open(path) as img:  # closed, as the library closes it
                np.asarray(img.convert("RGB"))

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
    target = 1.6 if (os.cpu_count() or 1) >= 2 else 1.0  # threads cannot help on one CPU
    ROWS.append(
        Row(
            f"load_images {len(paths)}×512² PNG vs sequential calls ({os.cpu_count()} CPUs)",
            fmt_time(lib_t),
            fmt_time(floor_t),
            f"{speedup:.2f}x faster",
            f">= {target:.2f}x faster",
            status(speedup, target, higher_is_better=True),
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
    bound_row("VAELoader()", construct, fmt_time(construct), 1e-3, "1 ms")

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
    bound_row("load_sd_vae cache hit", hit, fmt_time(hit), 50e-6, "50 µs")

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
    bound_row(
        "RSS growth of DeviceManager() + get_device_info() (CPU)", growth, f"{growth / 1024:.0f} KiB", 1024**2, "1 MiB"
    )


# --- main ---------------------------------------------------------------------------------------


def _setup(tmp: Path, names: set[str]) -> dict[str, object]:
    """Generate only what the selected benchmarks need."""
    fixtures: dict[str, object] = {}
    images = tmp / "images"
    images.mkdir()
    if "decode" in names:
        photo(512).save(images / "photo512.png")
        photo(512).save(images / "photo512.jpg", quality=90)
        photo(1024).save(images / "photo1024.png")
        fixtures["decode"] = {
            "png": images / "photo512.png",
            "jpg": images / "photo512.jpg",
            "big": images / "photo1024.png",
        }
    if "load_images" in names:
        batch = []
        for i in range(64):
            p = images / f"batch{i:02d}.png"
            photo(512, seed=i).save(p)
            batch.append(p)
        fixtures["load_images"] = batch
    if "loader" in names:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # the raw floor would log the missing-accelerate notice each load
        model_dir = tmp / "tiny_vae"
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE_KWARGS).save_pretrained(model_dir, safe_serialization=True)
        fixtures["loader"] = model_dir
    return fixtures


def benchmarks(quick: bool, fixtures: dict[str, object]) -> dict[str, Callable[[], None]]:
    q = quick
    return {
        "import": lambda: bench_import(4 if q else 10),
        "decode": lambda: bench_decode(fixtures["decode"], 8 if q else 25),  # type: ignore[arg-type]
        "tensor_to_pil": lambda: bench_tensor_to_pil(8 if q else 25),
        "load_images": lambda: bench_load_images(fixtures["load_images"], 3 if q else 7),  # type: ignore[arg-type]
        "loader": lambda: bench_loader(fixtures["loader"], 6 if q else 15),  # type: ignore[arg-type]
        "device_rss": lambda: bench_device_rss(2 if q else 3),
    }


NAMES = ("import", "decode", "tensor_to_pil", "load_images", "loader", "device_rss")


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {unknown or value!r}; choose from {', '.join(NAMES)}")
    return names


def exit_status(rows: Sequence[Row], check: bool) -> int:
    """2 if a benchmark raised; with ``check``, 1 if a row missed its target by more than the spread; else 0."""
    if any(r.status == "ERROR" for r in rows):
        return 2
    if check and any(r.status == "MISSED" for r in rows):
        return 1
    return 0


def print_table(rows: Sequence[Row]) -> None:
    headers = ("operation", "vae-toolkit median", "floor median", "ratio", "target", "status")
    cells = [headers] + [(r.operation, r.lib, r.floor, r.ratio, r.target, r.status) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    print()
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier medians)")
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 when a row misses its target by more than {SPREAD}"
    )
    parser.add_argument(
        "--only", type=_names, default=list(NAMES), help=f"comma-separated subset of: {', '.join(NAMES)}"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vae_toolkit_bench_"))
    # huggingface_hub reads these when it is imported (first in _setup or bench_loader): set them before.
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")}
    os.environ.update(HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    ROWS.clear()
    try:
        print(
            f"vae-toolkit {vae_toolkit.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}{' (quick)' if args.quick else ''}",
            flush=True,
        )
        try:
            fixtures = _setup(tmp, set(args.only))
        except Exception as err:
            print(f"benchmark setup failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 2
        runs = benchmarks(args.quick, fixtures)
        for name in args.only:
            try:
                runs[name]()
            except Exception as err:  # report it, run the others, and exit non-zero at the end
                print(f"benchmark {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
                ROWS.append(Row(name, status="ERROR", target=f"{type(err).__name__}: {err}"[:80]))
        print_table(ROWS)
        code = exit_status(ROWS, args.check)
        command = "python benchmarks/run.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        verdict = {0: "", 1: f"; a row missed its target by more than {SPREAD}", 2: "; a benchmark failed"}[code]
        print(f"\n({time.perf_counter() - started:.0f} s; `{command}`{verdict}; exit {code})")
        return code
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
