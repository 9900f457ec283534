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

Captions (stored beside each latent, :func:`vae_toolkit.sources.decode_caption`'s rule): a tar sample's
``KEY.txt``, else the ``"caption"`` field of its ``KEY.json``; a Parquet row's ``caption_column`` (a string
column). Samples are grouped as webdataset groups them: a member's sample key is its name with the basename cut
at its first dot (``d/a.b.jpg`` belongs to ``d/a``, whose caption is ``d/a.txt``), and the members of one sample
are adjacent in the tar. As the caption may come before or after its image, a sample's image members are held
until the next sample starts (up to 64 MiB of them; beyond that they go with the caption read so far).

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
import json
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
from .sources import MAX_CAPTION_BYTES, CaptionError, decode_caption, file_stat
from .store_files import Record, StoreState
from .store_update import Merge, Plan, recorded_too_small

logger = logging.getLogger(__name__)

TAR = ".tar"
PARQUET = ".parquet"
TAR_SUFFIXES = (TAR, ".tar.gz", ".tgz")  # a gzip-compressed tar is read in the same single pass
SUFFIXES = (*TAR_SUFFIXES, PARQUET)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
PARQUET_HINT = 'pip install "vae-toolkit[parquet]"'
_PARQUET_BATCH = 16  # rows per record batch: a few images' bytes in memory at a time
_PARQUET_BUFFER = 1 << 20  # bytes read ahead per column when streaming a Parquet file
_MAX_SAMPLE_BYTES = 1 << 26  # image bytes of one tar sample held while waiting for its caption
_MAX_JSON_BYTES = 1 << 24  # a sample's KEY.json read for its caption


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
    caption_column: str | None = None


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
    caption_column: str | None = None


@dataclass
class ReadLog:
    """What a rank's reader saw: members found, those already stored, shards read to their end, and images left
    out as too small (``key -> {"reason", "source_bytes", "source_mtime_ns"}``, as the index records them)."""

    seen: int = 0
    stored: int = 0
    duplicates: int = 0  # members named as an earlier member of their shard (the last one of a name is kept)
    complete: dict[str, list[int]] = field(default_factory=dict)
    too_small: dict[str, dict[str, Any]] = field(default_factory=dict)


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


def check_member_name(name: str) -> str | None:
    """Why a member name (or Parquet key value) cannot be part of a key, or None when it can.

    A key becomes a path under ``decode -o``: a name that is empty, holds a ``..`` component or a NUL byte could
    reach outside that folder, so the sample is refused (listed as a failure with this reason) when it is read.
    """
    if not name:
        return "its name is empty; a key needs a name"
    if "\0" in name:
        return "its name holds a NUL byte"
    if any(part == ".." for part in name.replace("\\", "/").split("/")):
        return f"its name {name!r} holds a '..' component, which would point outside the store's keys; rename it"
    return None


def _metadata_parquets(folder: Path, entries: list[os.DirEntry[str]]) -> set[str]:
    """img2dataset's metadata files: ``00000.parquet`` beside ``00000.tar`` (webdataset output) or beside a
    folder ``00000/`` (its "files" output). They describe the images; they do not hold them."""
    names = {e.name for e in entries}
    found = set()
    for entry in entries:
        if not entry.name.lower().endswith(PARQUET):
            continue
        stem = entry.name[: -len(PARQUET)]
        beside_tar = any(f"{stem}{suffix}" in names for suffix in TAR_SUFFIXES)
        if beside_tar or (stem in names and (folder / stem).is_dir()):
            found.add(entry.name)
    return found


