"""Encode whole image folders to latents: a crash-safe, resumable store, on one device or many (torchrun).

:func:`encode_dataset` streams the images of a folder (or a list of files) through a VAE and writes the
*scaled* latents (exactly what :func:`vae_toolkit.latents.encode` returns) into safetensors shards, plus a
small JSON index and a binary per-key table (format version 2)::

    OUT/
      latents-<run>-r000-00000.safetensors    tensors named by the image path relative to the source
      latents-<run>-r000-00001.safetensors
      latents-table-<id>.bin                  sorted keys -> shard, byte offset, dtype, shape, sizes (numpy)
      latents.safetensors.index.json          settings, shard list (size + header checksum), failures
      latents.lock                            held by the run that writes the store (an OS lock)

:class:`LatentStore` opens ``OUT`` as a lazy, read-only mapping ``key -> latent`` that is also a
``torch.utils.data.Dataset``; :class:`BucketBatchSampler` batches latents of equal shape.

How the properties hold:

- **Same values as one at a time.** Each image is read by :func:`vae_toolkit.load_for_encoding`; only images
  of equal size share a batch; with ``sample=True`` every image draws its noise from its own generator,
  seeded from ``(seed, key)`` (:func:`sample_generator`).
- **Bounded memory.** Images are decoded on threads ahead of the model through a bounded window; at most a
  few batches of images and one shard of latents are held at a time.
- **Nothing lost, nothing served wrong.** A shard is written to a temporary file, fsynced and renamed, and
  carries its own entries in its header; it is written when it reaches ``max_shard_size`` bytes or
  ``checkpoint_every`` seconds, and on Ctrl-C or SIGTERM. The index is written after the shards, and only
  then are the files it supersedes deleted (listed as ``retired`` until they are gone). One writer at a
  time: an OS lock on ``latents.lock`` (the ranks of one torchrun job are one writer).
- **A rerun costs O(new work).** It reads the small index and maps the table, checks each listed shard's
  size and header checksum, reads the headers of unlisted shards only (left by a killed run), and merges
  the old table with the new entries.
- **torchrun.** Under ``WORLD_SIZE > 1`` each rank encodes a disjoint, deterministic part of the images
  into its own shards; rank 0 writes the index after a barrier.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import queue
import re
import signal
import socket
import stat as stat_module
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from . import __version__, _table, latents
from ._checks import check_int
from ._dist import ProcessGroup
from .image_utils import ImageProcessingError, available_cpus, image_extensions, load_for_encoding
from .model_config import get_all_model_configs

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "BucketBatchSampler",
    "EncodeSummary",
    "LatentStore",
    "StoreDamagedError",
    "StoreLockedError",
    "StoreMismatchError",
    "check_store",
    "default_workers",
    "encode_dataset",
    "failure_reason",
    "find_images",
    "iter_batches",
    "iter_images",
    "sample_generator",
    "INDEX_NAME",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "latents.safetensors.index.json"
LOCK_NAME = "latents.lock"
FORMAT = "vae-toolkit-latents"
FORMAT_VERSION = 2
MULTIPLE = 8  # images keep their size, center-cropped to a multiple of 8 (the SD / SDXL / FLUX downsampling)

_SHARD_RE = re.compile(r"^latents-[0-9a-f]{12}-r\d{3,}-\d{5,}\.safetensors$")
_TABLE_RE = re.compile(r"^latents-table-[0-9a-f]{12}\.bin$")
_TMP_SUFFIX = ".tmp"
_CORRUPT_SUFFIX = ".corrupt"
# settings that change the stored values: a store made with other settings is refused
_COMPATIBLE = ("model", "scaling_factor", "shift_factor", "latent_channels", "dtype", "vae_dtype", "size", "sample",
               "seed", "reader")  # fmt: skip
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)
_STORE_DTYPES = _table.DTYPES
_REBUILD = "run the same encode command again (python -m vae_toolkit encode SOURCE -o {out} ...)"


class StoreMismatchError(ValueError):
    """The output folder holds latents made with another model, image size, dtype, reader or sampling.

    Attributes:
        folder: The store folder.
        problems: One line per setting that differs (``"size: stored 512, requested 256"``).
    """

    def __init__(self, folder: Path, problems: list[str], advice: str | None = None) -> None:
        self.folder, self.problems, self.advice = folder, problems, advice
        advice = advice or "use another output folder, or pass overwrite=True to replace it"
        super().__init__(f"{folder} holds latents made with other settings ({'; '.join(problems)}); {advice}")

    def __reduce__(self) -> tuple[Any, ...]:  # sent from rank 0 to the other ranks
        return (type(self), (self.folder, self.problems, self.advice))


class StoreLockedError(RuntimeError):
    """Another run is writing the store (it holds ``latents.lock``)."""


class StoreDamagedError(OSError):
    """A file of the store is missing, truncated or damaged, or the store changed since it was opened."""


@dataclass
class EncodeSummary:
    """What :func:`encode_dataset` did (over all ranks under torchrun).

    Attributes:
        output: The store folder.
        total: Images found in the input.
        encoded: Images encoded by this run.
        skipped: Images already in the store and unchanged (not encoded again).
        failed: ``key -> reason`` for images that could not be read or encoded (also in the index).
        seconds: Wall time of the run.
        shards: Shard files written by this run.
        rank: The torchrun rank that returned this summary (0 in a single process); the counts are the
            same on every rank.
        removed: Entries removed because their source file is gone (see ``keep_missing``).
        loaded_model: Whether the model was loaded (a run with nothing to encode does not load it).
    """

    output: Path
    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    shards: int = 0
    rank: int = 0
    removed: int = 0
    loaded_model: bool = False

    @property
    def images_per_second(self) -> float:
        """Encoded images per second of wall time."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        removed = f", {self.removed} removed (source file gone)" if self.removed else ""
        return (
            f"{self.total} images: {self.encoded} encoded, {self.skipped} already stored, {len(self.failed)} failed"
            f"{removed} -> {self.output} ({self.shards} new shard(s)) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.1f} images/s"
        )


# --- inputs -----------------------------------------------------------------------------------------


def _printable(name: str) -> str:
    """A file name that is not valid UTF-8 (``os`` gives it surrogate escapes), written with ``\\x..`` escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class _Source:
    """The images to encode: sorted keys, each file's (size, mtime) read once, and names that cannot be keys."""

    root: Path
    keys: list[str]
    stats: list[tuple[int, int]]
    bad: dict[str, str]  # printable name -> reason
    is_folder: bool


