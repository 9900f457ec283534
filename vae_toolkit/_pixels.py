"""Pixels to tensors, the bottom of the image path: the image errors, uint8 lookup tables and RGB bands.

:mod:`vae_toolkit.image_utils` builds the public functions on these (and re-exports the errors); nothing here
opens files or knows about models. :func:`resize_crop` is the one resize-then-crop of ``--size``, the buckets and
``pil_to_tensor``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias, cast

import numpy as np
import torch

from ._warnings import VAEToolkitWarning, caller_stacklevel

if TYPE_CHECKING:
    from PIL import Image


class ImageProcessingError(Exception):
    """An image or tensor could not be converted; the message says which and why."""

    __module__ = "vae_toolkit.image_utils"  # its 0.1.0 home, where it is imported from and shown


class InputTypeError(ImageProcessingError, TypeError):
    """Wrong input type: a ``TypeError`` that is still an ``ImageProcessingError`` (as in 0.1.0)."""


class InputValueError(ImageProcessingError, ValueError):
    """Wrong input value (a closed image, too): a ``ValueError`` that is still an ``ImageProcessingError``."""


class ImageReadError(ImageProcessingError, OSError):
    """Image data that cannot be read (truncated, corrupt): an ``OSError``, as PIL raises, and an
    ``ImageProcessingError``."""


def error_like(err: BaseException) -> type[ImageProcessingError]:
    """The ``ImageProcessingError`` class that also has ``err``'s family (``OSError``, ``ValueError``,
    ``TypeError``) as a base: 0.1.0's ``ImageProcessor.transform`` let PIL's error through, so code that
    catches that family must still catch ours."""
    for family, cls in ((OSError, ImageReadError), (ValueError, InputValueError), (TypeError, InputTypeError)):
        if isinstance(err, family):
            return cls
    return ImageProcessingError


# --- uint8 -> float lookup tables ---------------------------------------------------------------


Norm: TypeAlias = "tuple[Sequence[float], Sequence[float]] | None"  # (mean, std), or None for [0, 1]
SD_NORM: Norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def lut_tensor(norm: Norm, dtype: torch.dtype) -> torch.Tensor:
    """[3, 256] table of ``(v / 255 - mean) / std`` in ``dtype``, computed with the operations of torchvision's
    ``ToTensor`` + ``Normalize`` in that dtype, hence the same values bit for bit."""
    levels = torch.arange(256, dtype=dtype).div(255).expand(3, 256)
    if norm is not None:
        m = torch.as_tensor(norm[0], dtype=dtype).view(-1, 1)
        s = torch.as_tensor(norm[1], dtype=dtype).view(-1, 1)
        levels = levels.sub(m).div(s)
    return levels.contiguous()


def lut_array(norm: Norm) -> np.ndarray:
    """The float32 table as a numpy array (the fast path of ``rgb_to_tensor``)."""
    return lut_tensor(norm, torch.float32).numpy()


LUT_UNIT = lut_array(None)
LUT_SD = lut_array(SD_NORM)
F32_1, F32_127_5, F32_255 = np.float32(1.0), np.float32(127.5), np.float32(255.0)
T_128 = torch.tensor(128.0)


def band_bytes(rgb: Image.Image, band: str) -> bytes:
    """``rgb.tobytes("raw", band)``: one band of an RGB image as ``height * width`` bytes, packed in one call.

    ``tobytes`` packs in 64 KB pieces and joins them (a second copy, and a Python round trip per piece); PIL's
    raw encoder given one buffer of the whole band packs it at once, which takes about a third less time at
    512². The encoder is looked up through ``PIL.Image._getencoder`` (what ``tobytes`` itself calls, in every
    Pillow since 1.1); should a Pillow change it, ``tobytes`` is used.
    """
    w, h = rgb.size
    if w == 0 or h == 0:
        return b""
    load_pixels(rgb)  # as tobytes loads a lazily opened image first
    try:
        from PIL import Image

        encoder = Image._getencoder(rgb.mode, "raw", (band,))
        encoder.setimage(rgb.im, (0, 0, w, h))
        pieces = []
        while True:
            _, errcode, data = encoder.encode(max(w * h, 65536))
            pieces.append(data)
            if errcode:
                break
    except (AttributeError, TypeError, ValueError):  # a Pillow whose internals differ
        return rgb.tobytes("raw", band)
    if errcode < 0:
        return rgb.tobytes("raw", band)  # let tobytes raise its own error
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def rgb_to_tensor(rgb: Image.Image, lut: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """RGB PIL image → contiguous float32 ``[3, H, W]`` holding ``lut[c, v]`` for each pixel value ``v``.

    PIL packs each band straight into a planar uint8 buffer (no interleaved copy, no index arrays).
    For the two built-in tables the values are computed with float32 arithmetic straight from the plane,
    which gives the table's values bit for bit (float32 IEEE division/subtraction): ``v / 127.5 - 1`` for
    ``LUT_SD`` and ``v / 255`` for ``LUT_UNIT``. Other tables are gathered per channel. numpy releases the
    GIL in these loops.
    """
    w, h = rgb.size
    if out is None:
        out = torch.empty((3, h, w), dtype=torch.float32)
    dst = out.numpy()
    for c, band in enumerate("RGB"):
        plane = np.frombuffer(band_bytes(rgb, band), dtype=np.uint8).reshape(h, w)
        d = dst[c]  # one channel at a time: its 1 MB (at 512²) stays in cache across the passes
        if lut is LUT_SD:  # divided straight from the uint8 plane: one pass less than copy-then-divide
            np.divide(plane, F32_127_5, out=d, dtype=np.float32)
            np.subtract(d, F32_1, out=d)
        elif lut is LUT_UNIT:
            np.divide(plane, F32_255, out=d, dtype=np.float32)
        else:
            np.take(lut[c], plane, out=d)
    return out


def rgb_to_dtype(rgb: Image.Image, lut: np.ndarray, norm: Norm, dtype: torch.dtype) -> torch.Tensor:
    """``rgb_to_tensor`` in ``dtype``: torch's default dtype, which 0.1.0 (torchvision) returned.

    float32, the default, takes the fast path with ``lut``; after ``torch.set_default_dtype(torch.float64)``
    (or float16 / bfloat16) the table ``norm`` is computed in that dtype and gathered: 0.1.0's values in it.
    """
    if dtype == torch.float32:
        return rgb_to_tensor(rgb, lut)
    w, h = rgb.size
    index = torch.from_numpy(np.array(rgb, dtype=np.uint8).reshape(h * w, 3)).T.long()
    return torch.gather(lut_tensor(norm, dtype), 1, index).view(3, h, w)


# --- resize, then crop ---------------------------------------------------------------------------


RESIZE_WHOLE_UP_TO = 4
""":func:`resize_crop` resizes the whole image while it is at most this many times the kept region (every image up
to 4:1 into a square): PIL's resize then the crop, bit for bit, as 0.1.0. Beyond it (a thin strip, a spacer) only
the kept region is resampled, so that memory follows the output whatever the aspect."""


def resize_crop(
    rgb: Image.Image,
    resized: tuple[int, int],
    crop: tuple[int, int],
    target: tuple[int, int],
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """``rgb`` resized to ``resized`` (bilinear, antialiased), then cropped to ``target`` at ``crop``.

    Sizes are ``(width, height)``, ``crop`` is ``(left, top)`` in the resized image. While the resized image is at
    most ``RESIZE_WHOLE_UP_TO`` times the target it is made and cropped: PIL's values bit for bit. A larger one is
    never made (a 2x3000 strip into 512x2048 would be 512x768,000, 1.5 GB): PIL resamples only the kept region
    (``resize`` with that region's ``box``, the same sample positions), within one uint8 level of resize-then-crop
    (the box is float32 in PIL, which may also run its two passes in the other order for it). ``box`` is where the
    full image lies in ``rgb`` (a JPEG decoded at a reduced DCT scale); the kept region is then resampled from it.
    """
    from PIL import Image

    (new_w, new_h), (left, top), (w, h) = resized, crop, target
    if box is None and new_w * new_h <= RESIZE_WHOLE_UP_TO * w * h:
        if rgb.size != (new_w, new_h):
            rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
        if (left, top, new_w, new_h) != (0, 0, w, h):
            rgb = rgb.crop((left, top, left + w, top + h))
        return rgb
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(rgb.width), float(rgb.height))
    sx, sy = (x1 - x0) / new_w, (y1 - y0) / new_h
    kept = (x0 + left * sx, y0 + top * sy, min(x1, x0 + (left + w) * sx), min(y1, y0 + (top + h) * sy))
    return rgb.resize((w, h), Image.Resampling.BILINEAR, box=kept)


WIDE_MODES = frozenset(("I", "F", "I;16", "I;16L", "I;16B", "I;16N"))
EXTREMA_MODES = frozenset(("I", "F", "I;16"))  # getextrema() raises for I;16L, I;16B and I;16N


def warn_if_clipped(img: Image.Image, source: object) -> None:
    """Warn when converting a 16/32-bit image to RGB will saturate values outside [0, 255]."""
    if img.mode not in WIDE_MODES or 0 in img.size:  # an empty image has nothing to clip
        return
    if img.mode in EXTREMA_MODES:
        lo, hi = cast("tuple[float, float]", img.getextrema())
    else:
        values = np.asarray(img)
        lo, hi = values.min().item(), values.max().item()
    if lo < 0 or hi > 255:
        warnings.warn(
            f"{source}: {img.mode} image with values in [{lo}, {hi}] is converted to 8-bit RGB by clipping to "
            "[0, 255] (PIL's convert('RGB'), as in vae-toolkit 0.1.0), so its range is lost. Scale it to 8 bits "
            "first, e.g. Image.fromarray((np.asarray(img) >> 8).astype(np.uint8)) for 16-bit data.",
            VAEToolkitWarning,
            stacklevel=caller_stacklevel(),
        )


_LOAD_GUARD = threading.Lock()
_LOAD_LOCKS: dict[int, tuple[threading.Lock, list[int]]] = {}  # id(image) -> (lock, [callers waiting])


def load_pixels(img: Image.Image) -> None:
    """``img.load()``, one thread at a time per lazily opened image.

    PIL decodes a lazily opened image on first use, and two threads doing so at once read the same file
    handle and write the same buffer (corrupt pixels or odd exceptions). Images already decoded skip the
    lock. The entry lives only while some thread is inside, so ``id`` cannot be reused meanwhile.
    """
    if not getattr(img, "tile", None):  # decoded already, or not read from a file
        img.load()
        return
    key = id(img)
    with _LOAD_GUARD:
        lock, users = _LOAD_LOCKS.setdefault(key, (threading.Lock(), [0]))
        users[0] += 1
    try:
        with lock:
            img.load()
    finally:
        with _LOAD_GUARD:
            users[0] -= 1
            if not users[0]:
                del _LOAD_LOCKS[key]
