"""Planning a run against the store, and committing its shards into the table and the index.

:func:`plan_run` compares the source (:mod:`vae_toolkit.sources`) with what the store holds
(:func:`vae_toolkit.store_files.scan_store`): what to encode, what is stored and unchanged, what is gone.
:func:`commit_run` merges the old table with the new shards' entries into a new table, writes the index (the
commit point), and only then removes what it supersedes. The file format itself is
:mod:`vae_toolkit.store_files`'; encoding, :mod:`vae_toolkit.encoding`'s.

Images left out as too small (``min_size``, ``no_upscale``) are listed in the index under ``too_small`` with the
source stat they had; a rerun does not read such an image again while its file (or its tar or Parquet shard) is
unchanged, and lists it again. Captions travel with each new entry (its shard's header) into the table's
caption columns; kept rows keep theirs.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _table
from .sources import Source
from .store_files import (
    FORMAT,
    FORMAT_VERSION,
    TABLE_RE,
    Record,
    StoreState,
    atomic_write,
    read_header,
    read_shard,
    utc_now,
    write_index,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a run has to do, computed by rank 0 from the source and the store (sent to every rank)."""

    root: Path
    todo: list[str]  # keys to encode, sorted
    total: int  # images found, including names that cannot be keys
    skipped: int  # images stored and unchanged
    failures: dict[str, str]  # names that cannot be keys (not valid UTF-8)
    removed: int
    stored_settings: dict[str, Any] | None
    up_to_date: bool  # nothing to encode and the index would not change: nothing is written
    verified: int = 0  # listed shards whose whole file was read and matched its SHA-256
    too_small: dict[str, dict[str, Any]] = field(default_factory=dict)  # listed as too small, unchanged: not read


@dataclass
class Merge:
    """Rank 0's view of the store between planning and committing (never sent to other ranks)."""

    state: StoreState
    keep: np.ndarray  # table rows kept as they are
    orphans: dict[str, Record]  # latest valid record per key from unlisted shards


def plan_run(state: StoreState, src: Source, keep_missing: bool) -> tuple[Plan, Merge]:
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
    orphans: dict[str, Record] = {}
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
    recorded_small = recorded_too_small(state.index)
    carried: dict[str, dict[str, Any]] = {}
    for skey, info in recorded_small.items():  # images left out before, and unchanged since: not read again
        j = _find(src.keys, skey)
        if j >= 0 and not ok[j] and (info["source_bytes"], info["source_mtime_ns"]) == src.stats[j]:
            carried[skey] = info
            ok[j] = True
            if row_of[j] >= 0:
                keep[row_of[j]] = False  # a latent of what the file was before
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
    up_to_date = (
        not todo and not state.orphans and not state.damaged and not removed and old_failures == dict(src.bad)
        and carried == recorded_small
    )  # fmt: skip
    plan = Plan(
        src.root,
        todo,
        len(src.keys) + len(src.bad),
        len(src.keys) - len(todo) - len(carried),
        dict(src.bad),
        removed,
        state.settings,
        up_to_date,
        too_small=carried,
    )
    return plan, Merge(state, keep, orphans)


