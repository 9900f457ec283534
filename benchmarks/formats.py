"""Benchmark: ``latents.encode`` + ``latents.decode`` against diffusers called directly, for every supported class.

For each published architecture (the configs of tests/test_latent_formats.py, at their published widths and
depths, random weights, as none can be downloaded here), one image of ``--size`` pixels is encoded and decoded
``--rounds`` times by each side, alternating, under ``torch.inference_mode()``:

- diffusers directly: the model's ``encode`` (the posterior's mode, or ``.latent`` / ``.latents``), the
  normalisation its pipeline applies written out inline, the inverse, and ``decode``; for the video-shaped
  classes the frame axis added and dropped by hand;
- vae-toolkit: ``latents.encode(vae, x)`` and ``latents.decode(vae, z)`` (shape checks, the latent format, the
  tiling context, the NaN check of a decode).

The figure is the median of the rounds' ratios (vae-toolkit / direct; target <= 1.03). Both sides give the same
latents and images (checked once per class within 1e-4 of their magnitude). Timings on a shared machine are noisy:
read the ratios, measured in one run.

    python benchmarks/formats.py [--size 256] [--rounds 5] [--classes sd35 flux2 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from test_latent_formats import PUBLISHED, build

from vae_toolkit import latents
from vae_toolkit.latent_formats import latent_format


def direct(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and decode as a pipeline's own lines do, for the class of ``vae``."""
    name = type(vae).__name__
    c = vae.config
    if name in ("AutoencoderKLQwenImage", "AutoencoderKLWan"):
        z = vae.encode(x[:, :, None]).latent_dist.mode()
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
        z = (z - mean) / std
        y = vae.decode(z * std + mean).sample[:, :, 0]
        return z[:, :, 0], y
    if name == "AutoencoderKLFlux2":
        z = vae.encode(x).latent_dist.mode()
        n, ch, h, w = z.shape
        z = z.view(n, ch, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, ch * 4, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps)
        z = (z - mean) / std
        u = (z * std + mean).reshape(n, ch, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(n, ch, h, w)
        return z, vae.decode(u).sample
    if name == "AutoencoderDC":
        z = vae.encode(x).latent * c.scaling_factor
        return z, vae.decode(z / c.scaling_factor).sample
    if name == "AutoencoderTiny":
        shift = getattr(c, "shift_factor", None) or 0.0
        z = (vae.encode(x).latents - shift) * c.scaling_factor
        return z, vae.decode(z / c.scaling_factor + shift).sample
    if name == "AutoencoderKLHunyuanImage":
        z = vae.encode(x).latent_dist.mode() * c.scaling_factor
        return z, vae.decode(z / c.scaling_factor).sample
    shift = getattr(c, "shift_factor", None) or 0.0
    z = (vae.encode(x).latent_dist.mode() - shift) * c.scaling_factor
    return z, vae.decode(z / c.scaling_factor + shift).sample


def library(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = latents.encode(vae, x, tile=False)
    return z, latents.decode(vae, z, tile=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--classes", nargs="*", default=list(PUBLISHED))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {args.size}x{args.size}, "
          f"{args.rounds} rounds")  # fmt: skip
    print(f"{'config':<20} {'class':<26} {'direct s':>9} {'library s':>10} {'ratio':>6}")
    for key in args.classes:
        class_name, _repo, _sub, config, _shrink, _expected = PUBLISHED[key]
        vae = build(class_name, config)
        factor = latent_format(vae).spatial_factor
        size = args.size - args.size % factor
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.inference_mode():
            (z0, y0), (z1, y1) = direct(vae, x), library(vae, x)  # warm-up and the check
            for a, b in ((z0, z1), (y0, y1)):
                assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max())), key
            ratios, times = [], {"direct": [], "library": []}
            for r in range(args.rounds):
                order = ("direct", "library") if r % 2 == 0 else ("library", "direct")
                took = {}
                for side in order:
                    start = time.perf_counter()
                    (direct if side == "direct" else library)(vae, x)
                    took[side] = time.perf_counter() - start
                    times[side].append(took[side])
                ratios.append(took["library"] / took["direct"])
        print(f"{key:<20} {class_name:<26} {statistics.median(times['direct']):>9.3f} "
              f"{statistics.median(times['library']):>10.3f} {statistics.median(ratios):>6.3f}")  # fmt: skip
        del vae


if __name__ == "__main__":
    main()