def _scan_source(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> _Source:
    if isinstance(source, (str, os.PathLike)):
        root = Path(source).expanduser()
        if root.is_file():
            return _Source(root.parent.absolute(), [root.name], [_stat(root)], {}, is_folder=False)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        found: list[tuple[str, tuple[int, int]]] = []
        bad: dict[str, str] = {}
        _walk(root, "", image_extensions(), found, bad, set())
        if not found and not bad:
            raise ValueError(f"no image files found in {root} (searched recursively)")
        found.sort()
        return _Source(root.absolute(), [k for k, _ in found], [s for _, s in found], bad, is_folder=True)
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
    return _Source(root, good, [_stat(by_key[k]) for k in good], bad, is_folder=False)


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
    src = _scan_source(source)
    for name, reason in src.bad.items():
        logger.warning("skipped %s: %s", name, reason)
    return src.root, src.keys


def sample_generator(seed: int, key: str) -> torch.Generator:
    """The CPU generator whose noise ``encode_dataset(..., sample=True, seed=seed)`` uses for ``key``.

    ``latents.encode(vae, x, sample=True, generator=sample_generator(seed, key))`` reproduces the stored
    latent of that image, whatever the batch size or number of ranks of the run that stored it.
    """
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def default_workers() -> int:
    """Decoding threads for this process: the cores it may use, shared among the ranks of this machine.

    The cores are :func:`vae_toolkit.available_cpus` (the affinity mask and a cgroup's CPU quota, a
    container's or SLURM's limit); under torchrun they are divided by ``LOCAL_WORLD_SIZE``, so that the ranks
    of one machine do not each start a thread per core.
    """
    return max(1, available_cpus() // _local_world_size())


def _local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def _share_cores(workers: int) -> None:
    """Each rank of this machine takes its share of the cores, as torchrun's ``OMP_NUM_THREADS`` intends.

    Under torchrun with ``OMP_NUM_THREADS`` unset, torch's threads are limited to ``cores / LOCAL_WORLD_SIZE``;
    a warning says when the threads asked for clearly exceed the cores (one run was ~100x slower so).
    """
    cores, local = available_cpus(), _local_world_size()
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cores // local))
    threads = torch.get_num_threads()
    if local * threads > 2 * cores or local * workers > 4 * cores:
        logger.warning(
            "oversubscribed: %d process(es) on this machine each use %d torch and %d decoding threads on %d cores; "
            "set OMP_NUM_THREADS and --workers so that their sum stays near the core count",
            local, threads, workers, cores,
        )  # fmt: skip


# --- store files ----------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, err: OSError) -> OSError:
    reason = err.strerror or str(err)
    hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
    return type(err)(err.errno, f"cannot write {path}: {reason}{hint}; free space or choose another output folder")


def _atomic_write(path: Path, data: bytes | bytearray | memoryview | Callable[[BinaryIO], Any]) -> Any:
    """Write ``data`` (or what the function ``data(file)`` writes) to ``path``; a reader never sees a partial file.

    Returns what ``data(file)`` returned (None for bytes).
    """
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    result = None
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                result = data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return result


def _is_temporary(name: str) -> bool:
    """A file :func:`_atomic_write` had not renamed yet: ``<shard, table or index name>.<8 hex>.tmp``."""
    base, _, rest = name.rpartition(".")[0].rpartition(".")
    return (
        name.endswith(_TMP_SUFFIX)
        and len(rest) == 8
        and (base == INDEX_NAME or bool(_SHARD_RE.match(base)) or bool(_TABLE_RE.match(base)))
    )


class _WriterLock:
    """One writer per store: an OS lock (``flock``) on ``latents.lock``, released when its process dies.

    The file holds the holder's host, PID and start time, so that a refused run can name it. On a folder that
    cannot be written (read-only media) there is nothing to protect: ``writable`` is False and the caller may
    only read. Network file systems: NFSv4 and Lustre/GPFS mounted with locking honour ``flock`` across machines;
    some (old NFS without lockd, SMB, many FUSE file systems) lock only locally or refuse it, in which case a
    warning says so and making sure of a single writer is up to the user.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.fd: int | None = None
        self.writable = True
        self._filelock: Any = None

    def acquire(self) -> _WriterLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            self.writable = False
            return self
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise _write_error(self.path, err) from err
            self.writable = False
            try:
                self.fd = os.open(self.path, os.O_RDONLY)  # a read-only store may still be locked by its writer
            except OSError:
                return self
        try:
            import fcntl
        except ImportError:  # Windows: filelock's msvcrt lock
            return self._acquire_filelock()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            self.fd = None
            raise StoreLockedError(
                f"another encode run is writing {self.path.parent} ({holder}); wait for it to finish, or stop it "
                "(a killed run releases the lock at once)"
            ) from None
        except OSError as err:  # ENOLCK / EOPNOTSUPP: a file system without locks
            logger.warning("cannot lock %s (%s): make sure that only one encode run writes this store", self.path, err)
        return self

    def claim(self) -> None:
        """Write this run's host, PID and start time into the lock file (a refused run names them)."""
        if self.writable and self.fd is not None:
            info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}).encode()
            try:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, info, 0)
                os.fsync(self.fd)
            except OSError as err:
                raise _write_error(self.path, err) from err

    def _acquire_filelock(self) -> _WriterLock:  # pragma: no cover - Windows
        import filelock

        assert self.fd is not None
        os.close(self.fd)
        self.fd = None
        self._filelock = filelock.FileLock(str(self.path) + ".win", timeout=0)
        try:
            self._filelock.acquire()
        except filelock.Timeout:
            raise StoreLockedError(
                f"another encode run is writing {self.path.parent}; wait for it to finish"
            ) from None
        return self

    def _holder(self) -> str:
        try:
            assert self.fd is not None
            info = json.loads(os.pread(self.fd, 4096, 0) or b"{}")
            return f"host {info['host']}, PID {info['pid']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
        if self._filelock is not None:  # pragma: no cover - Windows
            self._filelock.release()
            self._filelock = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def _probe_writable(folder: Path) -> None:
    """Fail now, naming the folder, when it cannot take a file (read-only, no permission, disk full)."""
    probe = folder / f".{LOCK_NAME}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _write_error(folder, err) from err
    finally:
        probe.unlink(missing_ok=True)


@dataclass
class _Record:
    """One latent found in a shard's header (a shard the index does not list yet)."""

    key: str
    shard: str
    offset: int
    nbytes: int
    dtype: int
    shape: tuple[int, int, int]
    size: tuple[int, int]
    stat: tuple[int, int]
    created: int


@dataclass
class _Shard:
    """A shard file's header: the store settings, creation time, records, and what the index checks."""

    name: str
    settings: dict[str, Any]
    created: int
    records: list[_Record]
    bytes: int
    header_bytes: int
    header_crc32: int


def _read_header(path: Path) -> tuple[bytes, int]:
    """``(header JSON bytes, file size)`` of a safetensors file; ValueError when it is not one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is truncated ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path.name} is truncated (a {n}-byte header in a {size}-byte file)")
        return f.read(n), size


def _read_shard(path: Path) -> _Shard:
    """Parse a shard's header (not its tensors); ValueError when it is not a complete latent shard."""
    header_json, size = _read_header(path)
    try:
        header = json.loads(header_json)
        meta = header.pop("__metadata__", None) or {}
        if meta.get("format") != FORMAT:
            raise ValueError("not a vae-toolkit latent shard")
        settings = json.loads(meta["settings"])
        created = int(meta.get("created", 0))
        entries = json.loads(meta["entries"])
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name}: damaged header ({err!r})") from err
    if set(entries) != set(header):
        raise ValueError(f"{path.name}: header entries do not match its tensors")
    base = 8 + len(header_json)
    records = []
    for key, info in header.items():
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ValueError(f"{path.name} is truncated ({size} bytes; {key!r} ends at {base + end})")
        dtype = _table.SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None or len(info["shape"]) != 3:
            raise ValueError(f"{path.name}: {key!r} is not a latent ({info['dtype']}, shape {info['shape']})")
        entry = entries[key]
        records.append(
            _Record(
                key=key,
                shard=path.name,
                offset=base + begin,
                nbytes=end - begin,
                dtype=_STORE_DTYPES.index(dtype),
                shape=(int(info["shape"][0]), int(info["shape"][1]), int(info["shape"][2])),
                size=(int(entry["size"][0]), int(entry["size"][1])),
                stat=(int(entry["source_bytes"]), int(entry["source_mtime_ns"])),
                created=created,
            )
        )
    return _Shard(path.name, settings, created, records, size, len(header_json), zlib.crc32(header_json))


def _shard_problem(folder: Path, record: Mapping[str, Any]) -> str | None:
    """Why a listed shard does not match what the index recorded (size, header checksum), or None."""
    path = folder / record["file"]
    try:
        header_json, size = _read_header(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as err:
        return str(err)
    if size != record["bytes"]:
        return f"{size} bytes, the index recorded {record['bytes']}"
    if len(header_json) != record["header_bytes"] or zlib.crc32(header_json) != record["header_crc32"]:
        return "its header does not match the index (checksum)"
    return None


def _move_aside(path: Path, reason: str) -> None:
    """Rename a damaged file to ``*.corrupt`` (once), so that it is neither used nor warned about again."""
    target = path.with_name(path.name + _CORRUPT_SUFFIX)
    try:
        os.replace(path, target)
    except OSError as err:
        logger.warning("%s is damaged (%s) and could not be moved aside: %s", path, reason, err)
        return
    logger.warning("%s is damaged (%s); moved it to %s, and its latents are encoded again", path, reason, target.name)


def _read_index(folder: Path) -> dict[str, Any] | None:
    """The index as written by this version, or None (absent, damaged, or an older format: rebuilt from shards)."""
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable index %s (%s); it is rebuilt from the shards", path, err)
        return None
    problem = _index_problem(index)
    if problem is not None:
        logger.warning("ignoring %s (%s); it is rebuilt from the shards", path, problem)
        return None
    return index


def _index_problem(index: Any) -> str | None:
    if not isinstance(index, dict) or not isinstance(index.get("metadata"), dict):
        return "not a vae-toolkit latent index"
    meta = index["metadata"]
    if meta.get("format") != FORMAT:
        return "not a vae-toolkit latent index"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format version {meta.get('format_version')}, this version writes {FORMAT_VERSION}"
    missing = [k for k in _COMPATIBLE if k not in meta]
    if missing:
        return f"its metadata lacks {', '.join(missing)}"
    shards, table = index.get("shards"), index.get("table")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and {"file", "bytes", "header_bytes", "header_crc32"} <= set(s) for s in shards
    ):
        return "its shard list is malformed"
    if not isinstance(table, dict) or not {"file", "bytes", "sha256"} <= set(table):
        return "its table entry is malformed"
    if not isinstance(index.get("failures", {}), dict) or not isinstance(index.get("retired", []), list):
        return "its failures or retired lists are malformed"
    return None


