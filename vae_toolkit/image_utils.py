"""Image files / PIL images <-> ``[-1, 1]`` tensors for VAEs.

Values match torchvision's ``ToTensor`` + ``Normalize`` (and ``Resize`` + ``CenterCrop`` on the PIL
path) exactly, computed with PIL, numpy and torch alone.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ImageProcessingError",
    "load_and_preprocess_image",
    "load_images",
    "tensor_to_pil",
    "pil_to_tensor",
    "ImageProcessor",
    "DEFAULT_PROCESSOR",
    "SD_PROCESSOR",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class ImageProcessingError(Exception):
    """An image or tensor could not be converted; the message says which and why."""


class _InputTypeError(ImageProcessingError, TypeError):
    """Wrong input type: a ``TypeError`` that is still an ``ImageProcessingError`` (as in 0.1.0)."""


# --- uint8 -> float lookup tables ---------------------------------------------------------------


def _lut(mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """[3, 256] float32 table of ``(v / 255 - mean) / std`` computed as torchvision does (torch float32)."""
    levels = torch.arange(256, dtype=torch.float32).div(255).expand(3, 256)
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1)
        levels = levels.sub(m).div(s)
    return np.ascontiguousarray(levels.numpy())


_LUT_UNIT = _lut(None, None)
_LUT_SD = _lut((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _rgb_to_tensor(rgb: Image.Image, lut: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """RGB PIL image → contiguous float32 ``[3, H, W]`` through ``lut`` (one pass per channel)."""
    arr = np.asarray(rgb)  # [H, W, 3] uint8, read-only; only read from
    if out is None:
        out = torch.empty((3, arr.shape[0], arr.shape[1]), dtype=torch.float32)
    dst = out.numpy()
    for c in range(3):
        np.take(lut[c], arr[:, :, c], out=dst[c])
    return out


def _open_rgb(path: PathLike) -> Image.Image:
    """Open ``path`` and return a loaded RGB copy; the file is closed on return."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise ImageProcessingError(f"Image file not found: {path}") from err
    except IsADirectoryError as err:
        raise ImageProcessingError(f"Failed to load image {path}: it is a directory, not an image file") from err
    except UnidentifiedImageError as err:
        raise ImageProcessingError(
            f"Failed to load image {path}: not an image PIL can read (empty, corrupt or unsupported format)"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageProcessingError(
            f"Failed to load image {path}: {err} Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted."
        ) from err
    except (OSError, ValueError, SyntaxError, MemoryError) as err:
        raise ImageProcessingError(f"Failed to load image {path}: {type(err).__name__}: {err}") from err


def _check_size(rgb: Image.Image, target_size: int, path: PathLike) -> None:
    if rgb.size != (target_size, target_size):
        raise ImageProcessingError(
            f"Image size {rgb.size} of {path} does not match required size ({target_size}, {target_size}). "
            "Resizing and cropping are disabled here; use pil_to_tensor(image, target_size=...) or "
            "ImageProcessor(target_size).preprocess_pil(image) to resize and center-crop."
        )


def load_and_preprocess_image(image_path: str | Path, target_size: int = 512) -> tuple[torch.Tensor, Image.Image]:
    """Load an image file as a VAE input tensor.

    The image must already be ``target_size x target_size`` (it is never resized here).

    Args:
        image_path: Path of the image file.
        target_size: Required width and height.

    Returns:
        ``(tensor, image)``: float32 ``[1, 3, H, W]`` in ``[-1, 1]`` and the RGB PIL image.

    Raises:
        ImageProcessingError: the file is missing, unreadable or corrupt, or has another size;
            the message names the path, and the original exception is chained.

    Example:
        >>> x, img = load_and_preprocess_image("photo.png", target_size=512)  # doctest: +SKIP
        >>> x.shape
        torch.Size([1, 3, 512, 512])
    """
    rgb = _open_rgb(image_path)
    _check_size(rgb, target_size, image_path)
    tensor = _rgb_to_tensor(rgb, _LUT_SD).unsqueeze(0)
    logger.debug("Loaded %s as %s", image_path, tuple(tensor.shape))
    return tensor, rgb


def load_images(
    paths: Sequence[str | Path], target_size: int = 512, num_workers: int | None = None
) -> torch.Tensor:
    """Load many images into one ``[N, 3, H, W]`` float32 batch, decoding on threads.

    Values, order and errors are those of :func:`load_and_preprocess_image` on each path.

    Args:
        paths: Image files, each ``target_size x target_size``.
        target_size: Required width and height.
        num_workers: Decoding threads; default ``min(len(paths), os.cpu_count())``.

    Raises:
        ImageProcessingError: for the first path (in order) that fails.
        ValueError: if ``num_workers`` < 1.

    Example:
        >>> batch = load_images(sorted(Path("data").glob("*.png")))  # doctest: +SKIP
    """
    if isinstance(paths, (str, Path)):
        raise _InputTypeError(f"paths must be a sequence of paths, got a single path {paths!r}; wrap it in a list")
    paths = list(paths)
    out = torch.empty((len(paths), 3, target_size, target_size), dtype=torch.float32)
    if not paths:
        return out
    if num_workers is None:
        num_workers = min(len(paths), os.cpu_count() or 1)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")

    def work(i: int) -> None:
        rgb = _open_rgb(paths[i])
        _check_size(rgb, target_size, paths[i])
        _rgb_to_tensor(rgb, _LUT_SD, out=out[i])

    if num_workers == 1:
        for i in range(len(paths)):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="vae_toolkit_load") as pool:
            for _ in pool.map(work, range(len(paths))):  # re-raises the first failure in order
                pass
    return out


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Convert a ``[3, H, W]`` or ``[1, 3, H, W]`` tensor in ``[-1, 1]`` to an RGB PIL image.

    Values are clamped and rounded to the nearest of the 256 levels, so
    ``tensor_to_pil(load_and_preprocess_image(p)[0])`` returns the original pixels. Any floating
    dtype and device is accepted; the input is never modified. NaN/inf values (float16 VAE
    overflow) produce a ``RuntimeWarning`` and are written as black / clamped.

    Raises:
        TypeError: (also an ``ImageProcessingError``) for a non-tensor or a non-floating tensor.
        ImageProcessingError: for batch size > 1, ndim not 3 or 4, or channels != 3.

    Example:
        >>> tensor_to_pil(vae.decode(latents).sample[0]).save("out.png")  # doctest: +SKIP
    """
    from PIL import Image

    if not isinstance(tensor, torch.Tensor):
        raise _InputTypeError(f"tensor_to_pil expects a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point()):
        raise _InputTypeError(
            f"tensor_to_pil expects a floating-point tensor in [-1, 1], got dtype {tensor.dtype}; "
            "convert with t.float() / 127.5 - 1 for uint8 images"
        )
    t = tensor.detach()
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ImageProcessingError(f"Batch size must be 1, got {t.shape[0]} (shape {tuple(t.shape)})")
        t = t[0]
    elif t.dim() != 3:
        raise ImageProcessingError(f"Expected tensor dimension 3 or 4, got {t.dim()} (shape {tuple(t.shape)})")
    if t.shape[0] != 3:
        raise ImageProcessingError(f"Expected 3 channels, got {t.shape[0]} (shape {tuple(t.shape)})")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ImageProcessingError(f"Cannot make an image of size 0 (shape {tuple(t.shape)})")

    t = t.to(device="cpu", dtype=torch.float32)
    # x in [-1, 1] -> x * 127.5 + 127.5, +0.5 so that the truncating cast rounds to nearest.
    scaled = t.mul(127.5).add_(128.0)
    total = float(scaled.sum())
    if total != total or total in (float("inf"), float("-inf")):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            warnings.warn(
                f"tensor_to_pil: {bad} of {t.numel()} values are NaN or infinite (typically a float16 VAE "
                "overflow); NaN is written as black and ±inf clamped. Decode in float32, or use an "
                "fp16-safe VAE such as 'sdxl-fp16-fix'.",
                RuntimeWarning,
                stacklevel=2,
            )
            scaled = torch.nan_to_num_(scaled, nan=0.0)
    scaled.clamp_(0.0, 255.0)
    hwc = torch.empty((t.shape[1], t.shape[2], 3), dtype=torch.uint8)
    hwc.copy_(scaled.permute(1, 2, 0))
    return Image.fromarray(hwc.numpy())


def _resize_center_crop(rgb: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear, antialiased), then center-crop ``size x size``."""
    from PIL import Image

    w, h = rgb.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if (left, top, new_w, new_h) != (0, 0, size, size):
        rgb = rgb.crop((left, top, left + size, top + size))
    return rgb