def _first_image(folder: Path) -> Path | None:
    """Any image file under ``folder`` (recursively, following links, each folder once), or None."""
    extensions = image_extensions()
    pending, visited = [folder], set()
    while pending:
        current = pending.pop()
        try:
            st = current.stat()
            if (st.st_dev, st.st_ino) in visited:
                continue
            visited.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                pending.append(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                return Path(entry.path)
    return None


def archive_source(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    image_column: str = "image",
    key_column: str | None = None,
    caption_column: str | None = None,
) -> ArchiveSource | None:
    """The archives ``source`` names, or None when it is a source of image files.

    Raises:
        ArchiveError: a brace pattern matching no file, tar and Parquet files mixed, archives mixed with
            images in a list, or a ``caption_column`` for tar shards.
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
            return _listed(paths, False, image_column, key_column, caption_column=caption_column)
        path = Path(text).expanduser()
        if path.is_file() and _is_archive(path):
            return _listed([path], False, image_column, key_column, caption_column=caption_column)
        if path.is_dir():
            try:
                entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
                found = sorted(e.path for e in entries if _is_archive(e.name) and e.is_file())
            except OSError:
                return None
            metadata = _metadata_parquets(path, entries)
            if metadata:
                logger.info("%s: %d Parquet file(s) beside a tar shard or folder of the same name taken as "
                            "metadata, not read as images", path, len(metadata))  # fmt: skip
                found = [p for p in found if os.path.basename(p) not in metadata]
            if found:
                image = _first_image(path)
                if image is not None:  # never switch a folder of images to the archives it happens to hold
                    raise ArchiveError(
                        f"{path} holds image files (e.g. {image.relative_to(path).as_posix()}) and the archive "
                        f"{os.path.basename(found[0])}{f' (and {len(found) - 1} more)' if len(found) > 1 else ''}; "
                        "a folder is read either as images or as shards: to encode the archive, pass it as SOURCE "
                        "(into its own store), or move it out of the folder to encode the images"
                    )
                return _listed([Path(p) for p in found], True, image_column, key_column, path, caption_column)
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
    return _listed(paths, False, image_column, key_column, caption_column=caption_column)


def _listed(
    paths: list[Path],
    is_folder: bool,
    image_column: str,
    key_column: str | None,
    root: Path | None = None,
    caption_column: str | None = None,
) -> ArchiveSource:
    paths = [p.absolute() for p in paths]
    kinds = {PARQUET if str(p).lower().endswith(PARQUET) else TAR for p in paths}
    if len(kinds) > 1:
        raise ArchiveError("the source mixes .tar and .parquet files; encode them into separate stores")
    if caption_column is not None and PARQUET not in kinds:
        raise ArchiveError(
            f"--caption-column {caption_column} is for Parquet files; tar shards take each sample's caption from its "
            "KEY.txt (or the 'caption' field of its KEY.json)"
        )
    base = root.absolute() if root is not None else Path(os.path.commonpath([p.parent for p in paths]))
    by_name = {p.relative_to(base).as_posix(): p for p in paths}
    names = sorted(by_name)
    stats = []
    for name in names:
        st = by_name[name].stat()
        stats.append((int(st.st_size), int(st.st_mtime_ns)) if stat_module.S_ISREG(st.st_mode) else (-1, -1))
    return ArchiveSource(base, names, stats, kinds.pop(), is_folder, image_column, key_column, caption_column)


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
    unless ``keep_missing``. Members the index lists as too small count as stored for their unchanged shard, and
    stay listed while it is not opened; an opened shard checks them again.
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
    recorded_small = recorded_too_small(state.index)
    small: dict[int, dict[str, Any]] = {}  # per shard: its members listed as too small, of its present stat
    for skey, info in recorded_small.items():
        i = _shard_index(skey, index_of)
        if i >= 0 and (info["source_bytes"], info["source_mtime_ns"]) == src.stats[i]:
            small.setdefault(i, {})[skey] = info
    carried: dict[str, Any] = {}
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
        stored = int(good[i]) + len(orphan_keys.get(i, ())) + len(small.get(i, ()))
        if recorded.get(shard) == [size, mtime, stored] and size >= 0:
            records[shard] = [size, mtime, stored]
            carried.update(small.get(i, {}))
            continue
        keys = {table.key(r) for r in range(int(starts[i]), int(ends[i])) if valid[r]} if table is not None else set()
        tasks.append(ShardTask(shard, frozenset(keys | orphan_keys.get(i, set()))))
    removed = removed_keys
    if drop_missing and n:
        gone = ~in_source & keep
        removed += int(np.count_nonzero(gone))
        keep &= in_source
    total = sum(r[2] for r in records.values())
    old_failures = state.index.get("failures", {}) if state.index is not None else None
    up_to_date = (
        not tasks and not state.orphans and not state.damaged and not removed and old_failures == {}
        and recorded == records and carried == recorded_small
    )  # fmt: skip
    plan = Plan(src.root, [t.shard for t in tasks], total, total - len(carried), {}, removed, state.settings,
                up_to_date, too_small=dict(sorted(carried.items())))  # fmt: skip
    archive_plan = ArchivePlan(src.root, src.kind, tasks, records, src.image_column, src.key_column,
                               src.caption_column)  # fmt: skip
    return plan, Merge(state, keep, orphans), archive_plan


class MemberBytes(io.BytesIO):
    """A member's bytes, read as a file; ``str()`` is its key, so that a decoder's error names it."""

    def __init__(self, data: bytes, key: str) -> None:
        super().__init__(data)
        self.key = key

    def __str__(self) -> str:
        return self.key


class Member(bytes):
    """An image member's (or Parquet row's) bytes with its sample's ``caption`` (the readers yield plain bytes for
    a first member of its name without a caption)."""

    caption: str | None = None
    generation: int = 0


class Later(Member):
    """The bytes of a member named as an earlier member of its shard: ``generation`` is 1 for the second of that
    name, 2 for the third... The last one of a name is stored, as ``tar -x`` leaves the last one on disk (what
    ``tar -r`` and ``tar -u`` append is the newer copy)."""

    def __new__(cls, data: bytes, generation: int) -> Later:
        self = super().__new__(cls, data)
        self.generation = generation
        return self


def _captioned(data: bytes, caption: str | None) -> bytes:
    """``data`` carrying ``caption`` (a copy made only when there is a caption to carry)."""
    if caption is None:
        return data
    member = data if isinstance(data, Member) else Member(data)
    member.caption = caption
    return member


def sample_key(name: str) -> str:
    """The webdataset sample a tar member belongs to: its name with the basename cut at its first dot."""
    folder, slash, base = name.rpartition("/")
    return folder + slash + base.split(".", 1)[0]


def _json_caption(data: bytes, name: str) -> str | None:
    """The ``"caption"`` field of a sample's JSON metadata (None when absent or null)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CaptionError(f"{name} is not valid UTF-8 JSON ({err}); fix or remove it") from None
    value = meta.get("caption") if isinstance(meta, dict) else None
    if value is not None and not isinstance(value, str):
        raise CaptionError(f"the 'caption' field of {name} is a {type(value).__name__}, not text")
    return None if value is None else decode_caption(value.encode("utf-8"), f"the 'caption' field of {name}")