@dataclass
class _State:
    """What a store folder holds, read without a Python object per stored key."""

    settings: dict[str, Any] | None = None
    index: dict[str, Any] | None = None
    table: _table.Table | None = None
    keep: np.ndarray | None = None  # table rows whose shard is intact
    shards: list[dict[str, Any]] = field(default_factory=list)  # the index's shard records (by table shard id)
    orphans: list[_Shard] = field(default_factory=list)  # unlisted shards (a killed run's), oldest first
    damaged: int = 0  # listed shards found damaged (their rows are dropped and encoded again)
    bad_files: list[tuple[Path, str]] = field(default_factory=list)  # damaged or unreadable shards: moved aside
    stale: list[Path] = field(default_factory=list)  # retired shards, old tables, temporary files: deleted

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None


def _scan(folder: Path) -> _State:
    """Read a store folder: the index and table, the listed shards' checks, and the unlisted shards' headers.

    Nothing is changed: damaged shards and stale files are only recorded (``bad_files``, ``stale``), for
    :func:`_tidy` to handle under the writer's lock.
    """
    state = _State()
    if not folder.is_dir():
        return state
    names = {p.name for p in folder.iterdir()}
    index = _read_index(folder)
    if index is not None:
        table_path = folder / index["table"]["file"]
        try:
            if table_path.stat().st_size != index["table"]["bytes"]:
                raise _table.TableError(f"{table_path.name} has {table_path.stat().st_size} bytes, the index "
                                        f"recorded {index['table']['bytes']}")  # fmt: skip
            if _table.sha256_file(table_path) != index["table"]["sha256"]:
                raise _table.TableError(f"{table_path.name} does not match its checksum in the index")
            state.table = _table.Table(table_path)
        except (OSError, _table.TableError) as err:
            logger.warning("ignoring the store's table (%s); the index is rebuilt from the shards", err)
            index = None
    if index is not None:
        state.index = index
        state.settings = {k: index["metadata"].get(k) for k in _COMPATIBLE}
        state.shards = index["shards"]
        assert state.table is not None
        bad = np.zeros(len(state.shards), dtype=bool)
        for i, record in enumerate(state.shards):
            problem = _shard_problem(folder, record)
            if problem is not None:
                bad[i] = True
                state.damaged += 1
                state.bad_files.append((folder / record["file"], problem))
        state.keep = ~bad[state.table.column("shard")] if len(bad) else np.ones(state.table.count, dtype=bool)
        state.stale += [folder / n for n in index.get("retired", []) if n in names and _SHARD_RE.match(n)]
        names -= {p.name for p in state.stale}
    table_name = state.index["table"]["file"] if state.index is not None else None
    state.stale += [folder / n for n in sorted(names) if (_TABLE_RE.match(n) and n != table_name) or _is_temporary(n)]
    listed = {s["file"] for s in state.shards}
    orphans = []
    for name in sorted(n for n in names if _SHARD_RE.match(n) and n not in listed):
        try:
            orphans.append(_read_shard(folder / name))
        except (OSError, ValueError) as err:
            state.bad_files.append((folder / name, str(err)))
    for shard in sorted(orphans, key=lambda s: (s.created, s.name)):
        settings = _normalise(shard.settings)
        if state.settings is None:
            state.settings = {k: settings.get(k) for k in _COMPATIBLE}
        elif problems := _mismatch(state.settings, settings):
            state.close()
            raise StoreMismatchError(folder, [f"{shard.name}: {p}" for p in problems],
                                     "pass overwrite=True to encode everything again")  # fmt: skip
        state.orphans.append(shard)
    return state


def _tidy(state: _State, writable: bool) -> None:
    """Move damaged shards aside (warning once, naming where they went) and delete stale files."""
    for path, reason in state.bad_files:
        if not path.exists():
            logger.warning("latent shard %s is missing; its latents are encoded again", path)
        elif writable:
            _move_aside(path, reason)
        else:
            logger.warning("latent shard %s is damaged (%s); its latents are not served", path, reason)
    state.bad_files = []
    if writable:
        for path in state.stale:
            path.unlink(missing_ok=True)
    state.stale = []


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings of a shard written by format version 1 (no ``reader``: it was always the exact one)."""
    if "reader" not in settings:
        return {**settings, "reader": "exact"}
    return settings


def _mismatch(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """The settings of ``requested`` (those it has) that differ from ``stored``, one line each."""
    return [
        f"{k}: stored {stored.get(k)!r}, requested {requested[k]!r}"
        for k in _COMPATIBLE
        if k in requested and stored.get(k) != requested[k]
    ]


def check_store(output: str | os.PathLike[str], **settings: Any) -> dict[str, Any] | None:
    """Check that the store at ``output`` (if any) was made with ``settings``; return its settings.

    Only the settings given are compared (any of ``model``, ``size``, ``dtype``, ``vae_dtype``, ``sample``,
    ``seed``, ``reader``, ``scaling_factor``, ``shift_factor``, ``latent_channels``; dtypes as names like
    ``"float32"``), so a command can refuse a folder of another model before loading one. Nothing is written.

    Returns:
        The store's settings, or ``None`` when ``output`` holds no store yet.

    Raises:
        StoreMismatchError: the store was made with other settings.
        NotADirectoryError: ``output`` is a file.
    """
    folder = Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output {folder} is a file; pass a folder for the latent store")
    unknown = set(settings) - set(_COMPATIBLE)
    if unknown:
        raise TypeError(f"check_store() got unknown settings {sorted(unknown)}; known: {', '.join(_COMPATIBLE)}")
    state = _scan(folder)
    state.close()
    if state.settings is None:
        return None
    problems = _mismatch(state.settings, settings)
    if problems:
        raise StoreMismatchError(folder, problems)
    return state.settings


def _remove_store_files(folder: Path) -> int:
    """Delete this library's files in ``folder`` (shards, tables, temporary files, index); nothing else."""
    removed = 0
    for path in folder.iterdir():
        name = path.name
        ours = _SHARD_RE.match(name) or _TABLE_RE.match(name) or name == INDEX_NAME or _is_temporary(name)
        if ours and path.is_file():
            path.unlink()
            removed += 1
    return removed


# --- planning and committing -------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a run has to do, computed by rank 0 from the source and the store (sent to every rank)."""

    root: Path
    todo: list[str]  # keys to encode, sorted
    total: int  # images found, including names that cannot be keys
    skipped: int  # images stored and unchanged
    failures: dict[str, str]  # names that cannot be keys (not valid UTF-8)
    removed: int
    stored_settings: dict[str, Any] | None
    up_to_date: bool  # nothing to encode and the index would not change: nothing is written


@dataclass
class _Merge:
    """Rank 0's view of the store between planning and committing (never sent to other ranks)."""

    state: _State
    keep: np.ndarray  # table rows kept as they are
    orphans: dict[str, _Record]  # latest valid record per key from unlisted shards


def _plan(state: _State, src: _Source, keep_missing: bool) -> tuple[_Plan, _Merge]:
    """Which images to encode: merge the sorted source keys with the sorted table, compare sizes and mtimes.

    O(N) simple steps and no per-key dict of the store: the table's keys are compared as bytes in one pass.
    """
    table = state.table
    n = table.count if table is not None else 0
    keep = state.keep.copy() if state.keep is not None else np.ones(0, dtype=bool)
    if table is not None and table.same_keys(src.keys):  # the usual rerun: one comparison of two blobs
        row_of = np.arange(n, dtype=np.int64)
    elif table is not None:
        row_of = _match(table.iter_key_bytes(), (k.encode("utf-8") for k in src.keys), len(src.keys))
    else:
        row_of = np.full(len(src.keys), -1, dtype=np.int64)
    in_source = np.zeros(n, dtype=bool)
    in_source[row_of[row_of >= 0]] = True
    sizes = np.fromiter((s[0] for s in src.stats), dtype=np.int64, count=len(src.stats))
    mtimes = np.fromiter((s[1] for s in src.stats), dtype=np.int64, count=len(src.stats))
    stored = row_of >= 0
    rows = row_of[stored]
    ok = np.zeros(len(src.keys), dtype=bool)
    if table is not None and len(rows):
        ok[stored] = (
            keep[rows]
            & (table.column("source_bytes")[rows] == sizes[stored])
            & (table.column("source_mtime_ns")[rows] == mtimes[stored])
            & (sizes[stored] >= 0)
        )
    orphans: dict[str, _Record] = {}
    for shard in state.orphans:  # oldest first: a key encoded again maps to its newest latent
        for record in shard.records:
            orphans[record.key] = record
    removed_keys: set[str] = set()
    drop_missing = src.is_folder and not keep_missing
    for okey in list(orphans):
        record = orphans[okey]
        j = _find(src.keys, okey)
        row = int(row_of[j]) if j >= 0 else (table.find(okey) if table is not None else -1)
        if row >= 0:
            keep[row] = False  # the orphan is newer than the table's row
        if j >= 0:
            ok[j] = record.stat == src.stats[j] and record.stat[0] >= 0
            if not ok[j]:
                del orphans[okey]
        elif drop_missing:
            removed_keys.add(okey)
            del orphans[okey]
    todo_idx = np.flatnonzero(~ok)
    todo_rows = row_of[todo_idx]
    keep[todo_rows[todo_rows >= 0]] = False  # encoded again (or failing now): the old latent goes
    removed = len(removed_keys)
    if drop_missing and n:
        gone = ~in_source & state.keep if state.keep is not None else ~in_source
        removed += int(np.count_nonzero(gone & keep))
        keep &= in_source
    todo = [src.keys[j] for j in todo_idx]
    old_failures = state.index.get("failures", {}) if state.index is not None else None
    up_to_date = not todo and not state.orphans and not state.damaged and not removed and old_failures == dict(src.bad)
    plan = _Plan(
        src.root,
        todo,
        len(src.keys) + len(src.bad),
        len(src.keys) - len(todo),
        dict(src.bad),
        removed,
        state.settings,
        up_to_date,
    )
    return plan, _Merge(state, keep, orphans)


