"""vae-toolkit: load Stable Diffusion VAEs, turn images into [-1, 1] tensors and back, manage devices.

``import vae_toolkit`` imports almost nothing: each public name, and each public module (``vae_toolkit.image_utils``),
imports its module (torch, numpy, PIL) on first use, and diffusers is imported on the first model load.
"""

from ._version import __version__

__author__ = "Yus314"
__email__ = "shizhaoyoujie@gmail.com"

from typing import TYPE_CHECKING

from ._warnings import VAEToolkitWarning

if TYPE_CHECKING:
    from . import latents
    from .dataset import BucketBatchSampler, LatentStore, TrainingDataset, encode_dataset
    from .device_manager import DeviceManager, DeviceRecord, auto_select_device, list_devices
    from .image_utils import (
        DEFAULT_PROCESSOR,
        SD_PROCESSOR,
        ImageProcessingError,
        ImageProcessor,
        available_cpus,
        load_and_preprocess_image,
        load_for_encoding,
        load_images,
        open_image,
        pil_to_tensor,
        tensor_to_pil,
    )
    from .model_config import (
        add_model_config,
        get_all_model_configs,
        get_default_token,
        get_model_config,
        list_available_models,
    )
    from .vae_loader import VAELoader, VAELoadError

# Each public name and the module it comes from, imported on first use (PEP 562): ``python -m vae_toolkit --help``
# and argparse's errors then answer without importing torch.
_HOMES = {
    "latents": ".latents",
    **dict.fromkeys(("BucketBatchSampler", "LatentStore", "TrainingDataset", "encode_dataset"), ".dataset"),
    **dict.fromkeys(("DeviceManager", "DeviceRecord", "auto_select_device", "list_devices"), ".device_manager"),
    **dict.fromkeys(
        (
            "DEFAULT_PROCESSOR",
            "SD_PROCESSOR",
            "ImageProcessingError",
            "ImageProcessor",
            "available_cpus",
            "load_and_preprocess_image",
            "load_for_encoding",
            "load_images",
            "open_image",
            "pil_to_tensor",
            "tensor_to_pil",
        ),
        ".image_utils",
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "add_model_config",
            "get_all_model_configs",
            "get_default_token",
            "get_model_config",
            "list_available_models",
        ),
        ".model_config",
    ),
    **dict.fromkeys(("VAELoader", "VAELoadError"), ".vae_loader"),
}


def _modules() -> list[str]:
    """The package's public modules (``vae_toolkit.image_utils``, ...), found in its folder."""
    import pkgutil

    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use, and keep the name here; a public module is an attribute too
    (``vae_toolkit.image_utils``, as 0.1.0 imported them all)."""
    import importlib

    home = _HOMES.get(name)
    if home is None:
        if name.startswith("_") or name not in _modules():
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        home = f".{name}"
    module = importlib.import_module(home, __name__)
    value = module if home == f".{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES) | set(_modules()))


__all__ = [
    "__version__",
    "__author__",
    "__email__",
    # images
    "load_and_preprocess_image",
    "tensor_to_pil",
    "pil_to_tensor",
    "ImageProcessor",
    "ImageProcessingError",
    "DEFAULT_PROCESSOR",
    "SD_PROCESSOR",
    # loading
    "VAELoader",
    # model registry
    "get_model_config",
    "get_all_model_configs",
    "list_available_models",
    "add_model_config",
    "get_default_token",
    # new in 0.2.0
    "DeviceManager",
    "auto_select_device",
    "list_devices",
    "DeviceRecord",
    "load_images",
    "open_image",
    "load_for_encoding",
    "available_cpus",
    "VAELoadError",
    "VAEToolkitWarning",
    "latents",
    # datasets
    "encode_dataset",
    "LatentStore",
    "BucketBatchSampler",
    "TrainingDataset",
]
