"""Registry of known VAEs and Hugging Face token lookup.

Every entry holds at least ``repo_id``; the built-in entries also carry ``subfolder``,
``description``, ``input_size``, ``latent_channels``, ``scaling_factor``, ``shift_factor``,
``notes``, ``class_name`` (the diffusers class of the VAE) and ``gated`` (the hub repo asks
for a license to be accepted and a token). ``repo_id`` may also be a local folder.

``scaling_factor`` / ``shift_factor`` are the scalars of the SD-style convention ``(z - shift) * scale``;
they are ``None`` for the VAEs whose pipelines normalise otherwise (per-channel ``latents_mean`` /
``latents_std`` of Qwen-Image and Wan, the batch-norm statistics of FLUX.2): ``latent_formats`` describes
each convention.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from typing import Any

from ._warnings import VAEToolkitWarning

__all__ = [
    "MODEL_CONFIGS",
    "ACCEPTED_CONFIG_KEYS",
    "get_model_config",
    "get_all_model_configs",
    "list_available_models",
    "add_model_config",
    "get_default_token",
]

_GATED = "gated: accept the license on the repo's hub page, then set HF_TOKEN"


MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "sd14": {
        "repo_id": "CompVis/stable-diffusion-v1-4",
        "subfolder": "vae",
        "description": "Stable Diffusion v1.4 VAE",
        "input_size": (512, 512),
        "latent_channels": 4,
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "notes": "",
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": False,
    },
    "sd15": {
        "repo_id": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "subfolder": "vae",
        "description": "Stable Diffusion v1.5 VAE",
        "input_size": (512, 512),
        "latent_channels": 4,
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "notes": "maintained copy of the removed runwayml/stable-diffusion-v1-5",
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": False,
    },
    "sd-vae-ft-mse": {
        "repo_id": "stabilityai/sd-vae-ft-mse",
        "subfolder": None,
        "description": "SD 1.x VAE decoder fine-tuned with MSE loss (smoother)",
        "input_size": (512, 512),
        "latent_channels": 4,
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "notes": "",
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": False,
    },
    "sd-vae-ft-ema": {
        "repo_id": "stabilityai/sd-vae-ft-ema",
        "subfolder": None,
        "description": "SD 1.x VAE decoder fine-tuned with EMA weights (sharper)",
        "input_size": (512, 512),
        "latent_channels": 4,
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "notes": "",
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": False,
    },
    "sdxl": {
        "repo_id": "stabilityai/sdxl-vae",
        "subfolder": None,
        "description": "Stable Diffusion XL VAE",
        "input_size": (1024, 1024),
        "latent_channels": 4,
        "scaling_factor": 0.13025,
        "shift_factor": None,
        "notes": "unsafe in float16 (decodes to NaN); use float32 or sdxl-fp16-fix",
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": False,
    },
    "sdxl-fp16-fix": {
        "repo_id": "madebyollin/sdxl-vae-fp16-fix",
        "subfolder": None,
        "description": "SDXL VAE fine-tuned to run in float16 without overflow",
        "input_size": (1024, 1024),
        "latent_channels": 4,
        "scaling_factor": 0.13025,
        "shift_factor": None,
        "notes": "safe in float16",
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": False,
    },
    "flux-schnell": {
        "repo_id": "black-forest-labs/FLUX.1-schnell",
        "subfolder": "vae",
        "description": "FLUX.1 [schnell] 16-channel VAE",
        "input_size": (1024, 1024),
        "latent_channels": 16,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "notes": "16 latent channels; latents use a shift factor",
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": False,
    },
    "sd35": {
        "repo_id": "stabilityai/stable-diffusion-3.5-large",
        "subfolder": "vae",
        "description": "Stable Diffusion 3.5 (Large, Medium, Large Turbo) 16-channel VAE",
        "input_size": (1024, 1024),
        "latent_channels": 16,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "notes": "16 latent channels; latents use a shift factor; " + _GATED,
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": True,
    },
    "flux-dev": {
        "repo_id": "black-forest-labs/FLUX.1-dev",
        "subfolder": "vae",
        "description": "FLUX.1 [dev] 16-channel VAE (the same as FLUX.1 [schnell]'s)",
        "input_size": (1024, 1024),
        "latent_channels": 16,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "notes": "16 latent channels; latents use a shift factor; " + _GATED,
        "class_name": "AutoencoderKL",
        "spatial_factor": 8,
        "gated": True,
    },
    "flux2-dev": {
        "repo_id": "black-forest-labs/FLUX.2-dev",
        "subfolder": "vae",
        "description": "FLUX.2 [dev] 32-channel VAE (shared by every FLUX.2 model)",
        "input_size": (1024, 1024),
        "latent_channels": 32,
        "scaling_factor": None,
        "shift_factor": None,
        "notes": "32 latent channels, 2x2-patchified and batch-normalised by the pipeline; " + _GATED,
        "class_name": "AutoencoderKLFlux2",
        "spatial_factor": 16,
        "gated": True,
    },
    "flux2-klein": {
        "repo_id": "black-forest-labs/FLUX.2-klein-4B",
        "subfolder": "vae",
        "description": "FLUX.2 [klein] 4B's copy of the FLUX.2 VAE (Apache-2.0, not gated)",
        "input_size": (1024, 1024),
        "latent_channels": 32,
        "scaling_factor": None,
        "shift_factor": None,
        "notes": "32 latent channels, 2x2-patchified and batch-normalised by the pipeline; not gated",
        "class_name": "AutoencoderKLFlux2",
        "spatial_factor": 16,
        "gated": False,
    },
    "flux2-klein-9b": {
        "repo_id": "black-forest-labs/FLUX.2-klein-9B",
        "subfolder": "vae",
        "description": "FLUX.2 [klein] 9B's copy of the FLUX.2 VAE",
        "input_size": (1024, 1024),
        "latent_channels": 32,
        "scaling_factor": None,
        "shift_factor": None,
        "notes": "32 latent channels, 2x2-patchified and batch-normalised by the pipeline; " + _GATED,
        "class_name": "AutoencoderKLFlux2",
        "spatial_factor": 16,
        "gated": True,
    },
    "qwen-image": {
        "repo_id": "Qwen/Qwen-Image",
        "subfolder": "vae",
        "description": "Qwen-Image 16-channel VAE (video-shaped: an image is one frame)",
        "input_size": (1328, 1328),
        "latent_channels": 16,
        "scaling_factor": None,
        "shift_factor": None,
        "notes": "16 latent channels, normalised per channel by the config's latents_mean / latents_std",
        "class_name": "AutoencoderKLQwenImage",
        "spatial_factor": 8,
        "gated": False,
    },
    "wan21": {
        "repo_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        "subfolder": "vae",
        "description": "Wan 2.1 16-channel video VAE (8x spatial, 4x temporal)",
        "input_size": (480, 832),
        "latent_channels": 16,
        "scaling_factor": None,
        "shift_factor": None,
        "notes": "16 latent channels, normalised per channel by the config's latents_mean / latents_std",
        "class_name": "AutoencoderKLWan",
        "spatial_factor": 8,
        "gated": False,
    },
    "wan22": {
        "repo_id": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        "subfolder": "vae",
        "description": "Wan 2.2 TI2V-5B 48-channel video VAE (16x spatial, 4x temporal)",
        "input_size": (704, 1280),
        "latent_channels": 48,
        "scaling_factor": None,
        "shift_factor": None,
        "notes": "48 latent channels, normalised per channel by the config's latents_mean / latents_std",
        "class_name": "AutoencoderKLWan",
        "spatial_factor": 16,
        "gated": False,
    },
    "sana-dc-ae": {
        "repo_id": "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
        "subfolder": None,
        "description": "SANA's deep-compression autoencoder DC-AE f32c32 (32x spatial, no posterior)",
        "input_size": (1024, 1024),
        "latent_channels": 32,
        "scaling_factor": 0.41407,
        "shift_factor": None,
        "notes": "32x spatial compression; deterministic (no posterior to sample)",
        "class_name": "AutoencoderDC",
        "spatial_factor": 32,
        "gated": False,
    },
    "hunyuanimage-2.1": {
        "repo_id": "hunyuanvideo-community/HunyuanImage-2.1-Diffusers",
        "subfolder": "vae",
        "description": "HunyuanImage 2.1 64-channel VAE (32x spatial)",
        "input_size": (2048, 2048),
        "latent_channels": 64,
        "scaling_factor": 0.75289,
        "shift_factor": None,
        "notes": "64 latent channels, 32x spatial compression",
        "class_name": "AutoencoderKLHunyuanImage",
        "spatial_factor": 32,
        "gated": False,
    },
    "taesd": {
        "repo_id": "madebyollin/taesd",
        "subfolder": None,
        "description": "Tiny autoencoder for SD 1.x / 2.x latents (fast previews)",
        "input_size": (512, 512),
        "latent_channels": 4,
        "scaling_factor": 1.0,
        "shift_factor": None,
        "notes": "fast approximate decoder; deterministic (no posterior to sample)",
        "class_name": "AutoencoderTiny",
        "spatial_factor": 8,
        "gated": False,
    },
    "taesdxl": {
        "repo_id": "madebyollin/taesdxl",
        "subfolder": None,
        "description": "Tiny autoencoder for SDXL latents (fast previews)",
        "input_size": (1024, 1024),
        "latent_channels": 4,
        "scaling_factor": 1.0,
        "shift_factor": None,
        "notes": "fast approximate decoder; deterministic (no posterior to sample)",
        "class_name": "AutoencoderTiny",
        "spatial_factor": 8,
        "gated": False,
    },
    "taesd3": {
        "repo_id": "madebyollin/taesd3",
        "subfolder": None,
        "description": "Tiny autoencoder for SD3 / SD3.5 latents (fast previews)",
        "input_size": (1024, 1024),
        "latent_channels": 16,
        "scaling_factor": 1.0,
        "shift_factor": None,
        "notes": "fast approximate decoder; deterministic (no posterior to sample)",
        "class_name": "AutoencoderTiny",
        "spatial_factor": 8,
        "gated": False,
    },
    "taef1": {
        "repo_id": "madebyollin/taef1",
        "subfolder": None,
        "description": "Tiny autoencoder for FLUX.1 latents (fast previews)",
        "input_size": (1024, 1024),
        "latent_channels": 16,
        "scaling_factor": 1.0,
        "shift_factor": None,
        "notes": "fast approximate decoder; deterministic (no posterior to sample)",
        "class_name": "AutoencoderTiny",
        "spatial_factor": 8,
        "gated": False,
    },
}

#: Keys a model config may hold; only ``repo_id`` is required.
ACCEPTED_CONFIG_KEYS: dict[str, str] = {
    "repo_id": "hub repo id ('org/name') or a local folder (required)",
    "subfolder": "folder inside the repo holding the VAE, or None",
    "revision": "branch, tag or commit to load",
    "description": "free text",
    "input_size": "(height, width) the VAE was trained on",
    "latent_channels": "channels of the latent space",
    "spatial_factor": "image pixels per latent pixel along a side, a pipeline's patchify included (8, 16, 32)",
    "scaling_factor": "latent scaling factor",
    "shift_factor": "latent shift factor, or None",
    "notes": "free text (gated, unsafe in float16, ...)",
    "use_safetensors": "False allows pickle (.bin) weights; default True",
    "class_name": "diffusers class of the VAE (one of latent_formats.SUPPORTED_CLASSES); default: as its config.json "
    "names, else AutoencoderKL",
    "gated": "True when the hub repo is gated (accept its license, set HF_TOKEN); default False",
}


def get_model_config(model_name: str) -> dict[str, Any]:
    """Return a copy of the configuration of ``model_name``.

    Raises:
        ValueError: if the name is not registered; the message lists the known names.
    """
    if model_name not in MODEL_CONFIGS:
        raise ValueError(
            f"Unknown model: {model_name!r}. Available models: {list(MODEL_CONFIGS)}; "
            "register another with add_model_config(name, {'repo_id': ...})."
        )
    return copy.deepcopy(MODEL_CONFIGS[model_name])


def get_all_model_configs() -> dict[str, dict[str, Any]]:
    """Return a copy of every registered configuration, keyed by name."""
    return copy.deepcopy(MODEL_CONFIGS)


def list_available_models() -> list[str]:
    """Return the registered model names."""
    return list(MODEL_CONFIGS)


def add_model_config(model_name: str, config: Mapping[str, Any]) -> None:
    """Register (or replace) a model configuration.

    Args:
        model_name: Short name used with ``VAELoader.load_sd_vae``.
        config: Must hold a string ``repo_id`` (hub id or local folder); see
            ``ACCEPTED_CONFIG_KEYS`` for the others. Unknown keys are kept, with a warning.

    Raises:
        TypeError: if ``model_name`` is not a string or ``config`` is not a dict.
        ValueError: if ``model_name`` is empty, ``config`` has no non-empty string ``repo_id``,
            ``subfolder`` / ``revision`` / ``use_safetensors`` / ``gated`` have the wrong type, or ``class_name``
            is not one of the supported diffusers classes.

    Example:
        >>> add_model_config("my-vae", {"repo_id": "/data/my_vae", "subfolder": None})
    """
    accepted = ", ".join(f"{k} ({v})" for k, v in ACCEPTED_CONFIG_KEYS.items())
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a string, got {type(model_name).__name__} ({model_name!r})")
    if not model_name:
        raise ValueError("model_name must be a non-empty string")
    if not isinstance(config, Mapping):
        raise TypeError(
            f"Model config for {model_name!r} must be a dict, got {type(config).__name__} ({config!r}). "
            f"Accepted keys: {accepted}."
        )
    repo_id = config.get("repo_id")
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(
            f"Model config for {model_name!r} needs a non-empty string 'repo_id', got {config!r}. "
            f"Accepted keys: {accepted}."
        )
    for key, kind, expected in (
        ("subfolder", str, "a string or None"),
        ("revision", str, "a string or None"),
        ("use_safetensors", bool, "True or False"),
        ("gated", bool, "True or False"),
    ):
        value = config.get(key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"Model config for {model_name!r}: {key!r} must be {expected}, got {value!r}")
    factor = config.get("spatial_factor")
    if factor is not None and (not isinstance(factor, int) or isinstance(factor, bool) or factor < 1):
        raise ValueError(f"Model config for {model_name!r}: 'spatial_factor' must be a positive int, got {factor!r}")
    class_name = config.get("class_name")
    if class_name is not None:
        from .latent_formats import SUPPORTED_CLASSES

        if class_name not in SUPPORTED_CLASSES:
            raise ValueError(
                f"Model config for {model_name!r}: 'class_name' must be one of {', '.join(SUPPORTED_CLASSES)} "
                f"(the diffusers classes vae-toolkit loads), or None, got {class_name!r}"
            )
    unknown = [key for key in config if key not in ACCEPTED_CONFIG_KEYS]
    if unknown:
        warnings.warn(
            f"Model config for {model_name!r} has unknown keys {unknown} (kept, not used for loading). "
            f"Accepted keys: {', '.join(ACCEPTED_CONFIG_KEYS)}.",
            VAEToolkitWarning,
            stacklevel=2,
        )
    MODEL_CONFIGS[model_name] = dict(config)


def get_default_token() -> str | None:
    """Return ``HF_TOKEN``, else ``HUGGING_FACE_HUB_TOKEN``, read now; ``None`` when neither is set."""
    return os.getenv("HF_TOKEN") or os.getenv("HUGGING_FACE_HUB_TOKEN") or None
