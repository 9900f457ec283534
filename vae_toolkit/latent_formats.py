"""The latent conventions of the diffusers autoencoder classes vae-toolkit loads.

Each class's pipeline turns the model's raw latent into the tensor its denoiser sees in its own way; this module
describes that once per class. (Work in progress: the format objects are added here.)
"""

from __future__ import annotations

__all__ = ["SUPPORTED_CLASSES"]

#: The diffusers classes vae-toolkit loads, encodes with and decodes with (``config.json`` ``_class_name``).
SUPPORTED_CLASSES: tuple[str, ...] = (
    "AutoencoderKL",
    "AutoencoderKLFlux2",
    "AutoencoderKLQwenImage",
    "AutoencoderKLWan",
    "AutoencoderDC",
    "AutoencoderTiny",
    "AutoencoderKLHunyuanImage",
)