def _match(table_keys: Iterator[bytes], keys: Iterator[bytes], count: int) -> np.ndarray:
    """For each of ``count`` sorted ``keys``, its row in the sorted ``table_keys``, or -1 (one merging pass)."""
    import array

    rows = array.array("q")
    cursor = iter(table_keys)
    current = next(cursor, None)
    i = 0
    for key in keys:
        while current is not None and current < key:
            current = next(cursor, None)
            i += 1
        if current is not None and current == key:
            rows.append(i)
            current = next(cursor, None)
            i += 1
        else:
            rows.append(-1)
    assert len(rows) == count
    return np.frombuffer(rows, dtype=np.int64) if count else np.zeros(0, dtype=np.int64)


def _find(sorted_keys: list[str], key: str) -> int:
    import bisect

    j = bisect.bisect_left(sorted_keys, key)
    return j if j < len(sorted_keys) and sorted_keys[j] == key else -1


def _commit(
    folder: Path, merge: _Merge, new_shards: Sequence[str], settings: dict[str, Any], failures: dict[str, str],
    source: Path,
) -> None:  # fmt: skip
    """Write the table and the index for the store's new state, then delete what they supersede (rank 0).

    Order (every crash leaves a readable store): the new table under a new name, fsynced; the index, replaced
    atomically (the commit point; it lists the superseded shards as ``retired``); then the old table and the
    retired shards are deleted. The kept rows of the old table are merged with the records of the unlisted
    and new shards; both sides are sorted, so the work beyond copying arrays is O(new entries).
    """

    state = merge.state
    records = dict(merge.orphans)
    for shard in sorted((_read_shard(folder / name) for name in new_shards), key=lambda s: (s.created, s.name)):
        for record in shard.records:
            records[record.key] = record
    table = state.table
    keep_rows = np.flatnonzero(merge.keep) if table is not None else np.zeros(0, dtype=np.int64)
    new_items = sorted((key.encode("utf-8"), record) for key, record in records.items())
    new_keys = [k for k, _ in new_items]
    inserts = _insertion_points(table, keep_rows, new_keys)
    pos_new = inserts + np.arange(len(new_keys))
    pos_old = np.arange(len(keep_rows)) + np.searchsorted(inserts, np.arange(len(keep_rows)), side="right")
    total = len(keep_rows) + len(new_keys)

    # shards: the listed ones that keep a row, then the new ones (oldest first); the rest is retired
    old_ids = state.table.column("shard")[keep_rows] if state.table is not None else np.zeros(0, dtype=np.int32)
    used_old = np.unique(old_ids)
    shard_records: list[dict[str, Any]] = [dict(state.shards[i]) for i in used_old]
    remap = np.full(max(len(state.shards), 1), -1, dtype=np.int32)
    remap[used_old] = np.arange(len(used_old), dtype=np.int32)
    created = {r.shard: r.created for r in records.values()}
    new_names = sorted(created, key=lambda name: (created[name], name))
    new_id = {name: len(shard_records) + i for i, name in enumerate(new_names)}
    for name in new_names:
        info = _read_shard_info(folder / name)
        shard_records.append({"file": name, **info})
    kept_names = {s["file"] for s in shard_records}
    retired = sorted(
        ({s["file"] for s in state.shards} | {s.name for s in state.orphans} | set(new_shards)) - kept_names
    )

    columns: dict[str, np.ndarray] = {}
    for name, (dtype, width) in _table.COLUMNS.items():
        shape = (total, width) if width > 1 else (total,)
        column = np.empty(shape, dtype=dtype)
        if table is not None and len(keep_rows):
            values = table.column(name)[keep_rows]
            column[pos_old] = remap[values] if name == "shard" else values
        if len(new_keys):
            column[pos_new] = np.array([_record_value(r, name, new_id) for _, r in new_items], dtype=dtype)
        columns[name] = column
    offsets, blob = _merged_keys(table, keep_rows, pos_old, new_keys, pos_new)

    table_name = f"latents-table-{uuid.uuid4().hex[:12]}.bin"
    merged = _table.Rows(offsets, blob, columns)
    table_bytes, table_sha = _atomic_write(folder / table_name, lambda f: _table.write_table(f, merged))
    index = {
        "metadata": {
            **settings,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "count": total,
            "total_size": sum(s["bytes"] for s in shard_records),
            "source": str(source),
            "updated": _now(),
        },
        "shards": shard_records,
        "table": {"file": table_name, "bytes": table_bytes, "sha256": table_sha},
        "failures": dict(sorted(failures.items())),
        "retired": retired,
    }
    _atomic_write(folder / INDEX_NAME, json.dumps(index, indent=1, ensure_ascii=False).encode("utf-8"))
    for name in retired:
        (folder / name).unlink(missing_ok=True)
        logger.info("removed %s: all its latents were superseded", name)
    for path in folder.iterdir():
        if _TABLE_RE.match(path.name) and path.name != table_name:
            path.unlink(missing_ok=True)


def _insertion_points(table: _table.Table | None, keep_rows: np.ndarray, new_keys: list[bytes]) -> np.ndarray:
    """For each sorted new key, how many kept table keys sort before it (binary searches, or one merge)."""
    import bisect

    if table is None or not len(keep_rows) or not new_keys:
        return np.zeros(len(new_keys), dtype=np.int64)

    found = table

    class Kept(Sequence[bytes]):
        def __len__(self) -> int:
            return len(keep_rows)

        def __getitem__(self, i: Any) -> Any:
            return found.key_bytes(int(keep_rows[i]))

    if len(new_keys) * 32 < len(keep_rows):  # few new keys: K log N key reads
        kept = Kept()
        points = [bisect.bisect_left(kept, key) for key in new_keys]
    else:  # many: one pass over the kept keys
        keep = np.zeros(table.count, dtype=bool)
        keep[keep_rows] = True
        points, before = [], 0
        kept_keys = (k for k, kept_row in zip(table.iter_key_bytes(), keep, strict=True) if kept_row)
        current = next(kept_keys, None)
        for key in new_keys:
            while current is not None and current < key:
                before += 1
                current = next(kept_keys, None)
            points.append(before)
    return np.array(points, dtype=np.int64)


