"""Optimise latents so that the VAE decodes them into a target image.

The decoder stays frozen; Adam updates the latents through ``vae_toolkit.latents.decode``, which
applies the model's scaling (and shift) factor, so the latents are the ones a diffusion model sees.

    python examples/latent_optimization.py --model sd15 --image photo.png --steps 50
    python examples/latent_optimization.py --model sd14 --steps 20           # synthetic target

Prints the loss of every step; ``-o out.png`` saves the final decoded image.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from vae_toolkit import DeviceManager, VAELoader, list_available_models, pil_to_tensor, tensor_to_pil
from vae_toolkit import latents as vae_latents


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
    parser.add_argument("--model", default="sd14", choices=list_available_models(), help="registered VAE name")
    parser.add_argument("--image", help="target image (resized and center-cropped); default: a synthetic pattern")
    parser.add_argument("--size", type=int, default=256, help="target size in pixels, a multiple of 8")
    parser.add_argument("--steps", type=int, default=50, help="Adam steps")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    parser.add_argument("--device", default="auto", help="auto, cpu, mps, cuda or cuda:N")
    parser.add_argument("-o", "--output", help="save the final decoded image here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.size < 8 or args.size % 8:
        parser.error("--steps must be >= 1 and --size a positive multiple of 8")

    dm = DeviceManager(args.device)
    loader = VAELoader(device_manager=dm)
    vae, device = loader.load_sd_vae(args.model)
    vae.requires_grad_(False)  # only the latents are optimised
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
    z = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=args.lr)

    for step in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(vae_latents.decode(vae, z), target)
        loss.backward()
        optimizer.step()
        print(f"step {step:4d}/{args.steps}  loss {loss.item():.6f}")

    with torch.no_grad():
        final = vae_latents.decode(vae, z)
        final_loss = torch.nn.functional.mse_loss(final, target).item()
    print(f"final loss {final_loss:.6f}")
    if args.output:
        tensor_to_pil(final[0]).save(args.output)
        print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
