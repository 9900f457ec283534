"""Tar shards and Parquet files as a source: listing them, planning a run per shard, streaming their members.

A source of archives is a ``.tar`` or ``.parquet`` file, a folder holding such files directly, a list of them,
or a brace pattern as webdataset writes it (``shards/{00000..00999}.tar``, ``{train,val}.tar``). Keys:

- tar (webdataset's layout, ``KEY.jpg``, ``KEY.json``, ``KEY.txt`` per sample): the shard's path relative to
  the source's folder, ``/``, then the member's name with its extension, e.g. ``00042.tar/000420123.jpg``. Only
  members with an image extension (:func:`vae_toolkit.image_extensions`) are encoded, so the ``jpg`` and ``png``
  of one sample are two keys; the others are ignored.
- Parquet: the file's relative path, ``/``, then the row's ``key_column`` value (default: the row number),
  e.g. ``train-00000.parquet/1234``. The image column holds the encoded image's bytes, or the ``{bytes,
  path}`` struct of the Hugging Face hub's datasets.

Every entry of a shard carries the shard's (size, mtime) as its source stat. The index records, per shard
read to its end, that stat and its number of image members: a rerun opens a shard only when that record is
absent or different, or fewer of its entries are stored (:func:`plan_archives`), looking at each shard once
(its ``stat``), never at its members. A tar is read in one sequential pass (:func:`iter_members`): the
standard library's :mod:`tarfile` in streaming mode, one member's bytes at a time, nothing unpacked to disk.
The standard library rather than the ``webdataset`` package: one pass over a local file needs nothing more,
it adds no dependency to the base install, and it reports a truncated member as an error rather than
skipping it (webdataset's handlers decide that per pipeline). Parquet needs pyarrow (the ``parquet`` extra),
imported only for a Parquet source, read one record batch at a time.
"""

from __future__ import annotations

import bisect
import io
import logging
import os
import re
import stat as stat_module
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .image_utils import image_extensions
from .sources import file_stat
from .store_files import Record, StoreState
from .store_update import Merge, Plan

logger = logging.getLogger(__name__)

TAR = ".tar"
PARQUET = ".parquet"
SUFFIXES = (TAR, PARQUET)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
PARQUET_HINT = 'pip install "vae-toolkit[parquet]"'


class ArchiveError(ValueError):
    """A tar or Parquet source that cannot be used as given (the message says why and what to do)."""


@dataclass
class ArchiveSource:
    """The shards to read: paths relative to ``root`` (sorted), each one's (size, mtime) read once."""

    root: Path
    shards: list[str]
    stats: list[tuple[int, int]]
    kind: str  # ".tar" or ".parquet"
    is_folder: bool
    image_column: str = "image"
    key_column: str | None = None


@dataclass
class ShardTask:
    """One shard a rank reads: its path relative to the source, and the keys already stored from it."""

    shard: str
    stored: frozenset[str] = frozenset()


@dataclass
class ArchivePlan:
    """What :func:`plan_archives` adds to a :class:`Plan` (sent to every rank with it)."""

    root: Path
    kind: str
    tasks: list[ShardTask]
    records: dict[str, list[int]]  # complete shards not read again: path -> [bytes, mtime_ns, members]
    image_column: str = "image"
    key_column: str | None = None