class _Sample:
    """The webdataset sample being read from a tar: its image members, held until it ends, and its caption's."""

    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.images: list[tuple[str, bytes]] = []
        self.held = 0
        self.text: tuple[str, bytes | None] | None = None  # (member name, bytes: None when too large to read)
        self.meta: tuple[str, bytes | None] | None = None

    def caption(self) -> str | None:
        if self.text is not None:
            name, data = self.text
            if data is None:
                raise CaptionError(f"caption file {name} has more than {MAX_CAPTION_BYTES:,} bytes: not a caption")
            return decode_caption(data, f"caption file {name}")
        if self.meta is not None:
            name, data = self.meta
            if data is None:
                raise CaptionError(f"{name} has more than {_MAX_JSON_BYTES:,} bytes: too large for metadata")
            return _json_caption(data, name)
        return None

    def take(self) -> list[tuple[str, bytes | Exception]]:
        """The held images with this sample's caption (or its caption's error), and none held any more."""
        images, self.images, self.held = self.images, [], 0
        if not images:
            return []
        try:
            caption = self.caption()
        except CaptionError as err:
            return [(key, err) for key, _ in images]
        return [(key, _captioned(data, caption)) for key, data in images]


class ShardError(Exception):
    """A shard that could not be read to its end (its members before the problem are kept)."""


def _open_shard(path: Path) -> io.BufferedReader:
    return open(path, "rb")


class _Names:
    """The member names of one shard seen so far: a later one of a name is yielded as :class:`Later`."""

    def __init__(self, log: ReadLog) -> None:
        self.counts: dict[str, int] = {}
        self.log = log

    def generation(self, key: str) -> int:
        generation = self.counts.get(key, 0)
        self.counts[key] = generation + 1
        if generation:
            self.log.duplicates += 1
            logger.warning("%s: a later member of the same name replaces the earlier one (the last one is kept)",
                           key)  # fmt: skip
        return generation

    def unique(self) -> int:
        return len(self.counts)


