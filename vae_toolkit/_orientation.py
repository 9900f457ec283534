"""EXIF orientation: the transpose that shows an image as viewers do (as ``PIL.ImageOps.exif_transpose``), for a
decoded image and for the box where a reduced-scale (``Image.draft``) decode holds the full image.

``load_for_encoding`` applies it, so a phone portrait stored as 640x424 with orientation 6 is encoded as the
424x640 picture people see. ``open_image`` and ``load_and_preprocess_image`` keep 0.1.0's pixels as stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

ORIENTATION_TAG = 0x0112
Box = tuple[float, float, float, float]


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 (as stored) when absent, unreadable or out of range."""
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block: the pixels are shown as stored, as viewers do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def transpose_method(orientation: int) -> Image.Transpose | None:
    """PIL's transpose for an orientation, exactly as ``ImageOps.exif_transpose`` chooses it (None for 1)."""
    from PIL import Image

    t = Image.Transpose
    return {
        2: t.FLIP_LEFT_RIGHT,
        3: t.ROTATE_180,
        4: t.FLIP_TOP_BOTTOM,
        5: t.TRANSPOSE,
        6: t.ROTATE_270,
        7: t.TRANSVERSE,
        8: t.ROTATE_90,
    }.get(orientation)


def transpose_point(x: float, y: float, size: tuple[int, int], method: Image.Transpose) -> tuple[float, float]:
    """Where the point ``(x, y)`` of an image of ``size`` (pixel-edge coordinates) lands after ``method``."""
    from PIL import Image

    w, h = size
    t = Image.Transpose
    return {
        t.FLIP_LEFT_RIGHT: (w - x, y),
        t.FLIP_TOP_BOTTOM: (x, h - y),
        t.ROTATE_180: (w - x, h - y),
        t.ROTATE_90: (y, w - x),
        t.ROTATE_270: (h - y, x),
        t.TRANSPOSE: (y, x),
        t.TRANSVERSE: (h - y, w - x),
    }[method]


def transpose_box(box: Box, size: tuple[int, int], method: Image.Transpose) -> Box:
    """The box ``(left, top, right, bottom)`` of an image of ``size`` after ``method``."""
    x0, y0 = transpose_point(box[0], box[1], size, method)
    x1, y1 = transpose_point(box[2], box[3], size, method)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def swaps_axes(method: Image.Transpose | None) -> bool:
    from PIL import Image

    t = Image.Transpose
    return method in (t.ROTATE_90, t.ROTATE_270, t.TRANSPOSE, t.TRANSVERSE)
