"""Speed: the plan's generous bounds (SPEC §2), and same-process ratios that catch real regressions.

A ratio times the library and its floor alternately (lib, floor, floor, lib, ...) in this process and compares
the medians, so a busy machine slows both sides; no absolute time is asserted (beyond the plan's bounds). A ratio
over its bound is measured again, up to three times in all, and the lowest counts. The
margins are wide for a noisy 2-core machine shared with other jobs (typical ratios here are about half the
bound), and far inside a real regression (a loader 8x slower gives 8x or more). Each timed call is short (well
under a scheduler time slice), so that when other processes preempt this one, only a minority of the samples
on either side are hit and the medians stay clean. Torch runs on one thread while
measuring: on a machine where other processes hold the cores, torch's intra-op threads wait on each other
(a 0.5 ms op can take 25 ms), which would measure the machine's load instead of the code.
``benchmarks/run.py`` prints the full table against the README's tighter targets.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_toolkit import VAELoader, add_model_config, load_and_preprocess_image, load_images, tensor_to_pil

ROUNDS = 41


def interleaved_ratio(lib: Callable[[], object], floor: Callable[[], object], rounds: int = ROUNDS, inner: int = 1):
    """``median(lib) / median(floor)`` over interleaved rounds, alternating which goes first."""
    for _ in range(3):  # warm up: imports, caches, first-touch of buffers
        lib(), floor()
    times: dict[str, list[float]] = {"lib": [], "floor": []}
    for r in range(rounds):
        order = (("lib", lib), ("floor", floor)) if r % 2 == 0 else (("floor", floor), ("lib", lib))
        for name, fn in order:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["lib"]) / statistics.median(times["floor"])


def best_ratio(bound: float, lib: Callable[[], object], floor: Callable[[], object], **kwargs) -> float:
    """:func:`interleaved_ratio`, measured again (up to 3 times in all) while it exceeds ``bound``; the lowest.

    A real regression exceeds the bound on every attempt; a burst of load from other processes rarely does.
    """
    ratios = [interleaved_ratio(lib, floor, **kwargs)]
    while ratios[-1] > bound and len(ratios) < 3:
        ratios.append(interleaved_ratio(lib, floor, **kwargs))
    return min(ratios)


BENCH = Path(__file__).parent.parent / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vae_toolkit_benchmarks_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)  # no side effects at import: main() sets up and cleans up
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory, bench) -> dict[str, Path]:
    photo = bench.photo  # the benchmark's photo-like images: realistic PNG/JPEG decode costs
    folder = tmp_path_factory.mktemp("perf")
    paths = {"png": folder / "photo.png", "jpg": folder / "photo.jpg"}
    photo(256).save(paths["png"])
    photo(256).save(paths["jpg"], quality=90)
    for i in range(12):
        photo(256, seed=i).save(folder / f"batch{i:02d}.png")
    return paths


# --- the plan's bounds --------------------------------------------------------------------------


def test_vae_loader_construction_under_100_ms() -> None:
    VAELoader()  # first construction may import lazily; the bound is for the ones a user repeats
    times = []
    for _ in range(5):
        start = time.perf_counter()
        VAELoader()
        times.append(time.perf_counter() - start)
    assert min(times) < 0.1, f"VAELoader() took {min(times) * 1e3:.1f} ms"


def test_device_manager_rss_growth_under_10_mb() -> None:
    code = (
        "import gc, json, psutil, torch, vae_toolkit\n"
        "p = psutil.Process(); gc.collect(); before = p.memory_info().rss\n"
        "dm = vae_toolkit.DeviceManager(); info = dm.get_device_info()\n"
        "gc.collect(); print(json.dumps(p.memory_info().rss - before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    assert growth < 10 * 1024**2, f"DeviceManager() + get_device_info() grew RSS by {growth / 1024**2:.1f} MB"


# --- ratios against the floors ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["png", "jpg"])
def test_file_to_tensor_within_2_5x_the_decode(images, kind) -> None:
    """``load_and_preprocess_image`` vs the bare decode ``np.asarray(Image.open(p).convert("RGB"))``."""
    path = images[kind]

    def floor():
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))

    ratio = best_ratio(2.5, lambda: load_and_preprocess_image(path, target_size=256), floor)
    assert ratio <= 2.5, f"file -> tensor took {ratio:.2f}x the decode of the same {kind.upper()}"


def test_tensor_to_pil_within_3x_its_floor() -> None:
    """``tensor_to_pil`` vs one arithmetic pass over the float tensor plus ``Image.fromarray`` of uint8 pixels."""
    torch.manual_seed(0)
    x = torch.rand(3, 256, 256) * 2.2 - 1.1  # a decoded image overshoots [-1, 1] a little
    xa = x.numpy()
    hwc = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)

    def floor():
        np.multiply(xa, np.float32(127.5))
        return Image.fromarray(hwc)

    ratio = best_ratio(3.0, lambda: tensor_to_pil(x), floor)
    assert ratio <= 3.0, f"tensor_to_pil took {ratio:.2f}x its floor"


def test_load_images_not_slower_than_sequential_calls(images) -> None:
    paths = sorted(images["png"].parent.glob("batch*.png"))

    def sequential():
        return [load_and_preprocess_image(p, target_size=256) for p in paths]

    ratio = best_ratio(1.5, lambda: load_images(paths, target_size=256), sequential, rounds=7)
    # 1.0 = as fast as one-by-one calls: about 0.65 on 2 idle cores, about 1.0 when other processes hold the
    # cores (threads cannot help then). 1.5 leaves room for that noise; a regression such as decoding twice,
    # or a lock that serialises the workers on top of the pool's overhead, goes beyond it.
    assert ratio <= 1.5, f"load_images took {ratio:.2f}x the time of sequential load_and_preprocess_image calls"


def test_cold_load_within_1_5x_from_pretrained(tmp_path, hf_home, registry) -> None:
    """A cold ``load_sd_vae`` of a local tiny model vs ``AutoencoderKL.from_pretrained`` of the same folder."""
    from conftest import make_tiny_vae
    from diffusers import AutoencoderKL

    make_tiny_vae().save_pretrained(tmp_path, safe_serialization=True)
    add_model_config("perf-tiny", {"repo_id": str(tmp_path), "subfolder": None})

    def floor():
        return AutoencoderKL.from_pretrained(str(tmp_path), low_cpu_mem_usage=False)

    ratio = best_ratio(1.5, lambda: VAELoader().load_sd_vae("perf-tiny", device="cpu"), floor, rounds=7)
    assert ratio <= 1.5, f"a cold load_sd_vae took {ratio:.2f}x from_pretrained"


# --- benchmarks/run.py --check ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "target", "higher_is_better", "expected"),
    [
        (1.10, 1.15, False, "met"),
        (1.15, 1.15, False, "met"),
        (1.29, 1.15, False, "missed within spread"),
        (1.31, 1.15, False, "MISSED"),
        (1.70, 1.60, True, "met"),
        (1.50, 1.60, True, "missed within spread"),
        (1.40, 1.60, True, "MISSED"),
    ],
)
def test_benchmark_status_allows_the_documented_spread_only(bench, value, target, higher_is_better, expected):
    assert bench.status(value, target, higher_is_better) == expected


@pytest.mark.parametrize(
    ("statuses", "check", "expected"),
    [
        (["met", "missed within spread"], True, 0),
        (["met", "MISSED"], False, 0),
        (["met", "MISSED"], True, 1),
        (["ERROR", "met"], False, 2),
        (["ERROR", "MISSED"], True, 2),
    ],
)
def test_benchmark_exit_status(bench, statuses, check, expected):
    rows = [bench.Row(f"row {i}", status=s) for i, s in enumerate(statuses)]
    assert bench.exit_status(rows, check) == expected


def test_benchmark_check_exits_1_for_a_slow_tensor_to_pil(bench, monkeypatch, capsys):
    def slow(x):
        for _ in range(7):
            tensor_to_pil(x)
        return tensor_to_pil(x)

    monkeypatch.setattr(bench, "tensor_to_pil", slow)
    assert bench.main(["--quick", "--check", "--only", "tensor_to_pil"]) == 1
    out = capsys.readouterr().out
    assert "| MISSED" in out and "exit 1" in out


def test_benchmark_that_raises_exits_non_zero_after_running_the_others(bench, monkeypatch, capsys):
    def broken(x):
        raise RuntimeError("tensor_to_pil is broken")

    monkeypatch.setattr(bench, "tensor_to_pil", broken)
    # the other benchmark, stubbed: this tests the runner, not what it measures
    monkeypatch.setattr(bench, "bench_device_rss", lambda reps: bench.ROWS.append(bench.Row("stub row")))
    assert bench.main(["--quick", "--only", "tensor_to_pil,device_rss"]) == 2
    captured = capsys.readouterr()
    assert "benchmark tensor_to_pil failed: RuntimeError: tensor_to_pil is broken" in captured.err
    assert "| stub row" in captured.out  # the other benchmark still ran and printed
    assert "ERROR" in captured.out and "exit 2" in captured.out


def test_benchmark_spread_is_the_one_the_docs_document(bench):
    root = BENCH.parent.parent
    performance = (root / "docs" / "performance.md").read_text(encoding="utf-8")  # README's summary lives there
    assert f"±{bench.SPREAD:.2f}" in performance
    assert "--check" in performance and "--check" in (root / "README.md").read_text(encoding="utf-8")


def test_evaluate_metrics_well_under_the_plain_library_calls() -> None:
    """PSNR, MAE, SSIM and MS-SSIM of a batch against pytorch-msssim's ``ssim`` + ``ms_ssim`` alone, called plainly
    on NCHW tensors: about 0.25 here (channels-last, 4 images folded into 12 channels, the first scale's SSIM
    reused). Back to the plain calls is about 1; without the reuse 0.47 (a scratch copy failed this test); without
    channels-last alone 0.41, which this bound does not always catch on a noisy machine."""
    from pytorch_msssim import ms_ssim, ssim

    from vae_toolkit.evaluate import _metrics, _window

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 176, 176, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int16) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    x, y = (torch.from_numpy(t).permute(0, 3, 1, 2).float().contiguous() for t in (a, b))
    win = _window(torch.device("cpu"))

    def plain() -> None:
        with torch.inference_mode():
            ssim(x, y, data_range=255, size_average=False, win=win)
            ms_ssim(x, y, data_range=255, size_average=False, win=win)

    assert best_ratio(0.36, lambda: _metrics(a, b), plain, rounds=9) <= 0.36