@dataclass
class ReadLog:
    """What a rank's reader saw: members found, those already stored, and shards read to their end."""

    seen: int = 0
    stored: int = 0
    complete: dict[str, list[int]] = field(default_factory=dict)


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for: ``{000..009}`` (numbers, zero-padded as written), ``{a,b}``.

    Example:
        >>> expand_braces("s/{00..02}.tar")
        ['s/00.tar', 's/01.tar', 's/02.tar']
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = _RANGE.match(body)
    if span is not None:
        lo, hi = int(span.group(1)), int(span.group(2))
        width = len(span.group(1)) if span.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ArchiveError(f"brace pattern {pattern!r}: {{{body}}} is neither a range {{A..B}} nor a list {{a,b}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for option in options for name in expand_braces(f"{head}{option}{tail}")]


def _is_archive(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(SUFFIXES)


def archive_source(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    image_column: str = "image",
    key_column: str | None = None,
) -> ArchiveSource | None:
    """The archives ``source`` names, or None when it is a source of image files.

    Raises:
        ArchiveError: a brace pattern matching no file, tar and Parquet files mixed, or archives mixed with
            images in a list.
        FileNotFoundError: a file of a list or of a brace pattern does not exist.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if _BRACE.search(text) and not Path(text).expanduser().exists():
            names = expand_braces(text)
            paths = [Path(n).expanduser() for n in names]
            present = [p for p in paths if p.is_file()]
            if not present:
                raise ArchiveError(f"brace pattern {text} matches no file ({len(paths)} names tried, e.g. "
                                   f"{paths[0]}); check the folder and the numbers")  # fmt: skip
            if len(present) < len(paths):
                missing = [p for p in paths if not p.is_file()]
                raise FileNotFoundError(
                    f"brace pattern {text}: {len(missing)} of {len(paths)} files do not exist (first: {missing[0]}); "
                    "fix the pattern or pass the files as a list"
                )
            return _listed(paths, False, image_column, key_column)
        path = Path(text).expanduser()
        if path.is_file() and _is_archive(path):
            return _listed([path], False, image_column, key_column)
        if path.is_dir():
            try:
                found = sorted(e.path for e in os.scandir(path) if not e.name.startswith(".") and _is_archive(e.name)
                               and e.is_file())  # fmt: skip
            except OSError:
                return None
            if found:
                return _listed([Path(p) for p in found], True, image_column, key_column, root=path)
        return None
    items = list(source)
    archives = [p for p in items if _is_archive(p)]
    if not archives:
        return None
    if len(archives) < len(items):
        raise ArchiveError("the list mixes image files with .tar/.parquet files; encode them into separate stores")
    paths = [Path(p).expanduser() for p in archives]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"shard not found: {path}")
    return _listed(paths, False, image_column, key_column)


def _listed(
    paths: list[Path], is_folder: bool, image_column: str, key_column: str | None, root: Path | None = None
) -> ArchiveSource:
    paths = [p.absolute() for p in paths]
    kinds = {PARQUET if str(p).lower().endswith(PARQUET) else TAR for p in paths}
    if len(kinds) > 1:
        raise ArchiveError("the source mixes .tar and .parquet files; encode them into separate stores")
    base = root.absolute() if root is not None else Path(os.path.commonpath([p.parent for p in paths]))
    by_name = {p.relative_to(base).as_posix(): p for p in paths}
    names = sorted(by_name)
    stats = []
    for name in names:
        st = by_name[name].stat()
        stats.append((int(st.st_size), int(st.st_mtime_ns)) if stat_module.S_ISREG(st.st_mode) else (-1, -1))
    return ArchiveSource(base, names, stats, kinds.pop(), is_folder, image_column, key_column)


def _prefix_ranges(table: Any, shards: list[str], hints: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """For each sorted shard, the rows ``[start, end)`` of the sorted table whose keys are ``shard/...``.

    ``hints`` (the recorded number of members per shard, or -1) are checked first with three key reads;
    otherwise, or when they do not hold, binary searches."""
    n = table.count if table is not None else 0
    if table is None or not n:
        return np.zeros(len(shards), dtype=np.int64), np.zeros(len(shards), dtype=np.int64)

    class Keys(Sequence[bytes]):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: Any) -> Any:
            return table.key_bytes(int(i))

    keys = Keys()
    starts, ends = np.empty(len(shards), dtype=np.int64), np.empty(len(shards), dtype=np.int64)
    lo = 0
    for i, shard in enumerate(shards):  # "/" + 1 == "0": the keys "shard/..." lie in [shard/, shard0)
        prefix = shard.encode("utf-8")
        first, past = prefix + b"/", prefix + b"0"
        if not (lo < n and first <= keys[lo]):  # the usual case: the next rows are this shard's
            lo = bisect.bisect_left(keys, first, lo)
        starts[i] = lo
        end = lo + hints[i]
        if hints[i] >= 0 and end <= n and (end == n or keys[end] >= past) and (end == lo or keys[end - 1] < past):
            ends[i] = lo = end
        else:
            ends[i] = lo = bisect.bisect_left(keys, past, lo)
    return starts, ends


def _shard_index(key: str, index_of: dict[str, int]) -> int:
    """The source shard a key belongs to (its path is a prefix of the key up to a ``/``), or -1."""
    at = key.find("/")
    while at >= 0:
        i = index_of.get(key[:at], -1)
        if i >= 0:
            return i
        at = key.find("/", at + 1)
    return -1


def plan_archives(state: StoreState, src: ArchiveSource, keep_missing: bool) -> tuple[Plan, Merge, ArchivePlan]:
    """Which shards to open: those whose recorded (size, mtime, members) differ or are not all stored.

    One ``stat`` per shard (done by :func:`archive_source`), binary searches of the sorted table per shard and
    array comparisons of its stat columns: no member of an unchanged, complete shard is looked at. Entries of a
    changed shard are dropped (read again: replaced); entries of a shard gone from a folder source are removed
    unless ``keep_missing``.
    """
    table = state.table
    n = table.count if table is not None else 0
    keep = state.keep.copy() if state.keep is not None else np.ones(0, dtype=bool)
    recorded = (state.index or {}).get("archives", {})
    recorded = recorded if isinstance(recorded, dict) else {}
    hints = [r[2] if isinstance(r, list) and len(r) == 3 else -1 for r in map(recorded.get, src.shards)]
    starts, ends = _prefix_ranges(table, src.shards, hints)
    counts = ends - starts
    sizes = np.array([s[0] for s in src.stats], dtype=np.int64)
    mtimes = np.array([s[1] for s in src.stats], dtype=np.int64)
    in_source = np.zeros(n, dtype=bool)
    current = np.zeros(n, dtype=bool)  # rows of a listed shard with the shard's present (size, mtime)
    if table is not None and n and len(src.shards):  # the ranges are sorted and disjoint: no per-row index
        delta = np.zeros(n + 1, dtype=np.int8)
        np.add.at(delta, starts, 1)
        np.add.at(delta, ends, -1)
        in_source[:] = np.cumsum(delta[:n], dtype=np.int8) > 0
        every = bool(in_source.all())
        stored_bytes, stored_mtimes = table.column("source_bytes"), table.column("source_mtime_ns")
        if not every:
            stored_bytes, stored_mtimes = stored_bytes[in_source], stored_mtimes[in_source]
        same = (stored_bytes == np.repeat(sizes, counts)) & (stored_mtimes == np.repeat(mtimes, counts))
        if every:
            current = same
        else:
            current[in_source] = same
    valid = keep & current if n else np.zeros(0, dtype=bool)
    if n:
        keep &= current | ~in_source  # a changed shard's old entries go: it is read again
    cumulative = np.concatenate([[0], np.cumsum(valid, dtype=np.int64)])
    good = cumulative[ends] - cumulative[starts]  # stored and current entries per shard
    orphans: dict[str, Record] = {}
    for shard_file in state.orphans:  # oldest first: a key encoded again maps to its newest latent
        for record in shard_file.records:
            orphans[record.key] = record
    index_of = {name: i for i, name in enumerate(src.shards)}
    orphan_keys: dict[int, set[str]] = {}
    removed_keys = 0
    drop_missing = src.is_folder and not keep_missing
    for okey in list(orphans):
        orphan = orphans[okey]
        i = _shard_index(okey, index_of)
        row = table.find(okey) if table is not None else -1
        if i >= 0 and orphan.stat == src.stats[i]:
            if row >= 0:
                if valid[row]:
                    good[i] -= 1
                keep[row] = False  # the orphan is newer than the table's row
            orphan_keys.setdefault(i, set()).add(okey)
        elif i >= 0 or not drop_missing:
            if i < 0 and row >= 0:
                keep[row] = False
            if i >= 0:
                del orphans[okey]
        else:
            removed_keys += 1 if row < 0 or not keep[row] else 0
            del orphans[okey]
    tasks: list[ShardTask] = []
    records: dict[str, list[int]] = {}
    for i, shard in enumerate(src.shards):
        size, mtime = src.stats[i]
        stored = int(good[i]) + len(orphan_keys.get(i, ()))
        if recorded.get(shard) == [size, mtime, stored] and size >= 0:
            records[shard] = [size, mtime, stored]
            continue
        keys = {table.key(r) for r in range(int(starts[i]), int(ends[i])) if valid[r]} if table is not None else set()
        tasks.append(ShardTask(shard, frozenset(keys | orphan_keys.get(i, set()))))
    removed = removed_keys
    if drop_missing and n:
        gone = ~in_source & keep
        removed += int(np.count_nonzero(gone))
        keep &= in_source
    skipped = sum(r[2] for r in records.values())
    old_failures = state.index.get("failures", {}) if state.index is not None else None
    up_to_date = (
        not tasks and not state.orphans and not state.damaged and not removed and old_failures == {}
        and recorded == records
    )  # fmt: skip
    plan = Plan(src.root, [t.shard for t in tasks], skipped, skipped, {}, removed, state.settings, up_to_date)
    archive_plan = ArchivePlan(src.root, src.kind, tasks, records, src.image_column, src.key_column)
    return plan, Merge(state, keep, orphans), archive_plan


class MemberBytes(io.BytesIO):
    """A member's bytes, read as a file; ``str()`` is its key, so that a decoder's error names it."""

    def __init__(self, data: bytes, key: str) -> None:
        super().__init__(data)
        self.key = key

    def __str__(self) -> str:
        return self.key


class ShardError(Exception):
    """A shard that could not be read to its end (its members before the problem are kept)."""


def _open_shard(path: Path) -> io.BufferedReader:
    return open(path, "rb")


def iter_members(
    path: Path, shard: str, stored: frozenset[str] = frozenset(), log: ReadLog | None = None
) -> Iterator[tuple[str, tuple[int, int], bytes | Exception]]:
    """A tar shard's image members in one sequential pass: ``(key, shard stat, bytes)``, one member at a time.

    Members already ``stored`` are counted and passed over unread; a member whose name is not valid UTF-8 is
    yielded with its exception. A shard that cannot be read to its end yields ``(shard, stat, ShardError)``
    after the members before the problem; one read to its end is recorded in ``log.complete``.
    """
    log = log if log is not None else ReadLog()
    extensions = image_extensions()
    members, last = 0, None
    stat = (-1, -1)
    try:
        with _open_shard(path) as f:
            st = os.fstat(f.fileno())
            stat = (int(st.st_size), int(st.st_mtime_ns))
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile() or os.path.splitext(member.name)[1].lower() not in extensions:
                        continue
                    key = f"{shard}/{member.name}"
                    members += 1
                    log.seen += 1
                    try:
                        key.encode("utf-8")
                    except UnicodeEncodeError:
                        printable = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                        yield printable, stat, ValueError("member name is not valid UTF-8; rename it in the tar")
                        continue
                    if key in stored:
                        log.stored += 1
                        continue
                    reader = tar.extractfile(member)
                    assert reader is not None
                    data = reader.read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    last = key
                    yield key, stat, data
                    del data, reader  # not held while the next member is read
    except (tarfile.TarError, OSError, EOFError) as err:
        after = f"after its member {last}" if last is not None else "before any member was read"
        text = " ".join(str(err).split()) or type(err).__name__
        problem = "ends in the middle of a member" if "unexpected end" in text or isinstance(err, EOFError) else text
        message = (
            f"tar shard {path} could not be read to its end ({problem}) {after}; the members before it are "
            "kept: replace or re-download the shard, then run again"
        )
        yield shard, stat, ShardError(message)
        return
    log.complete[shard] = [stat[0], stat[1], members]


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(f"reading .parquet files needs pyarrow: {PARQUET_HINT}") from err
    return pq


def check_parquet_available() -> None:
    """Raise the one-line ImportError naming the extra when pyarrow is missing."""
    _pyarrow()


def iter_rows(
    path: Path,
    shard: str,
    image_column: str,
    key_column: str | None,
    stored: frozenset[str] = frozenset(),
    log: ReadLog | None = None,
) -> Iterator[tuple[str, tuple[int, int], bytes | Exception]]:
    """A Parquet file's images, one record batch at a time: ``(key, file stat, bytes)``.

    The image column holds binary values or ``{bytes, path}`` structs; anything else is reported once for the
    file (``(shard, stat, ShardError)``) naming the file and the column.
    """
    pq = _pyarrow()
    import pyarrow as pa

    log = log if log is not None else ReadLog()
    stat = file_stat(path)
    rows, seen = 0, set()
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        problem = None
        if image_column not in schema.names:
            problem = f"has no column {image_column!r} (its columns: {', '.join(schema.names)}); pass --image-column"
        elif key_column is not None and key_column not in schema.names:
            problem = f"has no column {key_column!r} (its columns: {', '.join(schema.names)}); pass --key-column"
        else:
            kind = schema.field(image_column).type
            is_struct = pa.types.is_struct(kind)
            if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or
                    (is_struct and kind.get_field_index("bytes") >= 0)):  # fmt: skip
                problem = (f"column {image_column!r} holds {kind}, not image bytes (binary) or a {{bytes, path}} "
                           "struct; pass the image column with --image-column")  # fmt: skip
        if problem is not None:
            yield shard, stat, ShardError(f"Parquet file {path} {problem}")
            return
        columns = [image_column] + ([key_column] if key_column is not None else [])
        for batch in parquet.iter_batches(batch_size=64, columns=columns):
            images = batch.column(0)
            if is_struct:
                images = images.field("bytes")
            names = batch.column(1).to_pylist() if key_column is not None else None
            for j in range(batch.num_rows):
                name = str(names[j]) if names is not None else str(rows)
                rows += 1
                key = f"{shard}/{name}"
                log.seen += 1
                if key in seen:
                    yield key, stat, ValueError(f"key {name!r} of column {key_column!r} is not unique in {path}")
                    continue
                seen.add(key)
                if key in stored:
                    log.stored += 1
                    continue
                value = images[j].as_py()
                if value is None:
                    yield key, stat, ValueError(f"row {rows - 1} of {path} has no image bytes in {image_column!r}")
                    continue
                yield key, stat, value
    except (OSError, pa.ArrowException) as err:
        yield shard, stat, ShardError(f"Parquet file {path} could not be read to its end after {rows} rows: {err}")
        return
    log.complete[shard] = [stat[0], stat[1], rows]


def iter_archive(
    plan: ArchivePlan, tasks: Sequence[ShardTask], log: ReadLog
) -> Iterator[tuple[str, tuple[int, int], bytes | Exception]]:
    """The members of ``tasks``' shards, shard after shard, each read in one pass."""
    for task in tasks:
        path = plan.root / task.shard
        if plan.kind == PARQUET:
            yield from iter_rows(path, task.shard, plan.image_column, plan.key_column, task.stored, log)
        else:
            yield from iter_members(path, task.shard, task.stored, log)