def _tar_ended(tar: tarfile.TarFile, size: int) -> bool:
    """Whether an uncompressed tar read to its end had tar's end-of-archive blocks: a file cut exactly at a
    member's header ends without them, and tarfile takes that for the end."""
    stream = getattr(tar, "fileobj", None)
    if getattr(stream, "comptype", "tar") != "tar":  # gzip checks its own end (its trailer and length)
        return True
    return tar.offset + tarfile.BLOCKSIZE <= size


def iter_members(
    path: Path, shard: str, stored: frozenset[str] = frozenset(), log: ReadLog | None = None
) -> Iterator[tuple[str, tuple[int, int], bytes | Exception]]:
    """A tar shard's image members in one sequential pass: ``(key, shard stat, bytes)``, one sample at a time.

    Members already ``stored`` are counted and passed over unread; a member whose name is not valid UTF-8 or
    cannot be a key (:func:`check_member_name`) is yielded with its exception. A member named as an earlier one
    of the shard is yielded as :class:`Later` bytes (the last one of a name is stored). An image of a sample with
    a caption (the module's rule) is yielded as :class:`Member` bytes carrying it, once its sample has ended; a
    caption that cannot be read is yielded as each of the sample's images' :class:`CaptionError`. A shard that
    cannot be read to its end (a member cut short, or the file ending without tar's end-of-archive blocks) yields
    ``(shard, stat, ShardError)`` after the members before the problem; one read to its end is recorded in
    ``log.complete`` with its number of distinct image member names.
    """
    log = log if log is not None else ReadLog()
    extensions = image_extensions()
    names = _Names(log)
    last = None
    stat = (-1, -1)
    sample = _Sample()

    def release() -> Iterator[tuple[str, tuple[int, int], bytes | Exception]]:
        nonlocal last
        for key, data in sample.take():
            last = key
            yield key, stat, data

    try:
        with _open_shard(path) as f:
            st = os.fstat(f.fileno())
            stat = (int(st.st_size), int(st.st_mtime_ns))
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    group = sample_key(member.name)
                    if group != sample.key:
                        yield from release()
                        sample = _Sample(group)
                    suffix = member.name[len(group) + 1 :].lower()
                    if suffix in ("txt", "json"):
                        limit = MAX_CAPTION_BYTES if suffix == "txt" else _MAX_JSON_BYTES
                        found = (f"{shard}/{member.name}", _read_member(tar, member) if member.size <= limit else None)
                        if suffix == "txt":
                            sample.text = found
                        else:
                            sample.meta = found
                        continue
                    if os.path.splitext(member.name)[1].lower() not in extensions:
                        continue
                    key = f"{shard}/{member.name}"
                    log.seen += 1
                    try:
                        key.encode("utf-8")
                    except UnicodeEncodeError:
                        printable = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                        names.generation(printable)
                        yield printable, stat, ValueError("member name is not valid UTF-8; rename it in the tar")
                        continue
                    generation = names.generation(key)
                    problem = check_member_name(member.name)
                    if problem is not None:
                        yield key, stat, ValueError(f"tar member {problem}")
                        continue
                    if key in stored and not generation:  # a later one of a name is never taken as stored
                        log.stored += 1
                        continue
                    data = _read_member(tar, member)
                    sample.images.append((key, Later(data, generation) if generation else data))
                    sample.held += len(data)
                    del data  # held once, by its sample
                    if sample.held > _MAX_SAMPLE_BYTES:
                        yield from release()
                yield from release()
                if not _tar_ended(tar, stat[0]):
                    raise tarfile.ReadError("ends after a member without tar's end-of-archive blocks: it was cut")
    except (tarfile.TarError, OSError, EOFError) as err:
        yield from release()  # the images read whole before the problem
        after = f"after its member {last}" if last is not None else "before any member was read"
        text = " ".join(str(err).split()) or type(err).__name__
        problem = "ends in the middle of a member" if "unexpected end" in text or isinstance(err, EOFError) else text
        message = (
            f"tar shard {path} could not be read to its end ({problem}) {after}; the members before it are "
            "kept: replace or re-download the shard, then run again"
        )
        yield shard, stat, ShardError(message)
        return
    log.complete[shard] = [stat[0], stat[1], names.unique()]


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    reader = tar.extractfile(member)
    assert reader is not None
    data = reader.read()
    if len(data) != member.size:
        raise tarfile.ReadError("unexpected end of data")
    return data


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
    caption_column: str | None = None,
) -> Iterator[tuple[str, tuple[int, int], bytes | Exception]]:
    """A Parquet file's images, one record batch at a time: ``(key, file stat, bytes)``.

    The image column holds binary values or ``{bytes, path}`` structs; anything else is reported once for the
    file (``(shard, stat, ShardError)``) naming the file and the column. With ``caption_column`` (a string
    column), a row's non-null value comes as the :class:`Member` bytes' caption.
    """
    pq = _pyarrow()
    import pyarrow as pa

    log = log if log is not None else ReadLog()
    stat = file_stat(path)
    names = _Names(log)
    rows = 0
    try:
        # no pre-buffering of whole column chunks: memory follows the batch, not the row group (often the file)
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=_PARQUET_BUFFER)
        schema = parquet.schema_arrow
        problem = None
        if image_column not in schema.names:
            problem = f"has no column {image_column!r} (its columns: {', '.join(schema.names)}); pass --image-column"
        elif key_column is not None and key_column not in schema.names:
            problem = f"has no column {key_column!r} (its columns: {', '.join(schema.names)}); pass --key-column"
        elif caption_column is not None and caption_column not in schema.names:
            problem = (f"has no column {caption_column!r} (its columns: {', '.join(schema.names)}); pass "
                       "--caption-column")  # fmt: skip
        elif caption_column is not None and not _is_text(pa, schema.field(caption_column).type):
            problem = (f"column {caption_column!r} holds {schema.field(caption_column).type}, not text; pass a "
                       "string column with --caption-column")  # fmt: skip
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
        columns = [image_column] + [c for c in (key_column, caption_column) if c is not None]
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
            images = batch.column(0)
            if is_struct:
                images = images.field("bytes")
            values = batch.column(1).to_pylist() if key_column is not None else None
            captions = batch.column(len(columns) - 1).to_pylist() if caption_column is not None else None
            for j in range(batch.num_rows):
                name = str(values[j]) if values is not None else str(rows)
                rows += 1
                key = f"{shard}/{name}"
                log.seen += 1
                generation = names.generation(key)
                problem = check_member_name(name) if values is not None else None
                if problem is not None:
                    yield key, stat, ValueError(f"row {rows - 1} of {path}: key column {key_column!r}: {problem}")
                    continue
                if key in stored and not generation:
                    log.stored += 1
                    continue
                value = images[j].as_py()
                if value is None:
                    yield key, stat, ValueError(f"row {rows - 1} of {path} has no image bytes in {image_column!r}")
                    continue
                data = Later(value, generation) if generation else value
                text = captions[j] if captions is not None else None
                if text is None:
                    yield key, stat, data
                    continue
                try:
                    caption = decode_caption(text.encode("utf-8"), f"the caption of row {rows - 1} of {path}")
                except CaptionError as err:
                    yield key, stat, err
                    continue
                yield key, stat, _captioned(data, caption)
            del batch, images
    except (OSError, pa.ArrowException) as err:
        yield shard, stat, ShardError(f"Parquet file {path} could not be read to its end after {rows} rows: {err}")
        return
    log.complete[shard] = [stat[0], stat[1], names.unique()]


def _is_text(pa: Any, kind: Any) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind))


def iter_archive(
    plan: ArchivePlan, tasks: Sequence[ShardTask], log: ReadLog
) -> Iterator[tuple[str, tuple[int, int], bytes | Exception]]:
    """The members of ``tasks``' shards, shard after shard, each read in one pass."""
    for task in tasks:
        path = plan.root / task.shard
        if plan.kind == PARQUET:
            yield from iter_rows(path, task.shard, plan.image_column, plan.key_column, task.stored, log,
                                 plan.caption_column)  # fmt: skip
        else:
            yield from iter_members(path, task.shard, task.stored, log)
