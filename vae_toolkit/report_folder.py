"""The report folder of ``evaluate``: checked before any model loads, rows written as they come, and a manifest of
what a report wrote, so that ``overwrite`` replaces that and nothing else.

- :func:`check_report_folder` refuses, before any work: a file (or a path below one), a folder that is the
  evaluated source folder or inside it, a folder where a name the report writes is a symbolic link, a non-empty
  folder without ``overwrite``, and (``probe=True``) a folder that cannot take a file.
- ``report-manifest.json`` (:data:`MANIFEST_NAME`) lists every file a report wrote, as paths relative to the
  folder. With ``overwrite``, :func:`clear_previous_report` removes the files the previous report listed there,
  and only those whose names a report writes (:data:`REPORT_FILES`, ``images/compare-*.png``,
  ``images/distribution-*.png``); any other file in the folder, a user's, is never removed or replaced.
- :class:`RowWriter` appends each batch's rows to ``metrics.csv`` as they come, so that an interrupted run
  keeps what it did; a write error names the file.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The manifest a report writes beside its files: ``{"files": [relative paths], "partial": bool}``.
MANIFEST_NAME = "report-manifest.json"

#: The report's files at the top of the folder (pictures go under ``images/``).
REPORT_FILES = ("metrics.csv", "summary.json", "index.html")

_PICTURE = re.compile(r"images/(?:(?:compare|distribution)-[A-Za-z0-9._-]+|error-scale(?:-[0-9]+)?)\.png")


class ReportExistsError(FileExistsError):
    """The report folder exists and is not empty; pass ``overwrite=True`` or choose another folder.

    Attributes:
        folder: The report folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__(
            f"report folder {folder} exists and is not empty; pass overwrite=True to replace the report in it "
            "(only the files a report wrote, as its report-manifest.json lists them, are replaced), or choose "
            "another folder"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # sent from rank 0 to the other ranks
        return (type(self), (self.folder,))


class ReportInSourceError(ValueError):
    """The report folder is the evaluated source folder or inside it: its images could be replaced, and the next
    run would take the report's pictures for images to evaluate."""


class ReportLinkError(FileExistsError):
    """A name the report writes (``metrics.csv``, ``images/``...) is a symbolic link in the report folder: a report
    never writes through a link (it could replace a file anywhere, or put pictures into the evaluated images)."""


#: The names a report writes at the top of its folder, files and the pictures' folder.
_WRITTEN = (*REPORT_FILES, MANIFEST_NAME, "images")


def check_no_links(out: Path) -> None:
    """Refuse a report folder where a name the report writes (or a picture's) is a symbolic link.

    Raises:
        ReportLinkError: (a ``FileExistsError``) naming the link and where it leads.
    """
    names = [out / name for name in _WRITTEN]
    images = out / "images"
    if images.is_dir() and not images.is_symlink():
        try:
            names += [p for p in images.iterdir() if _PICTURE.fullmatch(f"images/{p.name}")]
        except OSError:
            pass
    for path in names:
        if path.is_symlink():
            raise ReportLinkError(
                f"refusing to write the report into {out}: {path.relative_to(out).as_posix()} is a symbolic link "
                f"(to {os.readlink(path)}), and a report never writes through a link; remove the link or choose "
                "another report folder"
            )


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or below it, links resolved."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def write_error(path: Path, err: OSError) -> OSError:
    """``err`` again, its message naming ``path`` and what to do (a full disk said as such)."""
    reason = err.strerror or str(err)
    hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
    return type(err)(err.errno, f"cannot write {path}: {reason}{hint}; free space or choose another report folder")


def check_report_folder(
    folder: str | os.PathLike[str],
    overwrite: bool = False,
    *,
    source: str | os.PathLike[str] | None = None,
    probe: bool = False,
) -> None:
    """Refuse a report folder that cannot hold this report, before any work is done.

    Args:
        folder: The report folder.
        overwrite: Accept a non-empty folder (the previous report's files are replaced; nothing else is touched).
        source: The evaluated folder, when known: a report folder that is it or inside it is refused.
        probe: Also create the folder and a test file in it, so that a read-only, full or forbidden folder is
            found now and not after the whole run.

    Raises:
        NotADirectoryError: the folder, or a folder above it, is a file.
        ReportInSourceError: (a ``ValueError``) the folder is ``source`` or inside it.
        ReportLinkError: (a ``FileExistsError``) ``metrics.csv``, ``summary.json``, ``index.html``, the manifest,
            ``images/`` or a picture in it is a symbolic link.
        ReportExistsError: (a ``FileExistsError``) the folder exists and is not empty, and not ``overwrite``.
        OSError: (``probe``) the folder cannot be created or written; the message names it.
        ImportError: matplotlib (the ``eval`` extra), which draws the report's plots, is not installed.
    """
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError('the report\'s plots need matplotlib: pip install "vae-toolkit[eval]"')
    out = Path(folder).expanduser()
    for parent in (out, *out.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                where = "" if parent == out else f"; the report folder {out} cannot be made below it"
                raise NotADirectoryError(f"{parent} is a file{where}; pass a folder for the report")
            break
    if source is not None and Path(source).is_dir() and inside(out, Path(source)):
        raise ReportInSourceError(
            f"refusing to write the report into {out}: it is inside {source}, the folder of the images evaluated "
            "(its images could be replaced, and the next run would take the report's pictures for images); choose a "
            "report folder outside it"
        )
    if out.is_dir():
        check_no_links(out)
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise ReportExistsError(out)
    if probe:
        probe_writable(out)


def probe_writable(out: Path) -> None:
    """Create ``out`` and a small file in it (removed at once); raise the ``OSError`` naming ``out`` if it fails."""
    test = out / f".report-probe.{uuid.uuid4().hex[:8]}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(test, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
    except OSError as err:
        raise write_error(out, err) from err
    finally:
        try:
            os.unlink(test)
        except OSError:
            pass


def _manifest(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def replaceable(name: object) -> bool:
    """Whether a manifest entry names a file a report writes (top-level report files or its pictures)."""
    return isinstance(name, str) and (name in REPORT_FILES or _PICTURE.fullmatch(name) is not None)


def clear_previous_report(out: Path) -> int:
    """Remove the files the previous report's manifest lists (only report names, only inside ``out``); the count.

    A folder without a manifest (a user's folder, or a report of vae-toolkit 0.2.0 or older) loses nothing here;
    its ``metrics.csv``, ``summary.json`` and ``index.html`` are replaced when the new report writes them.
    """
    files = _manifest(out).get("files", [])
    removed = 0
    for name in files if isinstance(files, list) else []:
        if not replaceable(name):
            logger.warning("not removing %s: the report manifest lists it, but a report never writes it", name)
            continue
        try:
            (out / name).unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as err:
            raise write_error(out / name, err) from err
    if removed:
        logger.info("overwrite: removed %d file(s) of the previous report in %s", removed, out)
    return removed


def write_manifest(out: Path, files: Iterable[str], *, partial: bool = False) -> None:
    """Write ``report-manifest.json``: the files this report wrote (relative paths), replaced atomically."""
    from ._version import __version__

    data = {"files": sorted(set(files)), "partial": partial, "written_by": f"vae-toolkit {__version__}"}
    atomic_text(out / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place; errors name ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(path, err) from err


def cell(value: Any) -> str:
    """A CSV cell: empty for None, the shortest exact form of a float (``inf`` as ``inf``)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def csv_text(columns: Sequence[str], rows: Iterable[dict[str, Any]], header: bool = False) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c)) for c in columns])
    return buffer.getvalue()


class RowWriter:
    """``metrics.csv`` written as the rows come: the header at once, then each batch's rows, each batch handed to
    the operating system before the next one (``os.write``, no buffer in this process), so that Ctrl-C, SIGTERM or
    a crash leaves a valid CSV of what was done. The finished report rewrites it in key order."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, list(columns)
        try:
            # O_NOFOLLOW: never truncated through a link, even one made after the folder was checked
            self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise write_error(path, err) from err
        self.rows = 0
        self._write(csv_text(self.columns, [], header=True))

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append ``rows`` (the columns this writer was made with)."""
        if rows:
            self._write(csv_text(self.columns, rows))
            self.rows += len(rows)

    def _write(self, text: str) -> None:
        if self.fd is None:
            raise ValueError(f"{self.path} is closed")
        data = memoryview(text.encode("utf-8"))
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as err:
            raise write_error(self.path, err) from err

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
