"""Benchmark of ``python -m vae_toolkit fid A B`` against ``python -m pytorch_fid A B``: same folders, same weights.

Two folders of ``--images`` generated images each (smooth colour fields plus noise: photo-like file sizes), in one
or more formats (``--sets``: ``png299``, PNG 299x299, the size pytorch-fid's network takes; ``jpeg512``, JPEG 512x512;
``jpeg4x3``, JPEG 1024x768, a camera-like aspect), and pytorch-fid's Inception weights as seeded random tensors
in the real file's layout (``tests/metric_weights.py``) in a temporary ``TORCH_HOME``, read by both sides: nothing
is downloaded. Each round runs both commands once, in alternating order, as fresh processes (imports included, as
a user meets them), with their default workers (pytorch-fid: one DataLoader process per core, at most 8; the
library: one decoding thread per core); the figure is the median over the rounds of library time / pytorch-fid
time (below 1: the library is faster). The two printed FIDs are compared too.

At ``--dims 64`` the network is its first block only, so the time is mostly reading and resizing the images: the
loaders compared. At 2048 the whole Inception-v3 runs, and the run ends with the same 2048x2048 matrix square
root on both sides (scipy, tens of seconds on 2 cores), which the ratio includes.

pytorch-fid (0.3.0) needs torchvision, which does not import against every torch build: ``--pytorch-fid-python``
names an interpreter that has it (default: this one). Without it the library is timed alone, said in one line.

    python benchmarks/fid.py [--images 200] [--rounds 3] [--dims 64 2048] [--sets png299 jpeg512]
                             [--pytorch-fid-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import metric_weights

SETS = {"png299": ((299, 299), "png"), "jpeg512": ((512, 512), "jpg"), "jpeg4x3": ((1024, 768), "jpg")}


def make_folder(folder: Path, n: int, size: tuple[int, int], ext: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
        noisy = np.clip(img + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:05d}.{ext}", quality=90)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, the FID printed) of one command run as a fresh process."""
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    match = re.search(r"FID:\s+([-+0-9.eE]+|nan|inf)", out.stdout)
    if match is None:
        raise RuntimeError(f"no FID in the output of {' '.join(cmd)}:\n{out.stdout[-500:]}")
    return seconds, float(match.group(1))


def has_pytorch_fid(python: str, env: dict[str, str]) -> bool:
    probe = subprocess.run([python, "-c", "import pytorch_fid.fid_score"], env=env, capture_output=True)
    return probe.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images per folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dims", type=int, nargs="+", default=[64])
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["png299", "jpeg512"])
    parser.add_argument("--pytorch-fid-python", default=sys.executable, help="an interpreter with pytorch-fid")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fid_bench_") as tmp:
        root = Path(tmp)
        metric_weights.plant(root / "torch" / "hub" / "checkpoints", (metric_weights.FID_INCEPTION,))
        repo = str(Path(__file__).resolve().parents[1])
        env = {
            **os.environ,
            "TORCH_HOME": str(root / "torch"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
        }
        reference = has_pytorch_fid(args.pytorch_fid_python, env)
        if not reference:
            print(f"pytorch-fid is not importable by {args.pytorch_fid_python}: timing the library alone")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"{os.cpu_count()} CPUs (load average {load}), {args.images} + {args.images} images, {args.rounds} rounds"
        )
        for name in args.sets:
            size, ext = SETS[name]
            a, b = root / name / "a", root / name / "b"
            make_folder(a, args.images, size, ext, seed=1)
            make_folder(b, args.images, size, ext, seed=2)
            for dims in args.dims:
                ours_cmd = [sys.executable, "-m", "vae_toolkit", "fid", str(a), str(b), "--dims", str(dims)]
                theirs_cmd = [args.pytorch_fid_python, "-m", "pytorch_fid", str(a), str(b), "--dims", str(dims)]
                theirs_cmd += ["--device", "cpu"]
                ours_t, theirs_t, ratios = [], [], []
                for r in range(args.rounds):
                    order = ["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]
                    times: dict[str, tuple[float, float]] = {}
                    for side in order:
                        if side == "ours":
                            times[side] = run(ours_cmd, env)
                        elif reference:
                            times[side] = run(theirs_cmd, env)
                    ours_t.append(times["ours"][0])
                    if reference:
                        theirs_t.append(times["theirs"][0])
                        ratios.append(times["ours"][0] / times["theirs"][0])
                fid_ours = times["ours"][1]
                line = f"{name} ({size[0]}x{size[1]} {ext}), {dims}-d: library {statistics.median(ours_t):.2f} s"
                if reference:
                    fid_theirs = times["theirs"][1]
                    rel = abs(fid_ours - fid_theirs) / max(abs(fid_theirs), 1e-12)
                    line += (
                        f", pytorch-fid {statistics.median(theirs_t):.2f} s; library / pytorch-fid median "
                        f"{statistics.median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
                        f"FID {fid_ours:.6g} vs {fid_theirs:.6g} (relative {rel:.1e})"
                    )
                print(line, flush=True)


if __name__ == "__main__":
    main()