def recorded_too_small(index: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The images an index lists as too small: ``key -> {"reason", "source_bytes", "source_mtime_ns"}``."""
    return dict(index.get("too_small", {})) if index is not None else {}


def too_small_entry(reason: str, stat: tuple[int, int]) -> dict[str, Any]:
    """What the index records of an image left out as too small (the stat tells whether it changed since)."""
    return {"reason": reason, "source_bytes": int(stat[0]), "source_mtime_ns": int(stat[1])}


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


def commit_run(
    folder: Path, merge: Merge, new_shards: Sequence[str], settings: dict[str, Any], failures: dict[str, str],
    source: Path, archives: dict[str, list[int]] | None = None, too_small: dict[str, dict[str, Any]] | None = None,
) -> None:  # fmt: skip
    """Write the table and the index for the store's new state, then delete what they supersede (rank 0).

    Order (every crash leaves a readable store): the new table under a new name, fsynced; the index, replaced
    atomically (the commit point; it lists the superseded shards as ``retired``); then the old table and the
    retired shards are deleted. The kept rows of the old table are merged with the records of the unlisted
    and new shards; both sides are sorted, so the work beyond copying arrays is O(new entries).
    """

    state = merge.state
    records = dict(merge.orphans)
    for shard in sorted((read_shard(folder / name) for name in new_shards), key=lambda s: (s.created, s.name)):
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
    old_keys = (table.key_offsets, table.key_blob) if table is not None else None
    offsets, blob = _merged_blob(old_keys, keep_rows, pos_old, new_keys, pos_new)
    old_captions = (table.caption_offsets, table.caption_blob) if table is not None else None
    new_captions = [None if r.caption is None else r.caption.encode("utf-8") for _, r in new_items]
    captions = _merged_blob(old_captions, keep_rows, pos_old, new_captions, pos_new)

    table_name = f"latents-table-{uuid.uuid4().hex[:12]}.bin"
    merged = _table.Rows(offsets, blob, columns, *captions)
    table_bytes, table_sha = atomic_write(folder / table_name, lambda f: _table.write_table(f, merged))
    index = {
        "metadata": {
            **settings,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "count": total,
            "total_size": sum(s["bytes"] for s in shard_records),
            "source": str(source),
            "updated": utc_now(),
        },
        "shards": shard_records,
        "table": {"file": table_name, "bytes": table_bytes, "sha256": table_sha},
        "failures": dict(sorted(failures.items())),
        "retired": retired,
    }
    if archives is not None:  # per tar / Parquet shard read to its end: [bytes, mtime_ns, members]
        index["archives"] = archives
    if too_small:  # images left out by min_size / no_upscale, with the stat they had
        index["too_small"] = dict(sorted(too_small.items()))
    write_index(folder, index)
    for name in retired:
        (folder / name).unlink(missing_ok=True)
        logger.info("removed %s: all its latents were superseded", name)
    for path in folder.iterdir():
        if TABLE_RE.match(path.name) and path.name != table_name:
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


def _merged_blob(
    old: tuple[np.ndarray, np.ndarray] | None,
    keep_rows: np.ndarray,
    pos_old: np.ndarray,
    new_values: Sequence[bytes | None],
    pos_new: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The merged blob and offsets of the keys (or captions; None takes no bytes): runs of kept rows are copied
    as slices of the old ``(offsets, blob)``, new values one by one."""
    total = len(keep_rows) + len(new_values)
    lengths = np.empty(total, dtype=np.int64)
    old_offsets = old[0] if old is not None else np.zeros(1, dtype=np.int64)
    if len(keep_rows):
        lengths[pos_old] = old_offsets[keep_rows + 1] - old_offsets[keep_rows]
    lengths[pos_new] = np.fromiter((0 if v is None else len(v) + 1 for v in new_values), dtype=np.int64,
                                   count=len(new_values))  # fmt: skip
    offsets = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.zeros(int(offsets[-1]), dtype=np.uint8)
    if len(keep_rows):
        assert old is not None
        breaks = np.flatnonzero((np.diff(keep_rows) != 1) | (np.diff(pos_old) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(keep_rows)]])
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            a, b = int(old_offsets[keep_rows[s]]), int(old_offsets[keep_rows[e - 1] + 1])
            dst = int(offsets[pos_old[s]])
            blob[dst : dst + b - a] = old[1][a:b]
    for value, p in zip(new_values, pos_new.tolist(), strict=True):
        if value is not None:
            start = int(offsets[p])
            blob[start : start + len(value)] = np.frombuffer(value, dtype=np.uint8)  # the NUL after it is already 0
    return offsets, blob


def _read_shard_info(path: Path) -> dict[str, Any]:
    """What the index records of a shard: size and header checksum (checked by every run), and the SHA-256 of the
    whole file (checked by ``encode --verify``; one read of a file that was just written, at ~0.8 GB/s)."""
    header_json, size = read_header(path)
    return {"bytes": size, "header_bytes": len(header_json), "header_crc32": zlib.crc32(header_json),
            "sha256": _table.sha256_file(path)}  # fmt: skip


def _record_value(record: Record, name: str, shard_id: Mapping[str, int]) -> Any:
    if name == "shard":
        return shard_id[record.shard]
    if name == "source_bytes":
        return record.stat[0]
    if name == "source_mtime_ns":
        return record.stat[1]
    return getattr(record, name)
