"""Argument checks shared by the dataset and evaluate calls: one message for one mistake."""

from __future__ import annotations


def check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    """``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` when it is below ``minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


#: The default pixel limit of ``encode`` and ``evaluate``: PIL's decompression-bomb warning threshold
#: (``PIL.Image.MAX_IMAGE_PIXELS``'s default, 1024 * 1024 * 1024 // 4 // 3; PIL refuses only twice that).
DEFAULT_MAX_PIXELS = 89_478_485


def pixel_limit_message(path: object, width: int, height: int, limit: int) -> str | None:
    """Why an image of ``width x height`` is refused under ``limit`` pixels, or None when it is within it."""
    if width * height <= limit:
        return None
    return (
        f"{path}: {width}x{height} = {width * height:,} pixels, above the limit of {limit:,} pixels (a guard "
        "against decompression bombs); if the file is trusted, raise the limit with --max-pixels N "
        "(max_pixels=N in Python), 0 (None) for no limit"
    )
