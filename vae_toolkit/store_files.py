"""The store's format on disk: its files, its lock, its index, and what a reader or a rerun finds there.

Constants of the format (file names, version), the errors a store raises, atomic writes (temporary file,
fsync, ``os.replace``), the writer's OS lock, reading shard headers and the index, and :func:`scan_store`,
which finds what a folder holds (listed shards checked by size and header checksum, shards a killed run
left, the table) without reading any latent. Planning and committing a run is
:mod:`vae_toolkit.store_update`'s; reading latents, :mod:`vae_toolkit.store`'s.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import socket
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from . import _table

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

INDEX_NAME = "latents.safetensors.index.json"
LOCK_NAME = "latents.lock"
FORMAT = "vae-toolkit-latents"
FORMAT_VERSION = 2
SHARD_RE = re.compile(r"^latents-[0-9a-f]{12}-r\d{3,}-\d{5,}\.safetensors$")
TABLE_RE = re.compile(r"^latents-table-[0-9a-f]{12}\.bin$")
_TMP_SUFFIX = ".tmp"
_CORRUPT_SUFFIX = ".corrupt"
# settings that change the stored values: a store made with other settings is refused
_COMPATIBLE = ("model", "scaling_factor", "shift_factor", "latent_channels", "dtype", "vae_dtype", "size", "sample",
               "seed", "reader", "weights", "exif_orientation", "buckets", "flip", "distribution", "tile",
               "no_upscale", "min_size", "latent_format")  # fmt: skip
# settings recorded since a later version of format 2: what a store written without them holds. Unknown weights
# (None) are accepted with a warning, unknown tiling (None: tiled when larger than the model's sample_size) is not
# compared; EXIF orientation was not applied then, which is refused like any other setting; the training
# cache's settings (no buckets, flips or distribution) keep such a store readable.
# (every image kept, scaled up to its bucket or size if need be)
TRAINING_DEFAULTS: dict[str, Any] = {"buckets": None, "flip": False, "distribution": False, "no_upscale": False,
                                     "min_size": None}  # fmt: skip
_ADDED_SETTINGS: dict[str, Any] = {
    "weights": None,
    "exif_orientation": "ignored",
    "tile": None,
    "latent_format": None,
    **TRAINING_DEFAULTS,
}
_INDEX_CHECKSUM = "index_sha256"
STORE_DTYPES = _table.DTYPES
REBUILD = "run the same encode command again (python -m vae_toolkit encode SOURCE -o {out} ...)"


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


def write_error(path: Path, err: OSError) -> OSError:
    reason = err.strerror or str(err)
    hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
    return type(err)(err.errno, f"cannot write {path}: {reason}{hint}; free space or choose another output folder")


def atomic_write(path: Path, data: bytes | bytearray | memoryview | Callable[[BinaryIO], Any]) -> Any:
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
        raise write_error(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return result


def _is_temporary(name: str) -> bool:
    """A file :func:`atomic_write` had not renamed yet: ``<shard, table or index name>.<8 hex>.tmp``."""
    base, _, rest = name.rpartition(".")[0].rpartition(".")
    return (
        name.endswith(_TMP_SUFFIX)
        and len(rest) == 8
        and (base == INDEX_NAME or bool(SHARD_RE.match(base)) or bool(TABLE_RE.match(base)))
    )


class WriterLock:
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

    def acquire(self) -> WriterLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            self.writable = False
            return self
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise write_error(self.path, err) from err
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
            info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": utc_now()}).encode()
            try:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, info, 0)
                os.fsync(self.fd)
            except OSError as err:
                raise write_error(self.path, err) from err

    def _acquire_filelock(self) -> WriterLock:  # pragma: no cover - Windows
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


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def probe_writable(folder: Path) -> None:
    """Fail now, naming the folder, when it cannot take a file (read-only, no permission, disk full)."""
    probe = folder / f".{LOCK_NAME}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise write_error(folder, err) from err
    finally:
        probe.unlink(missing_ok=True)


@dataclass
class Record:
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
    original_size: tuple[int, int] = (-1, -1)  # (H, W) of the file
    resized_size: tuple[int, int] = (-1, -1)  # (H', W') before the crop
    crop: tuple[int, int] = (-1, -1)  # (top, left) of the crop in the resized image
    caption: str | None = None  # the sample's caption (absent from shards written before captions were stored)


@dataclass
class _Shard:
    """A shard file's header: the store settings, creation time, records, and what the index checks."""

    name: str
    settings: dict[str, Any]
    created: int
    records: list[Record]
    bytes: int
    header_bytes: int
    header_crc32: int


