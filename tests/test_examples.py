"""The scripts in examples/ run against the tiny offline model."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import write_hub_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_latent_optimization(tmp_path):
    hf_home = tmp_path / "hf"
    write_hub_model(hf_home, "CompVis/stable-diffusion-v1-4", "vae")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
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
