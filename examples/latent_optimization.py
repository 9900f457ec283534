"""Optimise latents so that the VAE decodes them into a target image.

The decoder stays frozen; Adam updates the latents through ``vae_toolkit.latents.decode``, which
applies the model's scaling (and shift) factor, so the latents are the ones a diffusion model sees.

    python examples/latent_optimization.py --model sd15 --image photo.png --steps 50
    python examples/latent_optimization.py --model sd14 --steps 20           # synthetic target
    python examples/latent_optimization.py --model flux2-klein --size 512    # any supported class, or a folder

Every autoencoder class vae-toolkit loads works the same way: ``latents.decode`` inverts the latent convention of
the model's own pipeline (FLUX.2's patchify and batch norm, Qwen-Image's and Wan's per-channel statistics, ...).
``--size`` must be a multiple of the model's spatial factor (8 for SD, 16 for FLUX.2, 32 for DC-AE).

``--loss`` picks what is minimised: ``mse`` (the default), ``l1``, ``lpips`` (AlexNet LPIPS), ``ssim``
(``1 - SSIM``) or ``mixed`` (``mse + 0.1 * lpips``, a common recipe). Prints the loss of every step, and PSNR,
SSIM and LPIPS of the start and the end, all from ``vae_toolkit.metrics``; ``-o out.png`` saves the final
decoded image. LPIPS needs its weight files in ``torch.hub.get_dir()/checkpoints`` (fetched there once when
online); offline without them, LPIPS is left out of the printed metrics and ``--loss lpips`` stops with a
message saying which file to put where.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from vae_toolkit import DeviceManager, VAELoader, list_available_models, metrics, pil_to_tensor, tensor_to_pil
from vae_toolkit import latents as vae_latents
from vae_toolkit.latent_formats import crop_multiple

LOSSES = ("mse", "l1", "lpips", "ssim", "mixed")


def loss_fn(name: str, decoded: torch.Tensor, target: torch.Tensor, lpips: metrics.LPIPS | None) -> torch.Tensor:
    """The scalar loss ``name`` of a decoded batch against the target, both in ``[-1, 1]``.

    A decoder's output is not clamped and may overshoot ``[-1, 1]``; the metrics check the range of their inputs, so
    the SSIM and LPIPS terms see it clamped (as an image is saved).
    """
    if name in ("ssim", "lpips", "mixed"):
        pixels = decoded.clamp(-1, 1)
    if name == "mse":
        return torch.nn.functional.mse_loss(decoded, target)
    if name == "l1":
        return torch.nn.functional.l1_loss(decoded, target)
    if name == "ssim":
        return 1 - metrics.ssim(pixels, target).mean()
    assert lpips is not None, "the LPIPS losses need the LPIPS module"
    if name == "lpips":
        return lpips(pixels, target).mean()
    if name == "mixed":
        return torch.nn.functional.mse_loss(decoded, target) + 0.1 * lpips(pixels, target).mean()
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


def report(label: str, decoded: torch.Tensor, target: torch.Tensor, lpips: metrics.LPIPS | None) -> None:
    """Print PSNR, SSIM and (when the LPIPS module is there) LPIPS of ``decoded`` against ``target``."""
    decoded = decoded.clamp(-1, 1)  # as the image is saved
    with torch.no_grad():
        line = f"{label}: PSNR {metrics.psnr(decoded, target).mean().item():.2f} dB"
        if min(target.shape[-2:]) >= 11:  # SSIM's window
            line += f"  SSIM {metrics.ssim(decoded, target).mean().item():.4f}"
        if lpips is not None:
            line += f"  LPIPS {lpips(decoded, target).mean().item():.4f}"
    print(line)


def load_lpips(required: bool, size: int) -> metrics.LPIPS | None:
    """AlexNet LPIPS, or None (with a note) when its weights cannot be had or the images are too small for it.

    Exits with the reason when the loss needs it.
    """
    try:
        module = metrics.LPIPS("alex")
    except metrics.WeightsUnavailableError as err:
        if required:
            sys.exit(f"error: {err}")
        print(f"note: LPIPS left out of the metrics: {err}")
        return None
    if size < module.min_side:
        if required:
            sys.exit(f"error: LPIPS (AlexNet) needs images of at least {module.min_side} pixels; use a larger --size")
        print(f"note: LPIPS left out of the metrics: the images are smaller than {module.min_side} pixels")
        return None
    return module


def synthetic_target(size: int) -> torch.Tensor:
    """A smooth colour pattern in ``[-1, 1]``, shape ``[1, 3, size, size]``."""
    axis = torch.linspace(0, 2 * math.pi, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    rgb = torch.stack([torch.sin(x), torch.cos(y), torch.sin(x + y) * 0.5])
    return (rgb * 0.8).unsqueeze(0)


def load_target(path: str, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        return pil_to_tensor(img, target_size=size).unsqueeze(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="sd14", help=f"registered VAE ({', '.join(list_available_models())}) or a model folder"
    )
    parser.add_argument("--image", help="target image (resized and center-cropped); default: a synthetic pattern")
    parser.add_argument("--size", type=int, default=256, help="target size in pixels, a multiple of 8")
    parser.add_argument("--steps", type=int, default=50, help="Adam steps")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    parser.add_argument("--loss", default="mse", choices=LOSSES, help="what to minimise (mixed: mse + 0.1 lpips)")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N")
    parser.add_argument("-o", "--output", help="save the final decoded image here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.size < 8 or args.size % 8:
        parser.error("--steps must be >= 1 and --size a positive multiple of 8")
    if args.loss == "ssim" and args.size < 16:
        parser.error("--loss ssim needs --size 16 or more (SSIM's window is 11 pixels)")

    lpips = load_lpips(required=args.loss in ("lpips", "mixed"), size=args.size)  # fails before the VAE loads
    dm = DeviceManager(args.device)
    loader = VAELoader(device_manager=dm)
    vae, device = loader.load_sd_vae(args.model)
    vae.requires_grad_(False)  # only the latents are optimised
    if args.size % crop_multiple([vae]):
        parser.error(f"--size must be a multiple of {crop_multiple([vae])}, the spatial factor of {args.model}")
    lpips = lpips.to(device) if lpips is not None else None
    print(f"model {args.model} on {device}")
    if summary := dm.get_memory_summary():
        print(summary)

    target = load_target(args.image, args.size) if args.image else synthetic_target(args.size)
    target = dm.move_to_device(target)

    # Start from the latents of a blurred target: close, but with detail left to recover.
    blurred = torch.nn.functional.avg_pool2d(target, 8)
    blurred = torch.nn.functional.interpolate(blurred, size=target.shape[-2:], mode="bilinear")
    with torch.no_grad():
        init = vae_latents.encode(vae, blurred)
        report("start", vae_latents.decode(vae, init), target, lpips)
    z = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=args.lr)

    print(f"loss {args.loss}")
    for step in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(args.loss, vae_latents.decode(vae, z), target, lpips)
        loss.backward()
        optimizer.step()
        print(f"step {step:4d}/{args.steps}  loss {loss.item():.6f}")

    with torch.no_grad():
        final = vae_latents.decode(vae, z)
        final_loss = loss_fn(args.loss, final, target, lpips).item()
    print(f"final loss {final_loss:.6f}")
    report("end", final, target, lpips)
    if args.output:
        tensor_to_pil(final[0]).save(args.output)
        print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