def _merged_keys(
    table: _table.Table | None, keep_rows: np.ndarray, pos_old: np.ndarray, new_keys: list[bytes], pos_new: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The merged key blob and offsets: runs of kept table keys are copied as slices, new keys one by one."""
    total = len(keep_rows) + len(new_keys)
    lengths = np.empty(total, dtype=np.int64)
    old_offsets = table.key_offsets if table is not None else np.zeros(1, dtype=np.int64)
    if len(keep_rows):
        lengths[pos_old] = old_offsets[keep_rows + 1] - old_offsets[keep_rows]
    lengths[pos_new] = np.fromiter((len(k) + 1 for k in new_keys), dtype=np.int64, count=len(new_keys))
    offsets = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.zeros(int(offsets[-1]), dtype=np.uint8)
    if len(keep_rows):
        assert table is not None
        breaks = np.flatnonzero((np.diff(keep_rows) != 1) | (np.diff(pos_old) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(keep_rows)]])
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            a, b = int(old_offsets[keep_rows[s]]), int(old_offsets[keep_rows[e - 1] + 1])
            dst = int(offsets[pos_old[s]])
            blob[dst : dst + b - a] = table.key_blob[a:b]
    for key, p in zip(new_keys, pos_new.tolist(), strict=True):
        start = int(offsets[p])
        blob[start : start + len(key)] = np.frombuffer(key, dtype=np.uint8)  # the NUL after it is already 0
    return offsets, blob


def _read_shard_info(path: Path) -> dict[str, Any]:
    header_json, size = _read_header(path)
    return {"bytes": size, "header_bytes": len(header_json), "header_crc32": zlib.crc32(header_json)}


def _record_value(record: _Record, name: str, shard_id: Mapping[str, int]) -> Any:
    if name == "shard":
        return shard_id[record.shard]
    if name == "source_bytes":
        return record.stat[0]
    if name == "source_mtime_ns":
        return record.stat[1]
    return getattr(record, name)


# --- the pipeline ---------------------------------------------------------------------------------


class _ShardWriter:
    """Collects latents and writes them as shards of at most ``max_bytes``, or every ``every`` seconds."""

    def __init__(
        self, folder: Path, run: str, rank: int, settings: dict[str, Any], max_bytes: int, every: float
    ) -> None:
        self.folder, self.run, self.rank = folder, run, rank
        self.settings_json = json.dumps(settings, sort_keys=True)
        self.max_bytes, self.every = max_bytes, every
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.nbytes = 0
        self.written: list[str] = []
        self.since = time.monotonic()

    def add(self, key: str, latent: torch.Tensor, entry: dict[str, Any]) -> None:
        self.tensors[key] = latent
        self.entries[key] = entry
        self.nbytes += latent.numel() * latent.element_size()
        if self.nbytes >= self.max_bytes or time.monotonic() - self.since >= self.every:
            self.flush()

    def flush(self) -> None:
        self.since = time.monotonic()
        if not self.tensors:
            return
        from safetensors.torch import save

        name = f"latents-{self.run}-r{self.rank:03d}-{len(self.written):05d}.safetensors"
        metadata = {
            "format": FORMAT,
            "settings": self.settings_json,
            "created": str(time.time_ns()),
            "entries": json.dumps(self.entries, sort_keys=True),
        }
        _atomic_write(self.folder / name, save(self.tensors, metadata=metadata))
        logger.debug("wrote %s (%d latents, %d bytes)", name, len(self.tensors), self.nbytes)
        self.written.append(name)
        self.tensors, self.entries, self.nbytes = {}, {}, 0


@dataclass
class _Item:
    key: str
    stat: tuple[int, int]
    image: torch.Tensor


def iter_images(
    items: Sequence[tuple[str, str | os.PathLike[str]]],
    size: int | None = None,
    *,
    exact_resize: bool = False,
    workers: int | None = None,
    window: int | None = None,
) -> Iterator[tuple[str, tuple[int, int] | None, torch.Tensor | Exception]]:
    """Read images on threads, at most ``window`` ahead, and yield them in input order.

    Each image is read by :func:`vae_toolkit.load_for_encoding` ``(path, size, exact=exact_resize)``, the
    reader of ``encode`` (and ``evaluate``). A file that cannot be read is yielded as its exception, so that
    one bad file never stops the caller.

    Args:
        items: ``(key, path)`` pairs.
        size: As in :func:`encode_dataset`.
        exact_resize: Resize from the full-resolution decode (``pil_to_tensor``'s values) instead of JPEG DCT scaling.
        workers: Decoding threads (default :func:`default_workers`).
        window: Images decoded ahead (default ``2 * workers``).

    Yields:
        ``(key, (file size, mtime in ns), [3, H, W] tensor)``, or ``(key, None, exception)``.
    """
    workers = workers if workers is not None else default_workers()
    window = window if window is not None else 2 * workers

    def work(path: str | os.PathLike[str]) -> tuple[tuple[int, int], torch.Tensor]:
        stat = _stat(Path(path))
        return stat, load_for_encoding(path, size, exact=exact_resize)

    pending: deque[tuple[str, Future[tuple[tuple[int, int], torch.Tensor]]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vae_toolkit_read") as pool:
        it = iter(items)
        try:
            for key, path in it:
                pending.append((key, pool.submit(work, path)))
                if len(pending) >= window:
                    break
            while pending:
                key, future = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.submit(work, nxt[1])))
                try:
                    stat, image = future.result()
                except Exception as err:  # a bad file: reported, never stops the run
                    yield key, None, err
                else:
                    yield key, stat, image
        finally:
            for _, future in pending:
                future.cancel()


class _Encoder:
    """Encodes batches of equal-size images; halves the batch on out-of-memory, down to one image."""

    def __init__(self, vae: Any, sample: bool, seed: int, store_dtype: torch.dtype) -> None:
        self.vae, self.sample, self.seed, self.store_dtype = vae, sample, seed, store_dtype
        self.limits: dict[tuple[int, ...], int] = {}  # image shape -> batch size that fitted after an OOM

    def __call__(
        self, items: list[_Item], x: torch.Tensor | None = None
    ) -> tuple[list[tuple[_Item, torch.Tensor]], dict[str, str]]:
        """Encode ``items`` (``x``: their images already stacked, as :func:`_assembled` gives them)."""
        shape = tuple(items[0].image.shape)
        done: list[tuple[_Item, torch.Tensor]] = []
        failed: dict[str, str] = {}
        start = 0
        while start < len(items):
            n = min(self.limits.get(shape, len(items)), len(items) - start)
            chunk = items[start : start + n]
            try:
                z = self._encode(chunk, None if x is None else x[start : start + n])
            except _OOM_ERRORS as err:
                _free_cached_memory()
                if n == 1:
                    failed[chunk[0].key] = (
                        f"out of memory encoding one {shape[2]}x{shape[1]} image: {' '.join(str(err).split())[:200]}; "
                        "use a smaller size (--size), free GPU memory, or a float16 VAE"
                    )
                    logger.warning("out of memory encoding %s alone; skipped", chunk[0].key)
                    start += 1
                    continue
                self.limits[shape] = max(1, n // 2)
                logger.warning(
                    "out of memory encoding a batch of %d images of %dx%d; retrying with batches of %d",
                    n, shape[2], shape[1], self.limits[shape],
                )  # fmt: skip
                continue
            done += list(zip(chunk, z, strict=True))
            start += n
        return done, failed

    def _encode(self, chunk: list[_Item], x: torch.Tensor | None = None) -> list[torch.Tensor]:
        if x is None:
            x = torch.stack([item.image for item in chunk])
        generator = [sample_generator(self.seed, item.key) for item in chunk] if self.sample else None
        with torch.inference_mode():
            z = latents.encode(self.vae, x, sample=self.sample, generator=generator)
        z = z.to(device="cpu", dtype=self.store_dtype).contiguous()
        return [t.clone() for t in z]  # own storage: safetensors refuses tensors that share memory


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _vae_dtype(vae: Any) -> torch.dtype:
    dtype = getattr(vae, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(vae.parameters()).dtype


def _vae_device(vae: Any) -> torch.device:
    device = getattr(vae, "device", None)
    return device if isinstance(device, torch.device) else next(vae.parameters()).device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _settings(
    vae: Any, model: str | None, size: int | None, dtype: torch.dtype, sample: bool, seed: int, reader: str = "exact"
) -> dict[str, Any]:
    """What a reader must know about the latents, and what must match for a store to be resumed."""
    config = getattr(vae, "config", None)
    scale, shift = latents.scaling_factors(vae)
    name = model if model is not None else (getattr(config, "_name_or_path", None) or type(vae).__name__)
    registered = get_all_model_configs().get(name, {})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vae_toolkit_version": __version__,
        "model": name,
        "repo_id": registered.get("repo_id"),
        "subfolder": registered.get("subfolder"),
        "scaling_factor": scale,
        "shift_factor": shift,
        "latent_channels": getattr(config, "latent_channels", None),
        "dtype": _dtype_name(dtype),
        "vae_dtype": _dtype_name(_vae_dtype(vae)),
        "size": size,
        "sample": bool(sample),
        "seed": int(seed) if sample else None,
        "reader": reader,
    }


@contextmanager
def _sigterm_flushes() -> Iterator[None]:
    """SIGTERM (SLURM preemption, torchrun teardown) ends the run as Ctrl-C does: shards flushed, exit 143."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signal.SIGTERM)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def encode_dataset(
    vae: AutoencoderKL | Callable[[], AutoencoderKL],
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    model: str | None = None,
    size: int | None = None,
    batch_size: int = 8,
    sample: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    workers: int | None = None,
    max_shard_size: int = 256 * 2**20,
    overwrite: bool = False,
    progress: bool = True,
    exact_resize: bool = False,
    checkpoint_every: float = 60.0,
    keep_missing: bool = False,
    device: str | torch.device | None = None,
) -> EncodeSummary:
    """Encode every image of a folder (recursively) or a list of files into a latent store at ``output``.

    The latents are stored scaled, exactly as :func:`vae_toolkit.latents.encode` returns them for
    ``load_for_encoding(path, size, exact=exact_resize)`` alone. Running the same call again resumes: images
    already stored (and unchanged on disk) are skipped, and the model is not even loaded when there is
    nothing to encode (pass a loader function as ``vae``). Under torchrun (``WORLD_SIZE > 1``) call it on every
    rank with the same arguments and the VAE on the rank's own device; the ranks split the images and rank 0
    writes the index.

    Args:
        vae: A loaded ``AutoencoderKL`` (any device and dtype), or a function without arguments that loads
            it (called only when there is work; then ``model`` is required).
        source: A folder of images (searched recursively) or a list of image files; keys are paths
            relative to the folder (for a list, to the files' common folder).
        output: The store folder (created if needed).
        model: The model's name, recorded in the store (default: ``vae.config._name_or_path``).
        size: Resize the shorter side to ``size`` and center-crop ``size x size`` (as ``pil_to_tensor``);
            ``None`` keeps each image's size, center-cropped to a multiple of 8.
        batch_size: Images per ``encode`` call; only images of equal size share a batch.
        sample: Store a sample of the latent distribution instead of its mean.
        seed: With ``sample=True``, each image's noise comes from :func:`sample_generator` ``(seed, key)``.
        dtype: Dtype of the stored latents (float32 default; float16/bfloat16 halve the store; float64).
        workers: Image decoding threads (default :func:`default_workers`: the cores this process may use,
            divided among the ranks of the machine).
        max_shard_size: Bytes of latents per shard file.
        overwrite: Replace a store made with other settings (model, size, dtype, reader, sampling) instead
            of refusing it. A store made with the same settings is resumed either way.
        progress: Show a tqdm progress bar (images/s); on rank 0 only.
        exact_resize: With ``size``, resize from the full-resolution decode (exactly ``pil_to_tensor``);
            by default a large JPEG is decoded at a reduced DCT scale first (see :func:`load_for_encoding`).
            The store records the reader, and refuses the other one.
        checkpoint_every: Write the open shard at least every this many seconds, so that a kill loses at
            most this much work (plus the batch being encoded).
        keep_missing: Keep the entries of images no longer in ``source`` (a folder); by default a run
            removes them. Entries not in a list of files are always kept.
        device: With a loader function as ``vae``: the device it loads on (chooses the process group's
            backend under torchrun).

    Returns:
        An :class:`EncodeSummary` with counts, failures and time (over all ranks).

    Raises:
        StoreMismatchError: (a ``ValueError``) ``output`` holds latents made with other settings.
        StoreLockedError: another run is writing ``output``.
        FileNotFoundError: ``source`` does not exist.
        NotADirectoryError: ``output`` is a file.
        OSError: ``output`` cannot be written (the message names the path), checked before the model loads.
        ValueError / TypeError: bad arguments, or no images found.

    Example:
        >>> vae, device = VAELoader().load_sd_vae("sd15")  # doctest: +SKIP
        >>> summary = encode_dataset(vae, "photos/", "photos-latents/", model="sd15", size=512)
        >>> store = LatentStore("photos-latents/")
        >>> store["holiday/beach.jpg"].shape
        torch.Size([4, 64, 64])
    """
    start = time.perf_counter()
    check_int("batch_size", batch_size, 1)
    check_int("size", size, MULTIPLE, allow_none=True)
    if size is not None and size % MULTIPLE:
        raise ValueError(f"size must be a multiple of {MULTIPLE}, got {size}")
    check_int("workers", workers, 1, allow_none=True)
    check_int("max_shard_size", max_shard_size, 1)
    check_int("seed", seed, 0)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float)):
        raise TypeError(f"checkpoint_every must be a number of seconds, got {checkpoint_every!r}")
    if not checkpoint_every > 0 or checkpoint_every == float("inf"):
        raise ValueError(f"checkpoint_every must be a finite number of seconds > 0, got {checkpoint_every}")
    if dtype not in _STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(_dtype_name, _STORE_DTYPES))}, got {dtype!r}")
    loaded = isinstance(vae, torch.nn.Module)
    if not loaded and not callable(vae):
        raise TypeError(f"vae must be an AutoencoderKL or a function that loads one, got {type(vae).__name__}")
    if not loaded and model is None:
        raise ValueError("model is required when vae is a loader function (it is recorded in the store)")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} is a file; pass a folder for the latent store")
    reader = "exact" if exact_resize or size is None else "fast"
    settings = _settings(vae, model, size, dtype, sample, seed, reader) if loaded else None
    known = {
        "model": model if model is not None else settings and settings["model"],
        "dtype": _dtype_name(dtype),
        "size": size,
        "sample": bool(sample),
        "seed": int(seed) if sample else None,
        "reader": reader,
    }
    workers = workers if workers is not None else default_workers()
    vae_device = _vae_device(vae) if loaded else torch.device(device if device is not None else "cpu")

    dist = ProcessGroup.from_env(vae_device)
    lock: _WriterLock | None = None
    merge: _Merge | None = None
    try:
        prepared: _Plan | BaseException
        if dist.rank == 0:
            try:
                lock, plan, merge = _prepare(out, source, known, overwrite, keep_missing)
                prepared = plan
            except Exception as err:
                prepared = err
        else:
            prepared = RuntimeError("unset")
        prepared = dist.broadcast(prepared)
        if isinstance(prepared, BaseException):
            raise prepared
        plan = prepared
        summary = EncodeSummary(output=out, total=plan.total, skipped=plan.skipped, removed=plan.removed,
                                rank=dist.rank)  # fmt: skip
        if plan.up_to_date:
            summary.failed = dict(sorted(plan.failures.items()))
            summary.seconds = time.perf_counter() - start
            logger.info("nothing to encode: all %d images are stored in %s", plan.total, out)
            return summary
        if plan.todo and not loaded:
            vae = vae()
            loaded = True
            summary.loaded_model = True
        if loaded:
            settings = _settings(vae, model, size, dtype, sample, seed, reader)
        else:  # nothing to encode, only the index to update: the stored settings stand
            settings = _stored_settings(merge) if dist.rank == 0 else {}
        if plan.stored_settings is not None and loaded:
            problems = _mismatch(plan.stored_settings, settings)
            if problems and not overwrite:
                raise StoreMismatchError(out, problems)
            if problems:  # differs in what only the loaded model tells (its dtype or factors): replan from empty
                if dist.rank == 0:
                    assert merge is not None
                    merge.state.close()
                    logger.info("overwrite: removed %d file(s) of the previous store in %s",
                                _remove_store_files(out), out)  # fmt: skip
                    plan, merge = _plan(_State(), _scan_source(source), keep_missing)
                plan = dist.broadcast(plan)
                summary.skipped, summary.removed = plan.skipped, 0
        todo = plan.todo
        mine = todo[dist.rank :: dist.world_size]
        _share_cores(workers)
        logger.info(
            "encoding %d of %d images (%d already stored) into %s%s",
            len(todo), plan.total, plan.skipped, out,
            f"; rank {dist.rank} of {dist.world_size} takes {len(mine)}" if dist.world_size > 1 else "",
        )  # fmt: skip
        writer = _ShardWriter(out, uuid.uuid4().hex[:12], dist.rank, settings, max_shard_size, checkpoint_every)
        encoded, failed = 0, dict[str, str]()
        if mine:
            encoder = _Encoder(vae, sample, seed, dtype)
            desc = "encode" if dist.world_size == 1 else f"encode (rank 0's share: {len(mine)} of {len(todo)})"
            items = [(key, plan.root / key) for key in mine]
            with _sigterm_flushes():
                try:
                    encoded, failed = _pipeline(items, size, exact_resize, batch_size, workers, encoder, writer,
                                                progress and dist.rank == 0, desc)  # fmt: skip
                finally:  # also on Ctrl-C, SIGTERM or an error: keep what was encoded, the next run resumes from it
                    writer.flush()
        dist.barrier()  # all shards are on disk
        results = dist.gather((encoded, failed, writer.written))
        failures = {k: v for _, f, _ in results for k, v in f.items()}
        failures.update(plan.failures)
        if dist.rank == 0:
            assert merge is not None
            _commit(out, merge, [name for r in results for name in r[2]], settings, failures, plan.root)
        dist.barrier()  # the index exists when encode_dataset returns on any rank
        summary.encoded = sum(r[0] for r in results)
        summary.failed = dict(sorted(failures.items()))
        summary.shards = sum(len(r[2]) for r in results)
        summary.seconds = time.perf_counter() - start
        return summary
    finally:
        if merge is not None:
            merge.state.close()
        if lock is not None:
            lock.release()
        dist.close()


