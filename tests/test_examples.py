"""The scripts in examples/ run against the tiny offline model."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import metric_weights
import pytest
from conftest import write_hub_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_latent_optimization(tmp_path):
    hf_home = tmp_path / "hf"
    write_hub_model(hf_home, "CompVis/stable-diffusion-v1-4", "vae")
    # no LPIPS weights here, and offline: LPIPS is left out of the printed metrics with a note
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    out_png = tmp_path / "final.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "latent_optimization.py"),
            "--model",
            "sd14",
            "--steps",
            "3",
            "--size",
            "32",
            "--device",
            "cpu",
            "-o",
            str(out_png),
        ],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    losses = [float(x) for x in re.findall(r"^step +\d+/3 +loss ([\d.eE+-]+)$", proc.stdout, flags=re.M)]
    assert len(losses) == 3, proc.stdout
    final = float(re.search(r"^final loss ([\d.eE+-]+)$", proc.stdout, flags=re.M).group(1))
    assert all(math.isfinite(x) for x in [*losses, final])
    assert final < losses[0]
    assert out_png.is_file()
    assert re.search(r"^start: PSNR [\d.]+ dB  SSIM [\d.]+$", proc.stdout, flags=re.M), proc.stdout
    assert "note: LPIPS left out of the metrics: alexnet-owt-7be5be79.pth" in proc.stdout


def _example():
    spec = importlib.util.spec_from_file_location("latent_optimization", EXAMPLES / "latent_optimization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loss", ["mse", "l1", "lpips", "ssim", "mixed"])
def test_latent_optimization_losses_go_down(loss, hf_home, tmp_path, monkeypatch, capsys):
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    metric_weights.plant(checkpoints, (metric_weights.ALEXNET, metric_weights.LPIPS_ALEX))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    argv = ["--model", "sd14", "--steps", "4", "--size", "32", "--device", "cpu", "--loss", loss]
    assert _example().main(argv) == 0
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"^step +\d+/4 +loss ([\d.eE+-]+)$", out, flags=re.M)]
    final = float(re.search(r"^final loss ([\d.eE+-]+)$", out, flags=re.M).group(1))
    assert len(losses) == 4 and all(math.isfinite(x) for x in [*losses, final]), out
    assert final < losses[0], out
    for label in ("start", "end"):
        assert re.search(rf"^{label}: PSNR [\d.]+ dB  SSIM [\d.]+  LPIPS [\d.]+$", out, flags=re.M), out


def test_latent_optimization_lpips_loss_offline_without_weights_stops_before_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit, match="lpips-v0.1-alex.pth|alexnet-owt-7be5be79.pth"):
        _example().main(["--model", "sd14", "--steps", "1", "--size", "32", "--device", "cpu", "--loss", "lpips"])