def read_header(path: Path) -> tuple[bytes, int]:
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


def read_shard(path: Path) -> _Shard:
    """Parse a shard's header (not its tensors); ValueError when it is not a complete latent shard."""
    header_json, size = read_header(path)
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
        caption = entry.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{path.name}: damaged header (the caption of {key!r} is not text)")
        records.append(
            Record(
                key=key,
                shard=path.name,
                offset=base + begin,
                nbytes=end - begin,
                dtype=STORE_DTYPES.index(dtype),
                shape=(int(info["shape"][0]), int(info["shape"][1]), int(info["shape"][2])),
                size=(int(entry["size"][0]), int(entry["size"][1])),
                stat=(int(entry["source_bytes"]), int(entry["source_mtime_ns"])),
                created=created,
                caption=caption,
                **_conditioning(entry),
            )
        )
    return _Shard(path.name, settings, created, records, size, len(header_json), zlib.crc32(header_json))


def _conditioning(entry: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The crop plan an entry records (absent in shards written before it: left at -1)."""
    out = {}
    for name in ("original_size", "resized_size", "crop"):
        value = entry.get(name)
        if value is not None:
            out[name] = (int(value[0]), int(value[1]))
    return out


def _shard_problem(folder: Path, record: Mapping[str, Any], verify: bool = False) -> str | None:
    """Why a listed shard does not match what the index recorded (size, header checksum, and with ``verify`` the
    SHA-256 of the whole file, when the index records one), or None."""
    path = folder / record["file"]
    try:
        header_json, size = read_header(path)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as err:
        return str(err)
    if size != record["bytes"]:
        return f"{size} bytes, the index recorded {record['bytes']}"
    if len(header_json) != record["header_bytes"] or zlib.crc32(header_json) != record["header_crc32"]:
        return "its header does not match the index (checksum)"
    if verify and record.get("sha256") is not None and _table.sha256_file(path) != record["sha256"]:
        return "its data does not match its SHA-256 in the index"
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


def _read_index(folder: Path, report: Callable[..., None]) -> dict[str, Any] | None:
    """The index as written by this version, or None (absent, damaged, or an older format: rebuilt from shards)."""
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        report("ignoring unreadable index %s (%s); it is rebuilt from the shards", path, err)
        return None
    problem = index_problem(index)
    if problem is not None:
        report("ignoring %s (%s); it is rebuilt from the shards", path, problem)
        return None
    return index


def index_problem(index: Any) -> str | None:
    if not isinstance(index, dict) or not isinstance(index.get("metadata"), dict):
        return "not a vae-toolkit latent index"
    meta = index["metadata"]
    if meta.get("format") != FORMAT:
        return "not a vae-toolkit latent index"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format version {meta.get('format_version')}, this version writes {FORMAT_VERSION}"
    missing = [k for k in _COMPATIBLE if k not in meta and k not in _ADDED_SETTINGS]
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
    small = index.get("too_small", {})
    if not isinstance(small, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("source_bytes"), int) and isinstance(v.get("source_mtime_ns"), int)
        for v in small.values()
    ):
        return "its list of images too small is malformed"
    recorded = index.get(_INDEX_CHECKSUM)
    if recorded is not None and recorded != index_checksum(index):  # absent: written before indexes had one
        return "its content does not match its checksum: it was edited or damaged"
    return None


def index_checksum(index: Mapping[str, Any]) -> str:
    """SHA-256 of the index's content (every field but the checksum itself, in a canonical JSON form)."""
    content = {k: v for k, v in index.items() if k != _INDEX_CHECKSUM}
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_index(folder: Path, index: dict[str, Any]) -> None:
    """Write the index atomically, with the checksum of its content (any edit of the file is then found)."""
    content = {k: v for k, v in index.items() if k != _INDEX_CHECKSUM}
    content[_INDEX_CHECKSUM] = index_checksum(content)
    atomic_write(folder / INDEX_NAME, json.dumps(content, indent=1, ensure_ascii=False).encode("utf-8"))


def table_problem(index: Mapping[str, Any], table: _table.Table) -> str | None:
    """Why a table (its checksum verified) does not fit the index or its shards' files, or None.

    Checks the row count, that every row names a listed shard, and that every row's bytes lie inside its
    shard's tensor data (after the header, before the end of the file): vectorised, a few ms at 1M rows.
    """
    shards = index["shards"]
    if table.count != index["metadata"].get("count", table.count):
        return f"it has {table.count} rows, the index counts {index['metadata'].get('count')}"
    if not table.count:
        return None
    ids = table.column("shard")
    if int(ids.min()) < 0 or int(ids.max()) >= len(shards):
        return "a row names a shard the index does not list"
    dtypes = table.column("dtype")
    if int(dtypes.max()) >= len(STORE_DTYPES):
        return "a row has an unknown dtype"
    offset, nbytes, shape = table.column("offset"), table.column("nbytes"), table.column("shape")
    begin = np.array([8 + s["header_bytes"] for s in shards], dtype=np.int64)
    end = np.array([s["bytes"] for s in shards], dtype=np.int64)
    itemsize = np.array([d.itemsize for d in STORE_DTYPES], dtype=np.int64)
    expected = itemsize[dtypes] * shape[:, 0] * shape[:, 1] * shape[:, 2]  # int64 products, one pass per column
    bad = (offset < begin[ids]) | (offset + nbytes > end[ids]) | (nbytes != expected)
    if bad.any():
        return f"{int(np.count_nonzero(bad))} row(s) point outside the tensor data of their shard"
    return None


@dataclass
class StoreState:
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
    verified: int = 0  # listed shards whose whole file matched its SHA-256 (scan_store(verify=True))

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None


def scan_store(folder: Path, *, verify: bool = False, quiet: bool = False) -> StoreState:
    """Read a store folder: the index and table, the listed shards' checks, and the unlisted shards' headers.

    Nothing is changed: damaged shards and stale files are only recorded (``bad_files``, ``stale``), for
    :func:`tidy` to handle under the writer's lock. Every listed shard's size and header checksum are checked;
    with ``verify``, also the SHA-256 of its whole file (``state.verified`` counts them). ``quiet`` logs what is
    ignored at DEBUG instead of WARNING (a check before the run that reports it).
    """
    state = StoreState()
    if not folder.is_dir():
        return state
    report = logger.debug if quiet else logger.warning
    names = {p.name for p in folder.iterdir()}
    index = _read_index(folder, report)
    if index is not None:
        table_path = folder / index["table"]["file"]
        try:
            if table_path.stat().st_size != index["table"]["bytes"]:
                raise _table.TableError(f"{table_path.name} has {table_path.stat().st_size} bytes, the index "
                                        f"recorded {index['table']['bytes']}")  # fmt: skip
            if _table.sha256_file(table_path) != index["table"]["sha256"]:
                raise _table.TableError(f"{table_path.name} does not match its checksum in the index")
            state.table = _table.Table(table_path)
            if (problem := table_problem(index, state.table)) is not None:
                raise _table.TableError(f"{table_path.name} does not fit the index: {problem}")
        except (OSError, _table.TableError) as err:
            report("ignoring the store's table (%s); the index is rebuilt from the shards", err)
            state.close()
            index = None
    if index is not None:
        state.index = index
        meta = normalise_settings(index["metadata"])
        state.settings = {k: meta.get(k) for k in _COMPATIBLE}
        state.shards = index["shards"]
        assert state.table is not None
        bad = np.zeros(len(state.shards), dtype=bool)
        for i, record in enumerate(state.shards):
            problem = _shard_problem(folder, record, verify)
            state.verified += verify and record.get("sha256") is not None and problem is None
            if problem is not None:
                bad[i] = True
                state.damaged += 1
                state.bad_files.append((folder / record["file"], problem))
        state.keep = ~bad[state.table.column("shard")] if len(bad) else np.ones(state.table.count, dtype=bool)
        state.stale += [folder / n for n in index.get("retired", []) if n in names and SHARD_RE.match(n)]
        names -= {p.name for p in state.stale}
    table_name = state.index["table"]["file"] if state.index is not None else None
    state.stale += [folder / n for n in sorted(names) if (TABLE_RE.match(n) and n != table_name) or _is_temporary(n)]
    listed = {s["file"] for s in state.shards}
    orphans = []
    for name in sorted(n for n in names if SHARD_RE.match(n) and n not in listed):
        try:
            orphans.append(read_shard(folder / name))
        except (OSError, ValueError) as err:
            state.bad_files.append((folder / name, str(err)))
    for shard in sorted(orphans, key=lambda s: (s.created, s.name)):
        settings = normalise_settings(shard.settings)
        if state.settings is None:
            state.settings = {k: settings.get(k) for k in _COMPATIBLE}
        elif problems := mismatch(state.settings, settings):
            state.close()
            raise StoreMismatchError(folder, [f"{shard.name}: {p}" for p in problems],
                                     "pass overwrite=True to encode everything again")  # fmt: skip
        state.orphans.append(shard)
    return state


def tidy(state: StoreState, writable: bool) -> None:
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


def normalise_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings of a shard or index written before a setting was recorded: format version 1 had no ``reader``
    (it was always the exact one); earlier stores of format 2, no ``weights`` (unknown) and no
    ``exif_orientation`` (not applied)."""
    missing = {k: v for k, v in {"reader": "exact", **_ADDED_SETTINGS}.items() if k not in settings}
    return {**settings, **missing} if missing else settings


def mismatch(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """The settings of ``requested`` (those it has) that differ from ``stored``, one line each.

    Weights that one side does not know (``None``: a store written before they were recorded, a model given as
    an object) are not compared.
    """
    problems = []
    for k in _COMPATIBLE:
        if k not in requested or stored.get(k) == requested[k]:
            continue
        if k in ("tile", "latent_format") and (stored.get(k) is None or requested[k] is None):  # unknown
            continue
        if k == "weights":
            if stored.get(k) is not None and requested[k] is not None:
                problems.append(f"model weights: stored {describe_weights(stored[k])}, requested "
                                f"{describe_weights(requested[k])}")  # fmt: skip
            continue
        problems.append(f"{k}: stored {stored.get(k)!r}, requested {requested[k]!r}")
    return problems


def describe_weights(weights: Any) -> str:
    """One line for a ``weights`` setting: the hub revision, or each file's name, size and SHA-256 prefix."""
    if not isinstance(weights, dict):
        return "unknown"
    if "revision" in weights:
        return f"{weights.get('repo_id')} at revision {weights['revision']}"
    files = weights.get("files") or {}
    parts = [f"{name} ({f.get('bytes')} bytes, sha256 {str(f.get('sha256'))[:12]})" for name, f in files.items()]
    return ", ".join(parts)


def check_store(output: str | os.PathLike[str], **settings: Any) -> dict[str, Any] | None:
    """Check that the store at ``output`` (if any) was made with ``settings``; return its settings.

    Only the settings given are compared (any of ``model``, ``size``, ``dtype``, ``vae_dtype``, ``sample``,
    ``seed``, ``reader``, ``scaling_factor``, ``shift_factor``, ``latent_channels``, ``weights`` (as
    :func:`vae_toolkit.vae_loader.weights_fingerprint` gives it), ``exif_orientation``, the training cache's
    ``buckets``, ``flip``, ``distribution``, ``no_upscale``, ``min_size``; dtypes as names like
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
    state = scan_store(folder, quiet=True)  # what it would rebuild is reported by the run itself, once
    state.close()
    if state.settings is None:
        return None
    problems = mismatch(state.settings, settings)
    if problems:
        raise StoreMismatchError(folder, problems)
    return state.settings


def remove_store_files(folder: Path) -> int:
    """Delete this library's files in ``folder`` (shards, tables, temporary files, index); nothing else."""
    removed = 0
    for path in folder.iterdir():
        name = path.name
        ours = SHARD_RE.match(name) or TABLE_RE.match(name) or name == INDEX_NAME or _is_temporary(name)
        if ours and path.is_file():
            path.unlink()
            removed += 1
    return removed