def _as_rgb(pil_image: Image.Image, caller: str) -> Image.Image:
    from PIL import Image

    if not isinstance(pil_image, Image.Image):
        raise _InputTypeError(f"{caller} expects a PIL.Image.Image, got {type(pil_image).__name__}")
    try:
        return pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageProcessingError(f"{caller}: cannot convert mode {pil_image.mode!r} to RGB: {err}") from err


def _check_target_size(target_size: object) -> None:
    if isinstance(target_size, bool) or not isinstance(target_size, int):
        raise _InputTypeError(f"target_size must be an int, got {type(target_size).__name__}")
    if target_size < 1:
        raise ValueError(f"target_size must be >= 1, got {target_size}")


def pil_to_tensor(pil_image: Image.Image, target_size: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Convert a PIL image to a float32 ``[3, H, W]`` tensor.

    Args:
        pil_image: Any mode; converted to RGB (the input is not modified).
        target_size: When given, resize the shorter side to it (bilinear, antialiased) and
            center-crop a ``target_size x target_size`` square.
        normalize: ``[-1, 1]`` when True, ``[0, 1]`` otherwise.

    Raises:
        TypeError: (also an ``ImageProcessingError``) for a non-image input.
        ImageProcessingError: when the image cannot be converted.

    Example:
        >>> pil_to_tensor(Image.open("photo.jpg"), target_size=512).shape  # doctest: +SKIP
        torch.Size([3, 512, 512])
    """
    rgb = _as_rgb(pil_image, "pil_to_tensor")
    if target_size is not None:
        _check_target_size(target_size)
        rgb = _resize_center_crop(rgb, target_size)
    return _rgb_to_tensor(rgb, _LUT_SD if normalize else _LUT_UNIT)


class _Transform:
    """PIL image → ``[3, T, T]``: resize, center-crop, to-tensor, normalize (torchvision-compatible)."""

    def __init__(self, target_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.target_size = target_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._lut = _LUT_SD if (self.mean, self.std) == ((0.5,) * 3, (0.5,) * 3) else _lut(self.mean, self.std)

    def __call__(self, pil_image: Image.Image) -> torch.Tensor:
        rgb = _as_rgb(pil_image, "ImageProcessor.transform")
        return _rgb_to_tensor(_resize_center_crop(rgb, self.target_size), self._lut)

    def __repr__(self) -> str:
        return f"Transform(resize={self.target_size}, center_crop={self.target_size}, mean={self.mean}, std={self.std})"


class ImageProcessor:
    """Preprocessing settings applied the same way to many images.

    Args:
        target_size: Output width and height.
        normalize_mean: Per-channel mean subtracted from ``[0, 1]`` values.
        normalize_std: Per-channel standard deviation divided by.

    Example:
        >>> proc = ImageProcessor(target_size=256)
        >>> proc.preprocess_pil(Image.new("RGB", (300, 200))).shape  # doctest: +SKIP
        torch.Size([1, 3, 256, 256])
    """

    def __init__(
        self,
        target_size: int = 512,
        normalize_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        normalize_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
    ) -> None:
        _check_target_size(target_size)
        if len(normalize_mean) != 3 or len(normalize_std) != 3:
            raise ValueError(f"normalize_mean and normalize_std need 3 values, got {normalize_mean}, {normalize_std}")
        if any(s == 0 for s in normalize_std):
            raise ValueError(f"normalize_std must not contain 0, got {normalize_std}")
        self.target_size = target_size
        self.normalize_mean = normalize_mean
        self.normalize_std = normalize_std
        self.transform = _Transform(target_size, normalize_mean, normalize_std)

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(target_size={self.target_size}, normalize_mean={self.normalize_mean}, "
            f"normalize_std={self.normalize_std})"
        )

    def load_and_preprocess(self, image_path: str | Path) -> tuple[torch.Tensor, Image.Image]:
        """Same as ``load_and_preprocess_image(image_path, self.target_size)``."""
        return load_and_preprocess_image(image_path, self.target_size)

    def preprocess_pil(self, pil_image: Image.Image) -> torch.Tensor:
        """Resize, center-crop and normalize a PIL image to ``[1, 3, T, T]``."""
        return self.transform(pil_image).unsqueeze(0)


DEFAULT_PROCESSOR = ImageProcessor()
SD_PROCESSOR = ImageProcessor(target_size=512)
