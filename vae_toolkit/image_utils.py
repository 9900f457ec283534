"""Image files / PIL images <-> ``[-1, 1]`` tensors for VAEs.

Values match torchvision's ``ToTensor`` + ``Normalize`` (and ``Resize`` + ``CenterCrop`` on the PIL
path) exactly, computed with PIL, numpy and torch alone.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, Union

import numpy as np
import torch

from ._checks import pixel_limit_message
from ._warnings import VAEToolkitWarning, caller_stacklevel

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ImageProcessingError",
    "load_and_preprocess_image",
    "load_images",
    "load_for_encoding",
    "available_cpus",
    "open_image",
    "image_extensions",
    "center_crop_to_multiple",
    "tensor_to_pil",
    "pil_to_tensor",
    "ImageProcessor",
    "DEFAULT_PROCESSOR",
    "SD_PROCESSOR",
]

from ._cpus import available_cpus
from ._orientation import exif_orientation, swaps_axes, transpose_box, transpose_method
from ._pixels import (
    LUT_SD,
    LUT_UNIT,
    SD_NORM,
    T_128,
    ImageProcessingError,
    InputTypeError,
    InputValueError,
    Norm,
    error_like,
    load_pixels,
    lut_array,
    resize_crop,
    rgb_to_dtype,
    rgb_to_tensor,
    warn_if_clipped,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


def open_image(path: PathLike) -> Image.Image:
    """Open an image file of any size as ``load_and_preprocess_image`` reads it: a loaded RGB image.

    The file is closed on return.

    The conversion is PIL's ``convert("RGB")``, exactly as in 0.1.0: EXIF orientation is not applied
    (pixels come as stored), alpha is dropped (not composited), palette / grayscale / CMYK are expanded,
    and 16/32-bit values outside [0, 255] saturate (with a ``VAEToolkitWarning``). An image that is already
    RGB is returned as decoded, without the full-size copy that ``convert("RGB")`` would make.

    Raises:
        ImageProcessingError: the file is missing, a directory, or cannot be decoded; the message names
            it and the cause is chained.

    Example:
        >>> open_image("photo.jpg").size  # doctest: +SKIP
        (640, 480)
    """
    return _open_rgb(path)[0]


_Box: TypeAlias = "tuple[float, float, float, float]"
_DCT_FORMATS = frozenset(("JPEG", "MPO"))  # PIL decodes these at 1/2, 1/4 or 1/8 scale on request (draft)


def _open_rgb(
    path: PathLike,
    draft_size: int | Callable[[tuple[int, int]], int | None] | None = None,
    orient: bool = False,
    max_pixels: int | None = None,
) -> tuple[Image.Image, tuple[int, int], _Box | None]:
    """``(rgb, size, box)``: the loaded RGB image, the file's own size, and where that full image lies in ``rgb``.

    With ``draft_size``, a JPEG whose shorter side is at least twice ``draft_size`` is decoded at the largest
    DCT scale (1/2, 1/4, 1/8) that keeps its shorter side >= ``draft_size``; ``box`` is then the full image in
    the decoded image's coordinates (``(0, 0, width / scale, height / scale)``). Otherwise ``box`` is None and
    ``rgb`` is the full image, exactly as ``open_image`` returns it. ``draft_size`` may be a function of the
    image's ``(width, height)`` (its target, or None for no draft), for a target that depends on the image. With
    ``orient``, the image is turned as its EXIF orientation says (``ImageOps.exif_transpose``'s pixels), and
    ``size``, ``box`` and the size given to ``draft_size`` with it.
    An image whose header says more than ``max_pixels`` pixels is refused before it is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(path, (str, bytes, os.PathLike)) and not hasattr(path, "read"):
        raise InputTypeError(
            f"image_path must be a str or pathlib.Path (or an open binary file), got {type(path).__name__}: {path!r}"
        )
    try:
        with Image.open(path) as img:
            size, box = img.size, None
            if max_pixels is not None and (refused := pixel_limit_message(path, size[0], size[1], max_pixels)):
                raise InputValueError(refused)
            method = transpose_method(exif_orientation(img)) if orient else None
            shown = (size[1], size[0]) if swaps_axes(method) else size
            want = draft_size(shown) if callable(draft_size) else draft_size
            if want is not None and img.format in _DCT_FORMATS and min(size) >= 2 * want:
                drafted = img.draft("RGB", (want, want))
                box = drafted[1] if drafted is not None and img.size != size else None
            warn_if_clipped(img, path)
            img.load()
            if img.mode == "RGB" and not img.readonly:
                # What convert("RGB") returns for an RGB image (it is copy() = _new(im.copy())), minus the copy
                # of every pixel: a plain Image sharing the decoded pixels, with the file's info.
                rgb = img._new(img.im)
            else:
                rgb = img.convert("RGB")
            if method is None:
                return rgb, size, box
            if box is not None:  # the draft's size is square, so it needs no turning; the box does
                box = transpose_box(box, rgb.size, method)
            return rgb.transpose(method), ((size[1], size[0]) if swaps_axes(method) else size), box
    except ImageProcessingError:
        raise
    except FileNotFoundError as err:
        raise ImageProcessingError(f"Image file not found: {path}") from err
    except IsADirectoryError as err:
        raise ImageProcessingError(f"Failed to load image {path}: it is a directory, not an image file") from err
    except UnidentifiedImageError as err:
        raise ImageProcessingError(
            f"Failed to load image {path}: not an image PIL can read (empty, corrupt or unsupported format)"
        ) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # The warning only arrives here when warnings are turned into errors.
        raise ImageProcessingError(
            f"Failed to load image {path}: {err} Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted."
        ) from err
    except Warning:  # another warning turned into an error by the caller's filters: theirs to see as is
        raise
    except Exception as err:
        # Whatever a decoder raises for a corrupt or unsupported file (OSError, ValueError, SyntaxError,
        # but also NotImplementedError, TypeError, struct.error, ... from the format plugins).
        raise ImageProcessingError(f"Failed to load image {path}: {type(err).__name__}: {err}") from err


def open_for_resize(
    path: PathLike, draft_size: Callable[[tuple[int, int]], int | None], max_pixels: int | None = None
) -> tuple[Image.Image, tuple[int, int], tuple[float, float, float, float] | None]:
    """``(rgb, (width, height), box)``: the image turned as its EXIF orientation says (as ``load_for_encoding``
    reads it), with the fast reader's JPEG draft; ``(width, height)`` is the turned image's.

    ``draft_size(width, height)`` gives the shorter side the image will be resized to (None: no draft); a JPEG
    at least twice that is decoded at a reduced DCT scale, and ``box`` is where the full image lies in ``rgb``
    (resample from it with ``rgb.resize(..., box=...)``). Used by the aspect-bucket reader.
    """
    return _open_rgb(path, draft_size, orient=True, max_pixels=max_pixels)


def _check_size(rgb: Image.Image, target_size: int, path: PathLike) -> None:
    target_size = _check_target_size(target_size)
    if rgb.size != (target_size, target_size):
        raise ImageProcessingError(
            f"Image size {rgb.size} of {path} does not match required size ({target_size}, {target_size}). "
            "Resizing and cropping are disabled here; use pil_to_tensor(image, target_size=...) or "
            "ImageProcessor(target_size).preprocess_pil(image) to resize and center-crop."
        )


def load_and_preprocess_image(image_path: str | Path, target_size: int = 512) -> tuple[torch.Tensor, Image.Image]:
    """Load an image file as a VAE input tensor.

    The image must already be ``target_size x target_size`` (it is never resized here). Any mode is
    converted with PIL's ``convert("RGB")``, as in 0.1.0: EXIF orientation is not applied, alpha is
    dropped, and 16/32-bit values outside [0, 255] saturate (with a ``VAEToolkitWarning``).

    Args:
        image_path: Path of the image file.
        target_size: Required width and height.

    Returns:
        ``(tensor, image)``: ``[1, 3, H, W]`` in ``[-1, 1]`` and the RGB PIL image. The tensor has torch's
        default dtype (float32 unless ``torch.set_default_dtype`` changed it), as in 0.1.0.

    Raises:
        ImageProcessingError: the file is missing, unreadable or corrupt, or has another size;
            the message names the path, and the original exception is chained.

    Example:
        >>> x, img = load_and_preprocess_image("photo.png", target_size=512)  # doctest: +SKIP
        >>> x.shape
        torch.Size([1, 3, 512, 512])
    """
    rgb = open_image(image_path)
    _check_size(rgb, target_size, image_path)
    tensor = rgb_to_dtype(rgb, LUT_SD, SD_NORM, torch.get_default_dtype()).unsqueeze(0)
    logger.debug("Loaded %s as %s", image_path, tuple(tensor.shape))
    return tensor, rgb


# Formats PIL registers that are not pictures it can decode here: stubs that only identify a file (BUFR, GRIB,
# HDF5), video (MPEG), scientific arrays (FITS), metadata (IPTC), and vector or page formats that need an
# outside renderer (EPS without Ghostscript, WMF/EMF off Windows).
_NOT_RASTER = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "FITS", "IPTC", "WMF", "EPS"})
# Raster formats that need an optional library of Pillow's build: kept only when it is there.
_FEATURES = {"WEBP": "webp", "JPEG2000": "jpg_2000", "AVIF": "avif"}


