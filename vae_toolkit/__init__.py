"""vae-toolkit: load Stable Diffusion VAEs, turn images into [-1, 1] tensors and back, manage devices.

``import vae_toolkit`` imports torch, numpy and nothing heavier; diffusers is imported on the first load.
"""

from ._version import __version__

__author__ = "Yus314"
__email__ = "shizhaoyoujie@gmail.com"

from . import latents
from ._warnings import VAEToolkitWarning
from .dataset import BucketBatchSampler, LatentStore, encode_dataset
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
]
