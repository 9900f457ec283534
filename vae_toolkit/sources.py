"""Where images come from: the source walk and the keys of a store.

:func:`find_images` lists a folder (recursively, following links, each folder once) or a list of files as
``(root, sorted keys)``, a key being the path relative to ``root`` with ``/``. :func:`scan_source` also reads
each file's size and mtime once (what a rerun compares with the store) and sets aside names that cannot be
keys. Reading the images is :mod:`vae_toolkit.batching`'s; what is stored of them, :mod:`vae_toolkit.encoding`'s.

Captions: an image's caption is the text of its sidecar ``NAME.txt`` (same folder, same name without the image's
extension: ``a.jpg`` and ``a.txt``), read by :func:`read_caption` when the image is encoded, or None when there
is none. :func:`decode_caption` is the rule for any caption's bytes (also a tar sample's ``KEY.txt``): strict
UTF-8 (a byte order mark is dropped), surrounding whitespace stripped, at most :data:`MAX_CAPTION_BYTES`; bytes
that are not UTF-8 make the image a failure whose reason names the file, rather than a caption with replaced
characters that a trainer would learn from.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .image_utils import image_extensions

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 1 << 16  # 64 KiB: far above any caption; a larger file is not one


class CaptionError(ValueError):
    """A caption that cannot be stored (not UTF-8, too long, unreadable): its image is listed as a failure."""


def _printable(name: str) -> str:
    """A file name that is not valid UTF-8 (``os`` gives it surrogate escapes), written with ``\\x..`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class Source:
    """The images to encode: sorted keys, each file's (size, mtime) read once, and names that cannot be keys."""

    root: Path
    keys: list[str]
    stats: list[tuple[int, int]]
    bad: dict[str, str]  # printable name -> reason
    is_folder: bool


def scan_source(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Source:
    if isinstance(source, (str, os.PathLike)):
        root = Path(source).expanduser()
        if root.is_file():
            return Source(root.parent.absolute(), [root.name], [file_stat(root)], {}, is_folder=False)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        found: list[tuple[str, tuple[int, int]]] = []
        bad: dict[str, str] = {}
        _walk(root, "", image_extensions(), found, bad, set())
        if not found and not bad:
            raise ValueError(f"no image files found in {root} (searched recursively)")
        found.sort()
        return Source(root.absolute(), [k for k, _ in found], [s for _, s in found], bad, is_folder=True)
    paths = [Path(p).expanduser().absolute() for p in source]
    if not paths:
        raise ValueError("no image files given: pass a folder or a non-empty list of files")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
    root = Path(os.path.commonpath([p.parent for p in paths]))
    by_key = {p.relative_to(root).as_posix(): p for p in paths}
    good, bad = [], {}
    for key in sorted(by_key):
        if _valid_key(key):
            good.append(key)
        else:
            bad[_printable(key)] = "file name is not valid UTF-8; rename the file"
    return Source(root, good, [file_stat(by_key[k]) for k in good], bad, is_folder=False)


def _valid_key(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _walk(
    folder: Path,
    prefix: str,
    extensions: frozenset[str],
    found: list[tuple[str, tuple[int, int]]],
    bad: dict[str, str],
    visited: set[tuple[int, int]],
) -> None:
    """Every image under ``folder``, following symlinked files and folders; each folder is visited once."""
    try:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in visited:
            logger.info("not following %s again (a link to a folder already visited)", folder)
            return
        visited.add((st.st_dev, st.st_ino))
        entries = list(os.scandir(folder))
    except OSError as err:
        logger.warning("cannot list %s: %s", folder, err)
        return
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        key = f"{prefix}{name}"
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError:
            is_dir = False
        if is_dir:
            _walk(Path(entry.path), f"{key}/", extensions, found, bad, visited)
            continue
        if os.path.splitext(name)[1].lower() not in extensions:
            continue
        if not _valid_key(key):
            bad[_printable(key)] = "file name is not valid UTF-8; rename the file"
            continue
        try:
            st = entry.stat()
            stat = (int(st.st_size), int(st.st_mtime_ns)) if stat_module.S_ISREG(st.st_mode) else (-1, -1)
        except OSError:  # e.g. a broken link: tried, and reported as a failure
            stat = (-1, -1)
        found.append((key, stat))


def find_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[Path, list[str]]:
    """List the images to encode as ``(root, sorted keys)``; a key is a path relative to ``root``, with ``/``.

    Args:
        source: A folder (searched recursively, following symlinked files and folders, each folder once;
            names starting with ``.`` are skipped; files are kept when their extension is one of the raster
            formats PIL decodes here, see :func:`vae_toolkit.image_extensions`) or a list of image files
            (``root`` is their common folder). Files whose name is not valid UTF-8 cannot be keys: they are
            left out with a warning (``encode_dataset`` records them as failures).

    Raises:
        FileNotFoundError: ``source`` (or a listed file) does not exist.
        ValueError: an empty list, or a folder without any image file.

    Example:
        >>> root, keys = find_images("photos")  # doctest: +SKIP
        >>> keys[:2]
        ['a.jpg', 'holiday/b.png']
    """
    src = scan_source(source)
    for name, reason in src.bad.items():
        logger.warning("skipped %s: %s", name, reason)
    return src.root, src.keys


def file_stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def decode_caption(data: bytes, name: str) -> str:
    """The caption held by ``data``: strict UTF-8, byte order mark dropped, stripped (``name`` says where it is
    from in a message: ``"caption file a.txt"``).

    Raises:
        CaptionError: more than :data:`MAX_CAPTION_BYTES`, or not valid UTF-8 (the message says where).
    """
    if len(data) > MAX_CAPTION_BYTES:
        raise CaptionError(
            f"{name} has {len(data):,} bytes, more than {MAX_CAPTION_BYTES:,}: not a caption; shorten it or move it "
            "away"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionError(
            f"{name} is not UTF-8 text (byte {data[err.start]:#04x} at position {err.start}); save it as UTF-8"
        ) from None
    return text.strip()


def read_caption(image: Path) -> str | None:
    """The caption of the image file ``image``: its sidecar ``NAME.txt`` decoded by :func:`decode_caption`, or None
    when there is no such file.

    Raises:
        CaptionError: the sidecar exists but cannot be read or decoded.
    """
    sidecar = image.with_name(os.path.splitext(image.name)[0] + CAPTION_SUFFIX)
    try:
        with open(sidecar, "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CaptionError(f"caption file {sidecar} cannot be read: {err.strerror or err}") from err
    return decode_caption(data, f"caption file {sidecar}")