def _prepare(
    out: Path,
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    known: dict[str, Any],
    overwrite: bool,
    keep_missing: bool,
) -> tuple[_WriterLock | None, _Plan, _Merge]:
    """Rank 0, before any model loads: lock the store, walk the source once, read the store, plan the work.

    A store with nothing to do is left exactly as it was (nothing is written), so a rerun works on read-only
    media too.
    """
    src = _scan_source(source)
    lock: _WriterLock | None = None
    if out.is_dir() or _can_create(out):
        lock = _WriterLock(out).acquire()
    try:
        writable = lock is not None and lock.writable
        state = _scan(out)
        problems = _mismatch(state.settings, known) if state.settings is not None else []
        if problems and not overwrite:
            state.close()
            raise StoreMismatchError(out, problems)
        if problems:
            state.close()
            if not writable:
                raise PermissionError(errno.EACCES, f"cannot write to {out} (read-only) to replace the store")
            logger.info("overwrite: removed %d file(s) of the previous store in %s", _remove_store_files(out), out)
            state = _State()
        plan, merge = _plan(state, src, keep_missing)
        if plan.up_to_date:
            _tidy(state, writable)
            return lock, plan, merge
        if not writable:
            state.close()
            raise PermissionError(
                errno.EACCES,
                f"cannot write to {out}: it is read-only or not writable, and {len(plan.todo)} image(s) need "
                "encoding; choose a writable output folder",
            )
        assert lock is not None
        lock.claim()
        _probe_writable(out)
        _tidy(state, writable)
        return lock, plan, merge
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _can_create(out: Path) -> bool:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return False
        raise _write_error(out, err) from err
    return True