def image_extensions() -> frozenset[str]:
    """File suffixes (lower case, with the dot: ``.png``, ``.jpg``, ...) of the raster formats PIL decodes here.

    Left out: formats PIL only identifies or cannot render without outside tools (``.h5``, ``.grib``,
    ``.bufr``, ``.mpg``, ``.fits``, ``.iim``, ``.wmf``/``.emf``; ``.eps``/``.ps`` unless Ghostscript is installed),
    and WebP / JPEG 2000 / AVIF when this Pillow was built without them.
    """
    from PIL import EpsImagePlugin, Image, features

    excluded = set(_NOT_RASTER)
    if EpsImagePlugin.has_ghostscript():
        excluded.discard("EPS")
    excluded |= {fmt for fmt, feature in _FEATURES.items() if not features.check(feature)}
    Image.init()
    return frozenset(
        ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in excluded
    )


def center_crop_to_multiple(image: Image.Image, multiple: int = 8) -> Image.Image:
    """Center-crop ``image`` to the largest width and height that are multiples of ``multiple``.

    VAEs that downsample 8x (SD, SDXL, FLUX) need both sides to be multiples of 8. An image that already
    fits is returned as it is (not copied).

    Raises:
        ValueError: (also an ``ImageProcessingError``) a side is shorter than ``multiple``.

    Example:
        >>> center_crop_to_multiple(Image.new("RGB", (37, 33))).size  # doctest: +SKIP
        (32, 32)
    """
    w, h = image.size
    cw, ch = w - w % multiple, h - h % multiple
    if cw == 0 or ch == 0:
        raise InputValueError(f"image is {w}x{h}; it needs at least {multiple}x{multiple} pixels")
    if (cw, ch) == (w, h):
        return image
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def load_for_encoding(
    path: PathLike,
    size: int | None = None,
    *,
    exact: bool = False,
    max_pixels: int | None = None,
    multiple: int = 8,
) -> torch.Tensor:
    """Read an image file as ``encode_dataset`` does: a ``[3, H, W]`` float32 tensor in ``[-1, 1]``.

    ``latents.encode(vae, load_for_encoding(path, size, exact=exact)[None])`` reproduces the latent a store
    holds for ``path`` (the store's settings record ``size`` and which reader it used).

    - ``size=None``: the image keeps its size, center-cropped to the largest multiple of 8 on each side
      (``pil_to_tensor(center_crop_to_multiple(open_image(path), 8))``).
    - ``size`` and ``exact=True``: exactly ``pil_to_tensor(open_image(path), target_size=size)``: shorter side
      resized to ``size`` (bilinear, antialiased), center-cropped to ``size x size``.
    - ``size`` and ``exact=False`` (the fast default): the same, except that a JPEG whose shorter side is at
      least ``2 * size`` is decoded at the largest DCT scale (1/2, 1/4 or 1/8, PIL's ``Image.draft``) that
      keeps its shorter side >= ``size``, and then resized the same way to the same output. On photos this
      is several times faster than the exact reader and differs from it by far less than one uint8 level
      on average (PSNR above 45 dB; see README, "Performance"). Other files give the exact reader's values.

    The image is turned as its EXIF orientation says, as viewers show it (``ImageOps.exif_transpose``; a phone
    portrait stored as 640x424 with orientation 6 gives a 424x640 image), before the crop or resize: ``open_image``
    below stands for ``ImageOps.exif_transpose(open_image(path))``. PIL's decompression-bomb limit applies.

    Args:
        path: Image file.
        size: Output side, or None to keep the image's size (cropped to multiples of 8).
        exact: Decode every file at full size, giving ``pil_to_tensor``'s values bit for bit.
        max_pixels: Refuse, before decoding, an image whose header says more pixels (``None``: no limit
            beyond PIL's own; ``encode`` and ``evaluate`` pass 89,478,485 by default).
        multiple: With ``size=None``: crop to multiples of this (the model's spatial factor when above 8, as
            ``encode`` and ``evaluate`` pass it: 32 for DC-AE, 16 for FLUX.2).

    Returns:
        Contiguous ``[3, H, W]`` float32 (torch's default dtype) in ``[-1, 1]``.

    Raises:
        ImageProcessingError: the file is missing, unreadable or corrupt, above ``max_pixels``, or
            (``size=None``) smaller than 8x8; the message names the path and the cause is chained.
        TypeError, ValueError: (also ``ImageProcessingError``) ``size`` is not an int >= 1, or ``exact`` is
            not a bool.

    Example:
        >>> x = load_for_encoding("photo.jpg", 512)  # doctest: +SKIP
        >>> x.shape
        torch.Size([3, 512, 512])
    """
    if size is not None:
        size = _check_target_size(size)
    if not isinstance(exact, bool):
        raise InputTypeError(f"exact must be True or False, got {type(exact).__name__}: {exact!r}")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise InputTypeError(f"multiple must be a positive int, got {multiple!r}")
    if size is None:
        rgb = _open_rgb(path, orient=True, max_pixels=max_pixels)[0]
        try:
            rgb = center_crop_to_multiple(rgb, multiple)
        except InputValueError as err:
            raise InputValueError(f"{path}: {err}") from err
        return pil_to_tensor(rgb)
    rgb, full, box = _open_rgb(path, None if exact else size, orient=True, max_pixels=max_pixels)
    if box is None:
        return pil_to_tensor(rgb, target_size=size)
    return rgb_to_dtype(_resize_center_crop(rgb, size, full, box), LUT_SD, SD_NORM, torch.get_default_dtype())


