"""vae_toolkit.running: totals over batches equal the functions over all images; two gloo ranks equal one process.

LPIPS weights are seeded random tensors in a temporary ``TORCH_HOME`` (``tests/metric_weights.py``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import metric_weights as mw
import numpy as np
import pytest
import torch

from vae_toolkit import kid, metrics, running

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def planted_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    mw.plant(home / "hub" / "checkpoints", (mw.ALEXNET, mw.LPIPS_ALEX, mw.FID_INCEPTION))
    return home


@pytest.fixture(autouse=True)
def _torch_home(planted_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _images(n: int, size: tuple[int, int] = (32, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = mw.lpips_images(8, n=n, size=size)
    y[1] = (x[1] + 0.3 * (y[1] - x[1])).clamp(-1, 1)  # errors that vary between images: pooled != mean
    return x, y


CASES = {
    "psnr": (running.RunningPSNR, metrics.psnr, (32, 40)),
    "ssim": (running.RunningSSIM, metrics.ssim, (32, 40)),
    "ms_ssim": (running.RunningMSSSIM, metrics.ms_ssim, (161, 161)),
    "mae": (running.RunningMAE, metrics.mae, (32, 40)),
    "lpips": (running.RunningLPIPS, metrics.lpips, (32, 40)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_totals_over_batches_equal_the_function_over_all_images(name):
    cls, function, size = CASES[name]
    n = 3 if name == "ms_ssim" else 5
    x, y = _images(n, size)
    metric = cls()
    returned = [metric.update(x[:2], y[:2]), metric(x[2:], y[2:])]  # update, and forward (torchmetrics')
    values = function(x, y).double()
    assert metric.count == n
    torch.testing.assert_close(torch.cat(returned).double(), values)
    assert metric.compute().dtype == torch.float64
    assert float(metric.compute()) == pytest.approx(float(function(x, y, reduction="mean")), rel=1e-6)
    assert float(metric.std()) == pytest.approx(float(np.std(values.numpy())), rel=1e-6, abs=1e-9)


def test_pooled_psnr_over_batches_equals_the_pooled_function_and_differs_from_the_mean():
    x, y = _images(5)
    pooled, mean = running.RunningPSNR(reduction="pooled"), running.RunningPSNR()
    for start in range(0, 5, 2):
        pooled.update(x[start : start + 2], y[start : start + 2])
        mean.update(x[start : start + 2], y[start : start + 2])
    expected = float(metrics.psnr(x, y, reduction="pooled"))
    assert float(pooled.compute()) == pytest.approx(expected, rel=1e-6)
    se = (((x.double() - y.double()) * 127.5) ** 2).mean()  # the published definition, written out
    assert float(pooled.compute()) == pytest.approx(10 * math.log10(255**2 / float(se)), rel=1e-6)
    assert float(mean.compute()) > float(pooled.compute()) + 0.5


def test_pooled_psnr_pools_over_pixels_when_images_differ_in_size():
    x, y = _images(2)
    small_x, small_y = x[:, :, :16, :16], y[:, :, :16, :16]
    metric = running.RunningPSNR(reduction="pooled")
    metric.update(x, y)
    metric.update(small_x, small_y)
    squared = torch.cat([((x - y) * 127.5).flatten(), ((small_x - small_y) * 127.5).flatten()]).double().square()
    assert float(metric.compute()) == pytest.approx(10 * math.log10(255**2 / float(squared.mean())), rel=1e-6)


def test_identical_images_give_an_inf_mean_and_a_nan_std_but_a_finite_pooled_psnr():
    x, y = _images(2)
    y[0] = x[0]
    mean, pooled = running.RunningPSNR(), running.RunningPSNR(reduction="pooled")
    mean.update(x, y)
    pooled.update(x, y)
    assert float(mean.compute()) == math.inf and math.isnan(float(mean.std()))
    assert math.isfinite(float(pooled.compute()))


def test_declared_ranges_and_uint8():
    x, y = _images(3)
    u, v = ((x + 1) * 127.5).round().to(torch.uint8), ((y + 1) * 127.5).round().to(torch.uint8)
    signed, levels = running.RunningSSIM(), running.RunningSSIM(input_range=(0, 255))
    signed.update(u / 127.5 - 1, v / 127.5 - 1)
    levels.update(u, v)
    assert float(levels.compute()) == pytest.approx(float(signed.compute()), rel=1e-7)
    with pytest.raises(ValueError, match=r"x holds values in \[2, 253\].*input_range=\(-1, 1\)"):
        signed.update(u.float(), v.float())
    assert signed.count == 3  # the refused batch is not counted


def test_reset_forgets_and_an_empty_total_is_an_error():
    x, y = _images(2)
    metric = running.RunningMAE()
    metric.update(x, y)
    metric.reset()
    assert metric.count == 0
    with pytest.raises(ValueError, match=r"RunningMAE has no images: call update\(x, y\) before compute\(\)"):
        metric.compute()
    with pytest.raises(ValueError, match="RunningPSNR has no images"):
        running.RunningPSNR(reduction="pooled").compute()


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: running.RunningPSNR(reduction="sum"), r"reduction must be one of 'mean', 'pooled', got 'sum'"),
        (lambda: running.RunningSSIM(input_range=(0, 2)), r"input_range must be .* got \(0, 2\)"),
        (lambda: running.RunningLPIPS("resnet"), "net must be 'alex', 'vgg' or 'squeeze'"),
    ],
)
def test_bad_settings_are_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_modules_move_and_keep_a_float64_state():
    metric = running.RunningLPIPS()
    metric.half().float()
    assert metric.state.dtype == torch.float64 and next(metric.lpips.parameters()).dtype == torch.float32
    assert "state" in metric.state_dict()  # saved with a checkpoint, as torchmetrics' states
    metric.to("meta")
    assert metric.state.device.type == "meta" and metric.state.dtype == torch.float64


_RANKS_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
import metric_weights as mw
from vae_toolkit import kid, running

dist.init_process_group("gloo")
rank = dist.get_rank()
x, y = torch.load(sys.argv[2])
mine = slice(0, 3) if rank == 0 else slice(3, 5)  # unequal parts
metrics = {
    "psnr": running.RunningPSNR(), "pooled": running.RunningPSNR(reduction="pooled"), "ssim": running.RunningSSIM(),
    "mae": running.RunningMAE(), "lpips": running.RunningLPIPS(),
}
for m in metrics.values():
    m.update(x[mine], y[mine])
out = {name: [float(m.compute()), float(m.std()), m.count] for name, m in metrics.items()}
again = float(metrics["psnr"].compute())  # computing again counts nothing twice
g = torch.Generator().manual_seed(3)
real, fake = torch.randn(9, 64, generator=g), torch.randn(7, 64, generator=g) + 0.5
k = kid.KernelInceptionDistance(64, subsets=4, subset_size=5)
k.update_features(real[:6] if rank == 0 else real[6:], real=True)
k.update_features(fake[:2] if rank == 0 else fake[2:], real=False)
kid_value = k.compute()
if rank == 0:
    out["again"] = again
    out["kid"] = list(kid_value)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
dist.destroy_process_group()
"""


def test_two_gloo_ranks_equal_one_process(tmp_path, planted_home):
    x, y = _images(5)
    torch.save((x, y), tmp_path / "images.pt")
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    out = tmp_path / "out.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "TORCH_HOME": str(planted_home),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    cmd.append(str(tmp_path / "images.pt"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    single = {
        "psnr": running.RunningPSNR(),
        "pooled": running.RunningPSNR(reduction="pooled"),
        "ssim": running.RunningSSIM(),
        "mae": running.RunningMAE(),
        "lpips": running.RunningLPIPS(),
    }
    for name, metric in single.items():
        metric.update(x, y)
        mean, std, count = result[name]
        assert count == 3  # rank 0's own images; the totals are every rank's
        assert mean == pytest.approx(float(metric.compute()), rel=1e-6), name
        assert std == pytest.approx(float(metric.std()), rel=1e-5), name
    assert result["again"] == result["psnr"][0]
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(9, 64, generator=g), torch.randn(7, 64, generator=g) + 0.5
    assert tuple(result["kid"]) == kid.kernel_inception_distance(real, fake, subsets=4, subset_size=5)
