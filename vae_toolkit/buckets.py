"""Aspect-ratio buckets, and how each image is prepared for encoding together with what a trainer needs of it.

The rule of ``encode --buckets AREA`` (``encode_dataset(buckets=AREA, bucket_step=S, max_aspect=R)``):

- :func:`bucket_sizes`: for every width ``w`` that is a multiple of ``S``, the height
  ``h = floor(AREA² / w / S) · S`` (the largest multiple of ``S`` with ``w · h ≤ AREA²``), kept when ``h ≥ S``
  and ``max(w, h) / min(w, h) ≤ R``; every kept ``(w, h)`` also gives its transpose ``(h, w)``.
- :func:`choose_bucket`: an image of ``W x H`` goes to the bucket whose ``log(w / h)`` is nearest to
  ``log(W / H)`` (compared exactly, as fractions); ties go to the larger area, then the wider bucket.
- :func:`plan_crop`: it is resized, aspect kept, to the smallest size that covers the bucket
  (``scale = max(w / W, h / H)``, ``W' = round(W · scale)``, ``H' = round(H · scale)``, Python's ``round``
  of the exact fraction), with the resampling of ``--size`` (bilinear, antialiased; a large JPEG decoded at a
  reduced DCT scale first unless ``exact``), then cropped to ``w x h`` at ``top = (H' - h) // 2``,
  ``left = (W' - w) // 2``. Smaller images are scaled up. An image more than 4 times the area of its bucket once
  resized (a thin strip) is resampled only where it is kept, so that its memory follows the bucket (values within
  one level of resize-then-crop; the plan is the same).

With ``--no-upscale`` (``no_upscale=True``, kohya's option; :func:`fit_bucket`) no image is scaled up: an image
smaller than its bucket on either side takes instead the largest bucket that fits inside it (both sides at most
the image's; ties: the nearest ``log(w / h)``, then the wider), or, when none fits, a bucket of its own size,
each side rounded down to a multiple of ``S`` (of 8 for a side shorter than ``S``), the long side then cut to
``R`` times the short one (rounded down the same way); it is resized down to cover that bucket and cropped as
above. With ``--size N`` every latent is ``N x N``, so an image whose shorter side is below ``N`` cannot be kept
without scaling it up: with ``--no-upscale`` it is left out as too small (:class:`ImageTooSmallError`). Each
image keeping its own size (neither option) is never scaled. ``--min-size M`` (``min_size``) leaves out, in
every mode, an image whose shorter side (EXIF orientation applied) is below ``M`` pixels. A left-out image is
found from its header, before it is decoded, and listed with its reason.

:func:`prepare_image` reads one image in any of the three modes (buckets, ``--size``, neither) and returns it
with its conditioning: the original size ``(H, W)``, the resized size ``(H', W')`` and the crop's top-left
corner ``(top, left)`` in the resized image (SDXL's ``original_size`` and ``crops_coords_top_left``; the
target size is the prepared image's own ``(h, w)``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Any, Union

import torch

from ._checks import check_int
from ._orientation import exif_orientation, swaps_axes, transpose_method
from ._pixels import LUT_SD, SD_NORM, resize_crop, rgb_to_dtype
from .image_utils import ImageProcessingError, load_for_encoding, open_for_resize

logger = logging.getLogger(__name__)

MULTIPLE = 8  # latents need sides that are multiples of the VAE's downsampling
Readable = Union[str, "os.PathLike[str]", IO[bytes]]


def bucket_sizes(area: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """The buckets of ``area`` (see the module's rule) as ``(width, height)``, sorted by ``width / height``.

    Args:
        area: The side of the square of about the same area (``1024`` for SDXL's one megapixel).
        step: Both sides are multiples of it (default 64; a multiple of 8).
        max_aspect: The largest ``long side / short side`` kept (default 4).

    Raises:
        TypeError / ValueError: bad arguments, or no bucket at all (``area`` smaller than ``step``, or
            ``max_aspect`` too small for any pair of multiples of ``step``).

    Example:
        >>> bucket_sizes(256)[:3]
        [(128, 512), (128, 448), (128, 384)]
    """
    check_int("area", area, 1)
    check_int("step", step, MULTIPLE)
    if step % MULTIPLE:
        raise ValueError(f"bucket step must be a multiple of {MULTIPLE}, got {step}")
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, (int, float)):
        raise TypeError(f"max_aspect must be a number >= 1, got {max_aspect!r}")
    if not 1 <= max_aspect < math.inf:
        raise ValueError(f"max_aspect must be a finite number >= 1, got {max_aspect}")
    square = area * area
    found: set[tuple[int, int]] = set()
    for w in range(step, square // step + 1, step):
        h = square // (w * step) * step
        if h >= step and max(w, h) <= max_aspect * min(w, h):
            found.add((w, h))
            found.add((h, w))
    if not found:
        raise ValueError(
            f"buckets of area {area} with step {step} and max aspect {max_aspect} give no bucket (a bucket's sides "
            f"are multiples of {step} with an area of at most {area}x{area}); choose a larger --buckets, a smaller "
            "--bucket-step or a larger --max-aspect"
        )
    return sorted(found, key=lambda b: (Fraction(b[0], b[1]), b[0]))


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of an image of ``width x height``: nearest ``log(w / h)``; ties: larger area, then wider."""

    def distance(b: tuple[int, int]) -> tuple[Fraction, int, int]:
        a, c = b[0] * height, b[1] * width  # log(w/h) - log(W/H) = log(a / c)
        return Fraction(max(a, c), min(a, c)), -b[0] * b[1], -b[0]

    return min(buckets, key=distance)


@dataclass(frozen=True)
class CropPlan:
    """How an image of ``original`` size becomes ``target``: resized to ``resized``, cropped at ``(top, left)``.

    All sizes are ``(height, width)``, as SDXL's ``original_size`` / ``target_size`` are.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    target: tuple[int, int]

    @property
    def upscaled(self) -> bool:
        """Whether the image was scaled up (smaller than its bucket)."""
        return self.resized[0] > self.original[0] or self.resized[1] > self.original[1]


def fit_bucket(
    width: int, height: int, buckets: list[tuple[int, int]], step: int | None = None, max_aspect: float | None = None
) -> tuple[int, int]:
    """The bucket of an image of ``width x height`` that is never scaled up (``no_upscale``; the module's rule).

    ``step`` and ``max_aspect`` shape the bucket of the image's own size when no bucket fits inside it (default:
    the greatest common divisor of the buckets' sides, and their largest ``long / short``).

    Raises:
        ImageTooSmallError: a side below 8 pixels (no latent can be made without scaling the image up).
    """
    chosen = choose_bucket(width, height, buckets)
    if chosen[0] <= width and chosen[1] <= height:
        return chosen
    inside = [b for b in buckets if b[0] <= width and b[1] <= height]
    if inside:

        def rank(b: tuple[int, int]) -> tuple[int, Fraction, int]:
            a, c = b[0] * height, b[1] * width
            return b[0] * b[1], -Fraction(max(a, c), min(a, c)), b[0]

        return max(inside, key=rank)
    if step is None:
        step = math.gcd(*(side for b in buckets for side in b))
    limit = max(Fraction(max(b), min(b)) for b in buckets) if max_aspect is None else Fraction(max_aspect)

    def down(value: float | Fraction) -> int:
        side = math.floor(value)
        return side - side % (step if side >= step else MULTIPLE)

    w, h = down(width), down(height)
    if min(w, h) < MULTIPLE:
        raise ImageTooSmallError(
            f"its shorter side ({min(width, height)} px) is below {MULTIPLE}, the least a latent needs, and "
            "--no-upscale keeps it from being scaled up"
        )
    if w > limit * h:
        w = down(limit * h)
    elif h > limit * w:
        h = down(limit * w)
    return w, h


class ImageTooSmallError(ImageProcessingError):
    """An image left out by ``min_size``, or by ``no_upscale`` when it could only be kept by scaling it up.

    Found from the image's header, before it is decoded; ``encode_dataset`` lists it as too small (not as a
    failure), and a rerun does not read it again while the file is unchanged. ``stat`` is set by the reader that
    knows the source's (size, mtime).
    """

    stat: tuple[int, int] = (-1, -1)


def check_small(width: int, height: int, size: int | None, no_upscale: bool, min_size: int | None) -> None:
    """Raise :class:`ImageTooSmallError` when an image of ``width x height`` is left out (the module's rule)."""
    short = min(width, height)
    if min_size is not None and short < min_size:
        raise ImageTooSmallError(f"its shorter side ({short} px) is below --min-size {min_size}")
    if no_upscale and size is not None and short < size:
        raise ImageTooSmallError(
            f"its shorter side ({short} px) is smaller than --size {size}, and --no-upscale keeps it from being "
            "scaled up"
        )


def plan_crop(width: int, height: int, bucket: tuple[int, int]) -> CropPlan:
    """The resize and crop of an image of ``width x height`` into ``bucket`` ``(w, h)`` (the module's rule)."""
    w, h = bucket
    scale = max(Fraction(w, width), Fraction(h, height))
    new_w, new_h = round(width * scale), round(height * scale)
    return CropPlan((height, width), (new_h, new_w), ((new_h - h) // 2, (new_w - w) // 2), (h, w))


def size_plan(width: int, height: int, size: int | None, multiple: int = MULTIPLE) -> CropPlan:
    """The resize and crop that ``load_for_encoding(path, size, multiple=multiple)`` applies to an image of
    ``width x height``."""
    if size is None:  # kept, center-cropped to multiples of ``multiple`` (8, or the model's spatial factor)
        cw, ch = width - width % multiple, height - height % multiple
        return CropPlan((height, width), (height, width), ((height - ch) // 2, (width - cw) // 2), (ch, cw))
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return CropPlan((height, width), (new_h, new_w), (top, left), (size, size))


@dataclass
class Prepared:
    """An image as encoded (``[3, h, w]`` in ``[-1, 1]``) and how it was made from the file."""

    image: torch.Tensor
    plan: CropPlan


def prepare_image(
    path: Readable,
    *,
    size: int | None = None,
    buckets: list[tuple[int, int]] | None = None,
    exact: bool = False,
    max_pixels: int | None = None,
    no_upscale: bool = False,
    min_size: int | None = None,
    bucket_step: int | None = None,
    max_aspect: float | None = None,
    multiple: int = MULTIPLE,
) -> Prepared:
    """Read an image as ``encode_dataset`` does, with its :class:`CropPlan`.

    With ``buckets``, the image goes to its bucket (:func:`choose_bucket`; with ``no_upscale``,
    :func:`fit_bucket`, which uses ``bucket_step`` and ``max_aspect``), is resized and cropped by
    :func:`plan_crop`. Otherwise the image is exactly ``load_for_encoding(path, size, exact=exact,
    multiple=multiple)`` (``multiple``: the model's spatial factor, at least 8).

    Raises:
        ImageTooSmallError: the image is left out by ``min_size``, or by ``no_upscale`` (the module's rule);
            raised from its header, before it is decoded.
        ImageProcessingError: as :func:`vae_toolkit.load_for_encoding`.
    """
    if buckets is None:
        width, height = _image_size(path)
        if width and height:  # (0, 0): unreadable, which the reader reports
            check_small(width, height, size, no_upscale, min_size)
        image = load_for_encoding(path, size, exact=exact, max_pixels=max_pixels, multiple=multiple)  # type: ignore[arg-type]  # a file object too
        return Prepared(image, size_plan(width, height, size, multiple))
    chosen = buckets

    def bucket_of(w: int, h: int) -> tuple[int, int]:
        check_small(w, h, None, no_upscale, min_size)
        return fit_bucket(w, h, chosen, bucket_step, max_aspect) if no_upscale else choose_bucket(w, h, chosen)

    def draft(full: tuple[int, int]) -> int | None:
        plan = plan_crop(full[0], full[1], bucket_of(full[0], full[1]))
        return None if exact else min(plan.resized)

    rgb, (width, height), box = open_for_resize(path, draft, max_pixels)  # type: ignore[arg-type]
    plan = plan_crop(width, height, bucket_of(width, height))
    (new_h, new_w), (top, left), (h, w) = plan.resized, plan.crop, plan.target
    rgb = resize_crop(rgb, (new_w, new_h), (left, top), (w, h), box)
    return Prepared(rgb_to_dtype(rgb, LUT_SD, SD_NORM, torch.get_default_dtype()), plan)


def _image_size(path: Readable) -> tuple[int, int]:
    """The ``(width, height)`` a file shows (its header only, EXIF orientation applied); ``(0, 0)`` when it cannot
    be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            turned = swaps_axes(transpose_method(exif_orientation(img)))  # as load_for_encoding turns it
            return (img.size[1], img.size[0]) if turned else img.size
    except Exception:  # the reader that follows reports it with its own message
        return (0, 0)
    finally:
        if hasattr(path, "seek"):
            path.seek(0)


def training_settings(
    size: int | None,
    buckets: int | None,
    bucket_step: int,
    max_aspect: float,
    flip: bool,
    distribution: bool,
    sample: bool,
    no_upscale: bool = False,
    min_size: int | None = None,
) -> dict[str, Any]:
    """The training-cache settings a store records (checked, as the others, on every rerun)."""
    check_int("min_size", min_size, 1, allow_none=True)
    for name, value in (("flip", flip), ("distribution", distribution), ("no_upscale", no_upscale)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    if no_upscale and size is None and buckets is None:
        raise ValueError(
            "no_upscale (--no-upscale) needs size or buckets: without them every image keeps its own size and is "
            "never scaled up"
        )
    if buckets is not None and size is not None:
        raise ValueError(
            f"size ({size}) and buckets ({buckets}) exclude each other: size crops every image square, buckets "
            "keep each image's aspect ratio; pass one of them"
        )
    if distribution and sample:
        raise ValueError("sample and distribution exclude each other: distribution stores what a sample is drawn "
                         "from (mean and std), sample one drawn latent; pass one of them")  # fmt: skip
    spec = None
    if buckets is not None:
        bucket_sizes(buckets, bucket_step, max_aspect)  # raises when there is no bucket
        spec = {"area": int(buckets), "step": int(bucket_step), "max_aspect": float(max_aspect)}
    return {"buckets": spec, "flip": flip, "distribution": distribution, "no_upscale": no_upscale,
            "min_size": None if min_size is None else int(min_size)}  # fmt: skip