def load_images(paths: Sequence[str | Path], target_size: int = 512, num_workers: int | None = None) -> torch.Tensor:
    """Load many images into one ``[N, 3, H, W]`` float32 batch, decoding on threads.

    Values, order and errors are those of :func:`load_and_preprocess_image` on each path.

    Args:
        paths: Image files, each ``target_size x target_size``.
        target_size: Required width and height.
        num_workers: Decoding threads; default ``min(len(paths), available_cpus())``.

    Returns:
        Contiguous ``[N, 3, target_size, target_size]`` in ``[-1, 1]`` (``N = 0`` for no paths), in torch's
        default dtype (float32 unless changed).

    Raises:
        ImageProcessingError: for the first path (in order) that fails; the message names it.
        TypeError: for a single path instead of a sequence (also an ``ImageProcessingError``), or a
            non-integer ``num_workers``.
        ValueError: if ``num_workers`` < 1.

    Example:
        >>> batch = load_images(sorted(Path("data").glob("*.png")))  # doctest: +SKIP
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise InputTypeError(f"paths must be a sequence of paths, got a single path {paths!r}; wrap it in a list")
    paths = list(paths)
    target_size = _check_target_size(target_size)
    if num_workers is None:
        num_workers = min(len(paths), available_cpus())
    elif isinstance(num_workers, bool) or not isinstance(num_workers, int):
        raise TypeError(f"num_workers must be an int >= 1 or None, got {type(num_workers).__name__}: {num_workers!r}")
    elif num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 (or None for one per CPU), got {num_workers}")
    shape = (len(paths), 3, target_size, target_size)
    dtype = torch.get_default_dtype()  # float32 unless the caller changed it (as load_and_preprocess_image)
    # numpy asks the kernel for huge pages on large buffers: first-touch page faults of a fresh
    # 64 x 3 MB batch cost several times less than with torch.empty (the tensor shares the memory).
    out = torch.from_numpy(np.empty(shape, dtype=np.float32)) if dtype == torch.float32 else torch.empty(shape)
    if not paths:
        return out

    def work(i: int) -> None:
        rgb = open_image(paths[i])
        _check_size(rgb, target_size, paths[i])
        if out.dtype == torch.float32:
            rgb_to_tensor(rgb, LUT_SD, out=out[i])
        else:
            out[i] = rgb_to_dtype(rgb, LUT_SD, SD_NORM, out.dtype)

    if num_workers == 1:
        for i in range(len(paths)):
            work(i)
        return out
    # PIL releases the GIL while decoding and numpy while converting, so threads run in parallel.
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="vae_toolkit_load") as pool:
        futures = [pool.submit(work, i) for i in range(len(paths))]
        try:
            for future in futures:  # in order: the first failing path is the one reported
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return out


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Convert a ``[3, H, W]`` or ``[1, 3, H, W]`` tensor in ``[-1, 1]`` to an RGB PIL image.

    Values are clamped and rounded to the nearest of the 256 levels, so
    ``tensor_to_pil(load_and_preprocess_image(p)[0])`` returns the original pixels. Any floating
    dtype and device is accepted; the input is never modified. NaN/inf values (float16 VAE
    overflow) produce a ``VAEToolkitWarning`` and are written as black / clamped.

    Raises:
        TypeError: (also an ``ImageProcessingError``) for a non-tensor or a non-floating tensor.
        ImageProcessingError: for batch size > 1, ndim not 3 or 4, or channels != 3.

    Example:
        >>> tensor_to_pil(vae.decode(latents).sample[0]).save("out.png")  # doctest: +SKIP
    """
    from PIL import Image

    if not isinstance(tensor, torch.Tensor):
        raise InputTypeError(
            f"tensor_to_pil expects a torch.Tensor, got {type(tensor).__name__}; "
            "wrap arrays with torch.from_numpy(...)"
        )
    if tensor.layout != torch.strided:
        raise InputTypeError(f"tensor_to_pil expects a dense tensor, got layout {tensor.layout}; call .to_dense()")
    if not (tensor.is_floating_point()):
        raise InputTypeError(
            f"tensor_to_pil expects a floating-point tensor in [-1, 1], got dtype {tensor.dtype}; "
            "convert with t.float() / 127.5 - 1 for uint8 images"
        )
    if tensor.device.type == "meta":
        raise ImageProcessingError(
            f"tensor_to_pil got a tensor on the 'meta' device (shape {tuple(tensor.shape)}), which holds no values; "
            "pass a tensor with data (CPU, CUDA or MPS)"
        )
    t = tensor.detach()
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ImageProcessingError(
                f"Batch size must be 1, got {t.shape[0]} (shape {tuple(t.shape)}); "
                "convert one image at a time: [tensor_to_pil(x) for x in batch]"
            )
        t = t[0]
    elif t.dim() != 3:
        raise ImageProcessingError(
            f"Expected tensor dimension 3 or 4, got {t.dim()} (shape {tuple(t.shape)}); "
            "pass one image as [3, H, W] or [1, 3, H, W]"
        )
    if t.shape[0] != 3:
        raise ImageProcessingError(
            f"Expected 3 channels, got {t.shape[0]} (shape {tuple(t.shape)}); pass RGB as [3, H, W] "
            "(channels first; use x.permute(2, 0, 1) for [H, W, 3])"
        )
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ImageProcessingError(f"Cannot make an image of size 0 (shape {tuple(t.shape)}); H and W must be >= 1")

    source = t
    t = t.to(device="cpu", dtype=torch.float32)
    # x in [-1, 1] -> 127.5 * x + 128 in one fused pass (+0.5 over 127.5 so that the truncating cast below
    # rounds to nearest), a sum that is finite unless some value is NaN/inf, then clamp in place.
    scaled_t = torch.add(T_128, t, alpha=127.5, out=torch.from_numpy(np.empty(t.shape, dtype=np.float32)))
    if not math.isfinite(scaled_t.sum()):
        bad = int((~torch.isfinite(t)).sum())
        # Only float64 holds finite values that float32 cannot: they became ±inf in the cast above.
        nonfinite = int((~torch.isfinite(source)).sum()) if bad and source.dtype == torch.float64 else bad
        if nonfinite:
            warnings.warn(
                f"tensor_to_pil: {nonfinite} of {t.numel()} values are NaN or infinite (typically a float16 VAE "
                "overflow); NaN is written as black and ±inf clamped. Decode in float32, or use an "
                "fp16-safe VAE such as 'sdxl-fp16-fix'.",
                VAEToolkitWarning,
                stacklevel=2,
            )
        if bad > nonfinite:
            warnings.warn(
                f"tensor_to_pil: {bad - nonfinite} of {t.numel()} float64 values are finite but beyond float32's "
                "range (|x| > 3.4e38), far outside [-1, 1]; they are clamped like any value outside [-1, 1]. "
                "Check the tensor: a decoded image should lie in [-1, 1].",
                VAEToolkitWarning,
                stacklevel=2,
            )
        if bad:
            torch.nan_to_num_(scaled_t, nan=0.0, posinf=255.0, neginf=0.0)
    scaled = scaled_t.clamp_(0.0, 255.0).numpy()
    # In [0, 255] numpy's float32 -> uint8 cast truncates exactly like torch's, several times faster;
    # PIL interleaves the three planes into RGB (a strided CHW -> HWC copy in torch costs ~10x more).
    planes = scaled.astype(np.uint8)
    size = (planes.shape[2], planes.shape[1])
    return Image.merge("RGB", [Image.frombuffer("L", size, plane, "raw", "L", 0, 1) for plane in planes])


