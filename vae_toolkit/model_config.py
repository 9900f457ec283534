"""Registry of known VAEs and Hugging Face token lookup.

Every entry holds at least ``repo_id``; the built-in entries also carry ``subfolder``,
``description``, ``input_size``, ``latent_channels``, ``scaling_factor``, ``shift_factor``
and ``notes``. ``repo_id`` may also be a local folder.
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
    "scaling_factor": "latent scaling factor",
    "shift_factor": "latent shift factor, or None",
    "notes": "free text (gated, unsafe in float16, ...)",
    "use_safetensors": "False allows pickle (.bin) weights; default True",
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
        ValueError: if ``model_name`` is empty, ``config`` has no non-empty string ``repo_id``, or
            ``subfolder`` / ``revision`` / ``use_safetensors`` have the wrong type.

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
    ):
        value = config.get(key)
        if value is not None and not isinstance(value, kind):
            raise ValueError(f"Model config for {model_name!r}: {key!r} must be {expected}, got {value!r}")
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
