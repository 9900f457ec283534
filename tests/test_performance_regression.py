"""Generous sanity bounds only (SPEC §2); ratios against the floors are printed by benchmarks/run.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from vae_toolkit import VAELoader


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