def _resize_center_crop(
    rgb: Image.Image, size: int, full: tuple[int, int] | None = None, box: _Box | None = None
) -> Image.Image:
    """Shorter side to ``size`` (bilinear, antialiased), then center-crop ``size x size`` (:func:`resize_crop`).

    ``full`` and ``box`` describe a JPEG decoded at reduced scale (``_open_rgb``): the output size is computed
    from the file's ``full`` size, and the resize reads ``box``, where the full image lies in ``rgb``.
    """
    w, h = full if full is not None else rgb.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return resize_crop(rgb, (new_w, new_h), (left, top), (size, size), box)


def _as_rgb(pil_image: Image.Image, caller: str, target_size: int | None = None) -> Image.Image:
    """Decode (if lazily opened) and convert to RGB; errors become ``ImageProcessingError`` naming the file."""
    from PIL import Image

    if not isinstance(pil_image, Image.Image):
        raise InputTypeError(
            f"{caller} expects a PIL.Image.Image, got {type(pil_image).__name__}; "
            "open files with PIL.Image.open(path) or use load_and_preprocess_image(path)"
        )
    source = getattr(pil_image, "filename", None) or f"{pil_image.mode} image of size {pil_image.size}"
    try:
        load_pixels(pil_image)  # an image from Image.open decodes here: truncated/corrupt/closed files fail now
        warn_if_clipped(pil_image, source)
        rgb = pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")
    except Warning:  # e.g. the clipping VAEToolkitWarning under an "error" filter: the caller's to see
        raise
    except Exception as err:  # whatever PIL raises while decoding: corrupt data, a closed file, ...
        if getattr(pil_image, "fp", True) is None and getattr(pil_image, "tile", None):
            raise error_like(err)(
                f"{caller}: cannot read {source}: it is a closed image whose pixels were never read (PIL opens "
                "files lazily); call image.load() before closing it, or convert inside `with Image.open(...)`"
            ) from err
        raise error_like(err)(
            f"{caller}: cannot read {source} (mode {pil_image.mode!r}) as RGB: {type(err).__name__}: {err}"
        ) from err
    if target_size is not None and 0 in rgb.size:
        raise InputValueError(
            f"{caller}: cannot resize an image of size {rgb.size} to {target_size}x{target_size}; "
            "width and height must be >= 1"
        )
    return rgb