def _stored_settings(merge: _Merge | None) -> dict[str, Any]:
    assert merge is not None
    state = merge.state
    if state.index is not None:
        meta = state.index["metadata"]
        return {k: v for k, v in meta.items() if k not in ("count", "total_size", "source", "updated")}
    if state.orphans:
        return _normalise(state.orphans[-1].settings)
    return {}


def iter_batches(
    items: Sequence[tuple[str, str | os.PathLike[str]]],
    size: int | None,
    batch_size: int,
    *,
    exact_resize: bool = False,
    workers: int | None = None,
) -> Iterator[list[tuple[str, tuple[int, int], torch.Tensor]] | tuple[str, Exception]]:
    """Batches of images of equal size, read ahead on threads by :func:`iter_images`: what ``encode`` and
    ``evaluate`` run through a model.

    Yields a batch ``[(key, (file size, mtime), tensor), ...]`` (at most ``batch_size``, one shape), or
    ``(key, exception)`` for a file that could not be read. Images wait for a full batch of their size;
    when ``4 * batch_size`` wait over all sizes, the fullest partial batch goes, so memory stays bounded.
    """
    workers = workers if workers is not None else default_workers()
    buckets: dict[tuple[int, ...], list[tuple[str, tuple[int, int], torch.Tensor]]] = {}
    held = 0
    max_held = 4 * batch_size
    window = max(2 * batch_size, 2 * workers)
    for key, stat, result in iter_images(items, size, exact_resize=exact_resize, workers=workers, window=window):
        if isinstance(result, Exception):
            yield key, result
            continue
        assert stat is not None
        shape = tuple(result.shape)
        bucket = buckets.setdefault(shape, [])
        bucket.append((key, stat, result))
        held += 1
        if len(bucket) >= batch_size:
            held -= len(bucket)
            yield buckets.pop(shape)
        elif held >= max_held:  # many sizes at once: the fullest partial batch
            fullest = max(buckets, key=lambda s: len(buckets[s]))
            held -= len(buckets[fullest])
            yield buckets.pop(fullest)
    for shape in list(buckets):
        yield buckets.pop(shape)


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(images)`` of equal-shape CPU tensors, copied by numpy on the calling thread.

    numpy copies without the GIL and on this thread only: ``torch.stack`` would start an OpenMP team of
    ``torch.get_num_threads()`` threads from a helper thread, beside the decoding threads that keep the cores
    busy. dtypes numpy lacks (bfloat16) are stacked by torch.
    """
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype)
    try:
        dst = out.numpy()
        for i, image in enumerate(images):
            np.copyto(dst[i], image.numpy(), casting="no")
    except (TypeError, RuntimeError):  # a dtype numpy does not have
        torch.stack(list(images), out=out)
    return out


class _Raised:
    def __init__(self, err: BaseException) -> None:
        self.err = err


_END = object()


def _assembled(
    batches: Iterator[list[tuple[str, tuple[int, int], torch.Tensor]] | tuple[str, Exception]],
) -> Generator[tuple[list[_Item], torch.Tensor] | tuple[str, Exception], None, None]:
    """``batches`` run on a helper thread that also stacks each batch: the model's thread only encodes.

    Stacking a batch (50 MB for 16 images of 512²) on the model's thread left a GPU idle for as long as it
    took beside busy decoding threads (``benchmarks/gpu_feed.py``). The helper stays one batch ahead (a
    queue of one), so at most two more batches are held than without it. Each item's image becomes a view
    into the stacked tensor, so the batch's memory is held once. Errors in the helper are raised here;
    leaving the loop early (an exception, Ctrl-C, SIGTERM) stops the helper, which closes ``batches``.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if isinstance(batch, tuple):
                    out: Any = batch
                else:
                    x = _stack([image for _, _, image in batch])
                    out = ([_Item(key, stat, x[i]) for i, (key, stat, _) in enumerate(batch)], x)
                del batch
                if not put(out):
                    return
            put(_END)
        except BaseException as err:  # raised again in the consumer's thread
            put(_Raised(err))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # a generator: iter_images cancels what it had submitted

    helper = threading.Thread(target=produce, name="vae_toolkit_batches", daemon=True)
    helper.start()
    try:
        while True:
            try:
                item = ready.get(timeout=0.1)
            except queue.Empty:
                if helper.is_alive() or not ready.empty():
                    continue
                raise RuntimeError("the batch reading thread ended without a result") from None
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.err
            yield item
            del item
    finally:
        stop.set()
        while helper.is_alive():
            try:
                ready.get(timeout=0.05)  # unblock a waiting put
            except queue.Empty:
                pass
        helper.join()


def failure_reason(err: BaseException) -> str:
    """One line for a file that could not be read: the library's message, or the exception's type and text."""
    text = " ".join(str(err).split())
    return text if isinstance(err, ImageProcessingError) else f"{type(err).__name__}: {text}"


def _pipeline(
    items: Sequence[tuple[str, Path]],
    size: int | None,
    exact_resize: bool,
    batch_size: int,
    workers: int,
    encoder: _Encoder,
    writer: _ShardWriter,
    progress: bool,
    desc: str,
) -> tuple[int, dict[str, str]]:
    """Read (threads) -> group by size -> encode (this thread) -> shards; returns (encoded, failures)."""
    from tqdm.auto import tqdm

    failed: dict[str, str] = {}
    encoded = 0
    bar = tqdm(total=len(items), desc=desc, unit="image", disable=not progress, dynamic_ncols=True)
    try:
        batches = iter_batches(items, size, batch_size, exact_resize=exact_resize, workers=workers)
        with closing(_assembled(batches)) as assembled:  # closed at once on an exception: the helper stops
            for batch in assembled:
                if isinstance(batch[0], str):
                    key, err = batch
                    failed[key] = failure_reason(err)
                    logger.warning("skipped %s: %s", key, failed[key])
                    bar.update(1)
                    continue
                chunk, x = batch
                done, errors = encoder(chunk, x)
                for item, z in done:
                    entry = {
                        "size": [int(item.image.shape[-1]), int(item.image.shape[-2])],
                        "source_bytes": item.stat[0],
                        "source_mtime_ns": item.stat[1],
                    }
                    writer.add(item.key, z, entry)
                encoded += len(done)
                failed.update(errors)
                bar.update(len(chunk))
    finally:
        bar.close()
    return encoded, failed


# --- reading --------------------------------------------------------------------------------------