def _check_target_size(target_size: object) -> int:
    """Return ``target_size`` as an int >= 1; else TypeError/ValueError (both also ``ImageProcessingError``)."""
    if isinstance(target_size, bool) or not isinstance(target_size, numbers.Integral):
        raise InputTypeError(
            f"target_size must be an int (side of the square output in pixels, e.g. 512), "
            f"got {type(target_size).__name__}: {target_size!r}"
        )
    if target_size < 1:
        raise InputValueError(
            f"target_size must be >= 1 (side of the square output in pixels, e.g. 512), got {target_size}"
        )
    return int(target_size)


def pil_to_tensor(pil_image: Image.Image, target_size: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Convert a PIL image to a ``[3, H, W]`` tensor in torch's default dtype (float32 unless changed).

    PIL images are not thread-safe: give each thread its own. One lazily opened image converted from
    several threads at once is decoded by one of them at a time (so all get the right pixels).

    Args:
        pil_image: Any mode; converted to RGB as ``load_and_preprocess_image`` does (the input is not
            modified). A lazily opened image is decoded here; a corrupt file, or an image closed before it
            was read, raises ``ImageProcessingError``.
        target_size: When given, resize the shorter side to it (bilinear, antialiased) and
            center-crop a ``target_size x target_size`` square. An image longer than 4:1 is resampled only
            where the square is kept (memory of the output, values within one level).
        normalize: ``[-1, 1]`` when True, ``[0, 1]`` otherwise.

    Raises:
        TypeError: (also an ``ImageProcessingError``) for a non-image input or a non-int ``target_size``.
        ValueError: (also an ``ImageProcessingError``) for ``target_size`` < 1, or resizing an empty image.
        ImageProcessingError: when the image cannot be decoded or converted (the cause is chained); it is
            also an ``OSError`` / ``ValueError`` / ``TypeError`` when PIL raised one (a truncated file, a
            closed image), as 0.1.0's ``ImageProcessor.transform`` let those through.

    Example:
        >>> pil_to_tensor(Image.open("photo.jpg"), target_size=512).shape  # doctest: +SKIP
        torch.Size([3, 512, 512])
    """
    if target_size is not None:
        target_size = _check_target_size(target_size)
    rgb = _as_rgb(pil_image, "pil_to_tensor", target_size)
    if target_size is not None:
        rgb = _resize_center_crop(rgb, target_size)
    if normalize:
        return rgb_to_dtype(rgb, LUT_SD, SD_NORM, torch.get_default_dtype())
    return rgb_to_dtype(rgb, LUT_UNIT, None, torch.get_default_dtype())


_TYPE_HINT = "3 numbers (one per RGB channel), one number, or an array that broadcasts over [3, H, W]"


def _norm_array(name: str, value: object) -> np.ndarray:
    """``value`` as a float64 array shaped as 0.1.0 (torchvision's ``Normalize``) applied it to ``[3, H, W]``.

    A 1-D sequence is per channel (``view(-1, 1, 1)``); a 0-D number applies to every value; a 2-D or 3-D
    array broadcasts against ``[3, H, W]`` as torch broadcasts (``[[a, b, c]]`` is per image column).
    """
    if value is None or isinstance(value, (str, bytes)):
        raise InputTypeError(f"{name} must be {_TYPE_HINT}, got {value!r}")
    if isinstance(value, torch.Tensor):  # constants here, even when they require grad
        value = value.detach().cpu()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except OverflowError as err:  # an int too large for float64
        raise InputValueError(f"{name} must be finite numbers, got {value!r}") from err
    except (TypeError, ValueError) as err:
        raise InputTypeError(f"{name} must be {_TYPE_HINT}, got {value!r}") from err
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1, 1)
    if arr.ndim > 3:
        raise InputValueError(
            f"{name} has {arr.ndim} dimensions (shape {arr.shape}), got {value!r}; pass 3 numbers (one per RGB "
            "channel), or an array of at most 3 dimensions that broadcasts over the [3, H, W] image tensor"
        )
    if arr.ndim == 3 and arr.shape[0] not in (1, 3):
        raise InputValueError(f"{name} needs 3 values (one per RGB channel) or 1, got {arr.shape[0]}: {value!r}")
    if not np.isfinite(arr).all():
        raise InputValueError(f"{name} must be finite numbers, got {value!r}")
    return arr


def _per_channel(arr: np.ndarray) -> tuple[float, float, float] | None:
    """The 3 per-channel values of a normalisation array, or None when it varies across rows or columns."""
    if arr.ndim >= 2 and arr.shape[-2:] != (1, 1):
        return None
    flat = np.broadcast_to(arr.reshape(-1), (3,))
    return (float(flat[0]), float(flat[1]), float(flat[2]))


_Checked: TypeAlias = "tuple[np.ndarray, np.ndarray, Norm]"  # mean, std, (per-channel mean, std) or None


def _check_norm(mean: object, std: object, target_size: int) -> _Checked:
    """Validated ``mean`` and ``std`` for ``ImageProcessor.transform`` (``target_size x target_size`` output).

    Raises ``TypeError`` / ``ValueError``, both also ``ImageProcessingError`` (what 0.1.0's ``preprocess_pil``
    raised), for a wrong type, count, shape, NaN/inf, or a std that is 0 in float32 (a division by zero).
    """
    m, s = _norm_array("normalize_mean", mean), _norm_array("normalize_std", std)
    image_shape = (3, target_size, target_size)
    for name, arr, value in (("normalize_mean", m, mean), ("normalize_std", s, std)):
        try:
            fits = np.broadcast_shapes(arr.shape, image_shape) == image_shape
        except ValueError:
            fits = False
        if not fits:
            raise InputValueError(
                f"{name} of shape {arr.shape} does not broadcast over the image tensor of shape {image_shape} "
                f"(ImageProcessor(target_size={target_size})), got {value!r}; pass 3 numbers (one per RGB channel)"
            )
    with np.errstate(over="ignore", under="ignore"):  # 1e39 -> inf, 1e-46 -> 0 in float32: checked here
        if not np.asarray(s, dtype=np.float32).all():
            raise InputValueError(
                "normalize_std must not contain 0 or values that are 0 in float32 (values are divided by it), "
                f"got {std!r}"
            )
    pm, ps = _per_channel(m), _per_channel(s)
    return m, s, (pm, ps) if pm is not None and ps is not None else None


def _warn_if_beyond(mean: np.ndarray, std: np.ndarray, dtype: torch.dtype) -> None:
    """Warn when ``mean`` / ``std`` hold finite values that ``dtype`` cannot: they become ±inf there."""
    limit = torch.finfo(dtype).max
    for name, arr, effect in (("normalize_mean", mean, "±inf"), ("normalize_std", std, "0")):
        big = np.abs(arr) > limit
        if big.any():
            warnings.warn(
                f"ImageProcessor.transform: {name} holds {int(big.sum())} value(s) beyond the range of "
                f"{str(dtype).removeprefix('torch.')} (|x| > {limit:.3g}), e.g. {arr[big].flat[0]:g}; they become "
                f"±inf, so the output values they touch are {effect} (as in vae-toolkit 0.1.0). "
                "normalize_mean and normalize_std are statistics of pixel values in [0, 1].",
                VAEToolkitWarning,
                stacklevel=caller_stacklevel(),
            )


def _normalize_any(rgb: Image.Image, mean: np.ndarray, std: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``(v / 255 - mean) / std`` with torch broadcasting ``mean`` and ``std`` over ``[3, H, W]`` in ``dtype``:
    the arithmetic of torchvision's ``ToTensor`` + ``Normalize``, hence 0.1.0's values, for any shape."""
    w, h = rgb.size
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8).reshape(h, w, 3)).permute(2, 0, 1).to(dtype).div_(255)
    return x.sub_(torch.as_tensor(mean, dtype=dtype)).div_(torch.as_tensor(std, dtype=dtype))


class _Transform:
    """PIL image → ``[3, T, T]``: resize, center-crop, to-tensor, normalize (torchvision-compatible).

    ``mean`` and ``std`` are checked on the first call, as 0.1.0 (torchvision's ``Normalize``) did, so that
    an ``ImageProcessor`` used only for ``load_and_preprocess`` never fails on them.
    """

    def __init__(self, target_size: int, mean: object, std: object) -> None:
        self.target_size = target_size
        self.mean = mean
        self.std = std
        # After the first call: (float32 table or None, checked mean/std arrays and per-channel (mean, std) or None,
        # the largest |value| of mean and std).
        self._table: tuple[np.ndarray | None, _Checked, float] | None = None

    def __call__(self, pil_image: Image.Image) -> torch.Tensor:
        if self._table is None:  # one assignment: threads see either nothing or the complete pair
            checked = _check_norm(self.mean, self.std, self.target_size)
            norm = checked[2]
            lut = None if norm is None else LUT_SD if norm == SD_NORM else lut_array(norm)
            self._table = (lut, checked, float(max(np.abs(checked[0]).max(), np.abs(checked[1]).max())))
        lut, (mean, std, norm), largest = self._table
        dtype = torch.get_default_dtype()
        if largest > torch.finfo(dtype).max:
            _warn_if_beyond(mean, std, dtype)

        rgb = _resize_center_crop(_as_rgb(pil_image, "ImageProcessor.transform", self.target_size), self.target_size)
        if lut is None:  # mean or std varies across rows or columns
            return _normalize_any(rgb, mean, std, dtype)
        return rgb_to_dtype(rgb, lut, norm, dtype)

    def __repr__(self) -> str:
        return (
            f"Transform(resize={self.target_size}, center_crop={self.target_size}, mean={self.mean}, std={self.std})"
        )