class LatentStore(Mapping[str, torch.Tensor], Dataset):
    """A latent store opened read-only: a mapping ``key -> latent`` and a ``torch.utils.data.Dataset``.

    Opening reads the small index and memory-maps the per-key table: no Python object per key is made, so
    a store of millions of latents opens in milliseconds, and forked DataLoader workers share the table
    instead of copying it. A latent is read from its shard at the recorded byte offset when asked for. As a
    dataset, ``store[i]`` is the latent of the i-th key in sorted order (``store.key(i)`` names it);
    :class:`BucketBatchSampler` batches latents of equal shape. ``store.metadata`` holds the model, its
    scaling and shift factors, dtype and the settings of the run; ``store.entry(key)`` the image size used
    and the source file's size and mtime; ``store.failures`` the images that could not be encoded.

    A store opened before a later encode run keeps serving what it had (shards are never changed, only
    replaced); if a shard it had not read yet was removed meanwhile, reading raises a
    :class:`StoreDamagedError` that says to open the store again.

    Example:
        >>> store = LatentStore("photos-latents")  # doctest: +SKIP
        >>> z = store["holiday/beach.jpg"]                # scaled latents, as latents.encode returns them
        >>> loader = torch.utils.data.DataLoader(store, batch_size=16, shuffle=True)  # with --size
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        index_path = self.path / INDEX_NAME
        rebuild = _REBUILD.format(out=self.path)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if self.path.is_dir() and any(_SHARD_RE.match(p.name) for p in self.path.iterdir()):
                raise FileNotFoundError(
                    f"{self.path} has latent shards but no {INDEX_NAME}: the encode run did not finish; {rebuild} "
                    "to complete the store"
                ) from None
            raise FileNotFoundError(f"no latent store at {self.path}: {INDEX_NAME} not found") from None
        except ValueError as err:
            raise ValueError(f"{index_path} is not valid JSON ({err}); {rebuild}") from err
        meta = index.get("metadata") if isinstance(index, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a vae-toolkit latent index")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path} is a latent store of format version {meta.get('format_version')}; this version reads "
                f"version {FORMAT_VERSION}: {rebuild} to upgrade it (no image is encoded again)"
            )
        problem = _index_problem(index)
        if problem is not None:
            raise ValueError(f"{index_path} is damaged ({problem}); {rebuild}")
        table_path = self.path / index["table"]["file"]
        try:
            size = table_path.stat().st_size
            if size != index["table"]["bytes"]:
                raise _table.TableError(f"{table_path} has {size} bytes, the index recorded {index['table']['bytes']}")
            self._table = _table.Table(table_path)
        except FileNotFoundError:
            raise StoreDamagedError(
                errno.ENOENT, f"{table_path} is missing: the store changed or is damaged; {rebuild}"
            ) from None
        except _table.TableError as err:
            raise StoreDamagedError(errno.EIO, f"{err}; {rebuild}") from err
        self.metadata: dict[str, Any] = meta
        self.failures: dict[str, str] = index.get("failures", {})
        self._shards: list[dict[str, Any]] = index["shards"]
        self._files: dict[int, Any] = {}
        self._lock = threading.Lock()
        if self._table.count != meta.get("count", self._table.count) or (
            self._table.count and int(self._table.column("shard").max()) >= len(self._shards)
        ):
            self._table.close()
            raise StoreDamagedError(errno.EIO, f"{table_path} does not match the index; {rebuild}")

    def __len__(self) -> int:
        return self._table.count

    def __iter__(self) -> Iterator[str]:
        return self._table.iter_keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._table.find(key) >= 0

    def _row(self, key: str | int) -> int:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key)
            n = self._table.count
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for a store of {n} latents")
            return i % n if n else i
        if not isinstance(key, str):
            raise TypeError(f"keys are str (image paths relative to the source) or int indices, got {key!r}")
        row = self._table.find(key)
        if row < 0:
            raise KeyError(f"{key!r} is not in the latent store {self.path} ({len(self)} latents)")
        return row

    def __getitem__(self, key: str | int) -> torch.Tensor:
        """The latent of ``key`` (a str), or of the ``key``-th key in sorted order (an int)."""
        row = self._row(key)
        t = self._table
        shard = int(t.column("shard")[row])
        offset, nbytes = int(t.column("offset")[row]), int(t.column("nbytes")[row])
        buffer = bytearray(nbytes)
        got = self._read(shard, offset, buffer)
        if got != nbytes:
            raise StoreDamagedError(
                errno.EIO,
                f"latent shard {self.path / self._shards[shard]['file']} is truncated or damaged (read {got} of "
                f"{nbytes} bytes at {offset}); {_REBUILD.format(out=self.path)}: it encodes them again",
            )
        dtype = _STORE_DTYPES[int(t.column("dtype")[row])]
        shape = tuple(int(v) for v in t.column("shape")[row])
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def _read(self, shard: int, offset: int, buffer: bytearray) -> int:
        handle = self._files.get(shard)
        if handle is None:
            handle = self._open(shard)
        if isinstance(handle, int):
            return os.preadv(handle, [buffer], offset)
        with self._lock:  # no pread (Windows): one file position, shared
            handle.seek(offset)
            return int(handle.readinto(buffer))

    def _open(self, shard: int) -> Any:
        with self._lock:
            if shard in self._files:
                return self._files[shard]
            record = self._shards[shard]
            path = self.path / record["file"]
            rebuild = _REBUILD.format(out=self.path)
            try:
                handle: Any = os.open(path, os.O_RDONLY) if hasattr(os, "preadv") else open(path, "rb")
            except FileNotFoundError:
                raise StoreDamagedError(
                    errno.ENOENT,
                    f"latent shard {path} is gone: the store changed since it was opened (a later encode run "
                    "replaced it) or was damaged; open it again with LatentStore(...)",
                ) from None
            fd = handle if isinstance(handle, int) else handle.fileno()
            size = os.fstat(fd).st_size
            if size != record["bytes"]:
                _close(handle)
                raise StoreDamagedError(
                    errno.EIO,
                    f"latent shard {path} is damaged ({size} bytes, the index recorded {record['bytes']}); {rebuild}: "
                    "it encodes its latents again",
                )
            self._files[shard] = handle
            return handle

    def key(self, index: int) -> str:
        """The ``index``-th key in sorted order (the key of ``store[index]``)."""
        return self._table.key(self._row(index))

    def entry(self, key: str) -> dict[str, Any]:
        """What the table records for ``key``: ``size`` [w, h] used, ``source_bytes``, ``source_mtime_ns``."""
        if not isinstance(key, str):
            raise TypeError(f"keys are str (image paths relative to the source), got {key!r}")
        row = self._row(key)
        t = self._table
        w, h = (int(v) for v in t.column("size")[row])
        return {
            "size": [w, h],
            "source_bytes": int(t.column("source_bytes")[row]),
            "source_mtime_ns": int(t.column("source_mtime_ns")[row]),
        }

    @property
    def shapes(self) -> np.ndarray:
        """The latents' shapes ``(C, h, w)`` as a read-only ``[len(store), 3]`` int array (memory-mapped)."""
        return self._table.column("shape")

    def close(self) -> None:
        """Close the open shard files (they are opened again when needed)."""
        with self._lock:
            for handle in self._files.values():
                _close(handle)
            self._files.clear()

    def __enter__(self) -> LatentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started with spawn: open the store again
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"LatentStore({str(self.path)!r}, {len(self)} latents, model={m.get('model')!r}, dtype={m.get('dtype')})"
        )


def _close(handle: Any) -> None:
    if isinstance(handle, int):
        os.close(handle)
    else:
        handle.close()


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of store indices whose latents have the same shape, shuffled and seeded (aspect-ratio buckets).

    A store encoded without ``size`` holds latents of several shapes, which ``torch.stack`` cannot batch.
    This sampler groups the indices by shape (from the store's memory-mapped table: no Python object per
    key), shuffles within each group and then the order of the batches, with a generator seeded by
    ``seed + epoch`` (call :meth:`set_epoch` each epoch). Under DDP, pass ``num_replicas`` and ``rank`` to
    give each process every ``num_replicas``-th batch.

    Example:
        >>> store = LatentStore("photos-latents")  # doctest: +SKIP
        >>> sampler = BucketBatchSampler(store, batch_size=16, seed=0)
        >>> loader = torch.utils.data.DataLoader(store, batch_sampler=sampler, num_workers=4)
        >>> for epoch in range(10):
        ...     sampler.set_epoch(epoch)
        ...     for z in loader:  # [B, C, h, w], one shape per batch
        ...         ...
    """

    def __init__(
        self,
        store: LatentStore,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        check_int("num_replicas", num_replicas, 1)
        check_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be < num_replicas ({num_replicas}), got {rank}")
        shapes = np.asarray(store.shapes)
        if len(shapes):
            _, self._group = np.unique(shapes, axis=0, return_inverse=True)
            self._group = self._group.reshape(-1)
        else:
            self._group = np.zeros(0, dtype=np.int64)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw another order: epoch ``e`` uses the seed ``seed + e``."""
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = np.argsort(self._group, kind="stable")
        bounds = np.flatnonzero(np.diff(self._group[order])) + 1
        batches: list[np.ndarray] = []
        for members in np.split(order, bounds) if len(order) else []:
            if self.shuffle:
                members = rng.permutation(members)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches():
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._batches())