class ImageProcessor:
    """Preprocessing settings applied the same way to many images.

    Args:
        target_size: Output width and height.
        normalize_mean: Per-channel mean subtracted from ``[0, 1]`` values (3 numbers, or 1 for all).
        normalize_std: Per-channel standard deviation divided by (3 numbers, or 1 for all).

    As in 0.1.0 (torchvision's ``Normalize``), a 2-D or 3-D ``normalize_mean`` / ``normalize_std``
    broadcasts over the ``[3, H, W]`` tensor as torch broadcasts it (``[[a, b, c]]`` is per image column).
    They are checked when ``transform`` (or ``preprocess_pil``) first runs, as in 0.1.0: ``TypeError`` for
    non-numbers, ``ValueError`` for a wrong count or shape, NaN/inf, or a std that is 0 in float32 (both
    also ``ImageProcessingError``). Values beyond the range of the tensor's dtype (``1e39`` in float32)
    give a ``VAEToolkitWarning``. Tensors come in torch's default dtype (float32 unless changed), as in 0.1.0.

    Raises:
        TypeError, ValueError: (also ``ImageProcessingError``) for a ``target_size`` that is not an int >= 1.

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
        target_size = _check_target_size(target_size)
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
        """Resize, center-crop and normalize a PIL image (any mode, converted to RGB) to ``[1, 3, T, T]``.

        Raises:
            ImageProcessingError: the image cannot be decoded or converted (the cause is chained).
            TypeError, ValueError: (also ``ImageProcessingError``) invalid ``normalize_mean`` /
                ``normalize_std`` (see the class).
        """
        return self.transform(pil_image).unsqueeze(0)


DEFAULT_PROCESSOR = ImageProcessor()
SD_PROCESSOR = ImageProcessor(target_size=512)
