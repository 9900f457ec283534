"""The per-key table of a latent store (format version 2): one binary file of numpy columns, memory-mapped.

Why this form: a store of a million latents needs a lookup table that opens in milliseconds, costs a few
bytes per key, and holds **no Python object per key**, so that forked DataLoader workers share it page for
page instead of copying it as reference counts change (pytorch/pytorch#13246). A JSON index fails all three
(242 B per key, ~7 µs per key to parse, a dict of strings per worker). Numpy arrays in one file, mapped with
``mmap``, meet them: opening maps the file and wraps each column with ``np.frombuffer`` (no copy, no parse),
a key is found by binary search over the sorted keys, and a row is a few integers read on demand.

One file rather than one ``.npy`` per column, so that the table is replaced atomically as a whole (written to
a temporary name, fsynced, renamed). Its layout::

    b"VAETKTB2"                    8 bytes of magic
    header length                  uint64, little endian
    header                         JSON: {"count": n, "columns": {name: [dtype, shape, offset]}, "bytes": total}
    columns                        each at a 64-byte aligned offset

Columns (``n`` rows, sorted by key as UTF-8 bytes, which is also Python's ``str`` order):

- ``key_offsets`` int64 ``[n + 1]`` and ``key_blob`` uint8: key ``i`` is the bytes from ``key_offsets[i]`` to one
  before ``key_offsets[i + 1]`` (each key is followed by a NUL byte, which no file name holds);
- ``shard`` int32: position of the row's shard in the index's shard list;
- ``offset`` / ``nbytes`` int64: where the tensor's bytes lie inside that shard (absolute file offsets);
- ``dtype`` uint8: code into :data:`DTYPES`; ``shape`` int32 ``[n, 3]``: the latent's ``(C, h, w)``;
- ``size`` int32 ``[n, 2]``: the image size ``(w, h)`` that was encoded;
- ``source_bytes`` / ``source_mtime_ns`` int64: the source file's size and mtime when it was encoded;
- ``original_size``, ``resized_size``, ``crop`` int32 ``[n, 2]``: the file's ``(H, W)``, the size ``(H', W')``
  it was resized to and the crop's top-left ``(top, left)`` in it (SDXL's conditioning). Tables written
  before these columns lack them; they read as -1;
- ``caption_offsets`` int64 ``[n + 1]`` and ``caption_blob`` uint8: row ``i``'s caption (UTF-8) is the bytes from
  ``caption_offsets[i]`` to one before ``caption_offsets[i + 1]``, followed by a NUL byte; a row without a caption
  has no bytes at all (equal offsets), so that no caption (None) and an empty one (``""``) differ. Tables written
  before these columns lack them: every row reads as None.

A truncated or damaged file is detected on opening (magic, header, declared length, column bounds) and is never
misread; the index records the table's length and SHA-256, which a rerun of ``encode`` checks in full.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

MAGIC = b"VAETKTB2"
ALIGN = 64
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

# name -> (numpy dtype, columns per row); key_offsets and key_blob are special
COLUMNS: dict[str, tuple[str, int]] = {
    "shard": ("<i4", 1),
    "offset": ("<i8", 1),
    "nbytes": ("<i8", 1),
    "dtype": ("u1", 1),
    "shape": ("<i4", 3),
    "size": ("<i4", 2),
    "source_bytes": ("<i8", 1),
    "source_mtime_ns": ("<i8", 1),
    "original_size": ("<i4", 2),
    "resized_size": ("<i4", 2),
    "crop": ("<i4", 2),
}
# columns added after the first tables of format 2 were written: a table without them reads them as -1
OPTIONAL = frozenset({"original_size", "resized_size", "crop"})
# the captions, a blob with offsets as the keys are (added later too: a table without them has no captions)
CAPTIONS = ("caption_offsets", "caption_blob")


class TableError(ValueError):
    """The table file is truncated, damaged or not a table of this format."""


@dataclass
class Rows:
    """Table rows to write: keys as one UTF-8 blob (each key followed by a NUL byte) with offsets, and columns.

    Keys are sorted and unique. ``key_offsets[i]`` is where key ``i`` starts; it ends one byte before
    ``key_offsets[i + 1]`` (its NUL). File names cannot hold NUL, so the blob of a list of keys is simply
    ``"\\0".join(keys) + "\\0"``, which lets a writer compare a whole source listing with a table in one step.
    Captions are laid out the same way (:func:`blob_of`), a row without one taking no bytes; None: no captions.
    """

    key_offsets: np.ndarray
    key_blob: np.ndarray
    columns: dict[str, np.ndarray]
    caption_offsets: np.ndarray | None = None
    caption_blob: np.ndarray | None = None

    @classmethod
    def from_keys(
        cls, keys: Sequence[bytes], columns: dict[str, np.ndarray], captions: Sequence[bytes | None] | None = None
    ) -> Rows:
        offsets, blob = blob_of(keys)
        if captions is None:
            return cls(offsets, blob, columns)
        return cls(offsets, blob, columns, *blob_of(captions))

    def __len__(self) -> int:
        return len(self.key_offsets) - 1


def blob_of(values: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [n + 1], blob)`` of byte strings, each followed by a NUL byte; None takes no bytes."""
    lengths = np.fromiter((0 if v is None else len(v) + 1 for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(v + b"\0" for v in values if v is not None), dtype=np.uint8)
    return offsets, blob


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_table(f: BinaryIO, rows: Rows) -> tuple[int, str]:
    """Write ``rows`` as a table file to ``f`` (column by column, no copy of the whole); ``(bytes, sha256)``."""
    n = len(rows)
    arrays: dict[str, np.ndarray] = {
        "key_offsets": np.ascontiguousarray(rows.key_offsets, dtype="<i8"),
        "key_blob": np.ascontiguousarray(rows.key_blob, dtype=np.uint8),
    }
    for name, (dtype, width) in COLUMNS.items():
        column = np.ascontiguousarray(rows.columns[name], dtype=dtype)
        expected = (n, width) if width > 1 else (n,)
        if column.shape != expected:
            raise ValueError(f"table column {name} has shape {column.shape}, expected {expected}")
        arrays[name] = column
    if rows.caption_offsets is None or rows.caption_blob is None:
        arrays["caption_offsets"] = np.zeros(n + 1, dtype="<i8")
        arrays["caption_blob"] = np.zeros(0, dtype=np.uint8)
    else:
        arrays["caption_offsets"] = np.ascontiguousarray(rows.caption_offsets, dtype="<i8")
        arrays["caption_blob"] = np.ascontiguousarray(rows.caption_blob, dtype=np.uint8)
        if arrays["caption_offsets"].shape != (n + 1,) or arrays["caption_offsets"][-1] != len(arrays["caption_blob"]):
            raise ValueError(f"table captions: {arrays['caption_offsets'].shape[0]} offsets do not fit {n} rows and "
                             f"a blob of {len(arrays['caption_blob'])} bytes")  # fmt: skip
    # the header's length depends on the offsets, which depend on the header's length: fix it by padding
    layout: dict[str, list[Any]] = {}
    header_room = 1024
    while True:
        offset = _aligned(16 + header_room)
        for name, array in arrays.items():
            layout[name] = [array.dtype.str, list(array.shape), offset]
            offset = _aligned(offset + array.nbytes)
        header = json.dumps({"count": n, "columns": layout, "bytes": offset}, separators=(",", ":")).encode()
        if len(header) <= header_room:
            break
        header_room = _aligned(len(header) * 2)
    digest = hashlib.sha256()
    written = 0

    def put(data: bytes | memoryview) -> None:
        nonlocal written
        f.write(data)
        digest.update(data)
        written += len(data)

    put(MAGIC + header_room.to_bytes(8, "little") + header + b" " * (header_room - len(header)))
    for name, array in arrays.items():
        put(b"\0" * (layout[name][2] - written))
        put(memoryview(array.reshape(-1).view(np.uint8)))  # type: ignore[arg-type,unused-ignore]
    put(b"\0" * (offset - written))
    return written, digest.hexdigest()


def encode_table(rows: Rows) -> bytes:
    """The bytes of a table file holding ``rows`` (for tests; writers stream with :func:`write_table`)."""
    import io

    buffer = io.BytesIO()
    write_table(buffer, rows)
    return buffer.getvalue()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class Table:
    """A table file opened read-only and memory-mapped; rows are read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 16:
                raise TableError(f"{path} is truncated ({size} bytes)")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._columns = self._parse(size)
        except Exception:
            try:
                self._mmap.close()
            except BufferError:  # the refused columns are still referenced (the traceback): freed with them
                pass
            raise
        self.count = int(self._columns["shard"].shape[0])
        self.key_offsets = self._columns["key_offsets"]
        self.key_blob = self._columns["key_blob"]
        self.caption_offsets = self._columns["caption_offsets"]
        self.caption_blob = self._columns["caption_blob"]

    def _parse(self, size: int) -> dict[str, np.ndarray]:
        mm = self._mmap
        if mm[:8] != MAGIC:
            raise TableError(f"{self.path} is not a latent table (bad magic)")
        room = int.from_bytes(mm[8:16], "little")
        if not 0 < room <= size - 16:
            raise TableError(f"{self.path} is truncated or damaged (header of {room} bytes in a {size}-byte file)")
        try:
            header = json.loads(bytes(mm[16 : 16 + room]))
            count, layout, total = int(header["count"]), header["columns"], int(header["bytes"])
        except (ValueError, KeyError, TypeError) as err:
            raise TableError(f"{self.path} has a damaged header ({err})") from err
        if total != size:
            raise TableError(f"{self.path} is truncated or damaged ({size} bytes, its header says {total})")
        columns: dict[str, np.ndarray] = {}
        for name in ("key_offsets", "key_blob", *COLUMNS, *CAPTIONS):
            if name in CAPTIONS and not set(CAPTIONS) & set(layout):  # no captions: every row's is None
                starts = name == "caption_offsets"
                columns[name] = np.zeros(count + 1 if starts else 0, dtype="<i8" if starts else np.uint8)
                continue
            if name in OPTIONAL and name not in layout:
                width = COLUMNS[name][1]
                columns[name] = np.full((count, width) if width > 1 else (count,), -1, dtype=COLUMNS[name][0])
                continue
            try:
                dtype, shape, offset = layout[name]
                array = np.frombuffer(mm, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=int(offset))
            except (KeyError, ValueError, TypeError) as err:
                raise TableError(f"{self.path} has a damaged column {name!r} ({err})") from err
            columns[name] = array.reshape(shape)
        rows = {name: columns[name].shape[0] for name in COLUMNS}
        if set(rows.values()) != {count} or columns["key_offsets"].shape[0] != count + 1:
            raise TableError(f"{self.path} is damaged: columns of unequal length")
        offsets = columns["key_offsets"]
        if offsets[0] != 0 or offsets[-1] != columns["key_blob"].shape[0] or (count and np.any(np.diff(offsets) < 1)):
            raise TableError(f"{self.path} is damaged: key offsets out of order")
        captions = columns["caption_offsets"]
        if (
            columns["caption_blob"].ndim != 1 or captions.shape != (count + 1,) or captions[0] != 0
            or captions[-1] != columns["caption_blob"].shape[0] or (count and np.any(np.diff(captions) < 0))
        ):  # fmt: skip
            raise TableError(f"{self.path} is damaged: caption offsets out of order")
        return columns

    def column(self, name: str) -> np.ndarray:
        return self._columns[name]

    def key_bytes(self, i: int) -> bytes:
        start, end = self.key_offsets[i : i + 2]
        return self.key_blob[start : end - 1].tobytes()

    def key(self, i: int) -> str:
        return self.key_bytes(i).decode("utf-8")

    def caption(self, i: int) -> str | None:
        """Row ``i``'s caption, or None when it has none."""
        start, end = (int(v) for v in self.caption_offsets[i : i + 2])
        return None if end == start else self.caption_blob[start : end - 1].tobytes().decode("utf-8")

    def iter_key_bytes(self, chunk: int = 65536) -> Iterator[bytes]:
        """Every key as bytes, in order, made a chunk at a time (no list of all keys)."""
        for start in range(0, self.count, chunk):
            stop = min(start + chunk, self.count)
            offsets = self.key_offsets[start : stop + 1].tolist()
            blob = self.key_blob[offsets[0] : offsets[-1]].tobytes()
            base = offsets[0]
            for i in range(stop - start):
                yield blob[offsets[i] - base : offsets[i + 1] - base - 1]

    def iter_keys(self) -> Iterator[str]:
        for key in self.iter_key_bytes():
            yield key.decode("utf-8")

    def same_keys(self, keys: Sequence[str]) -> bool:
        """Whether ``keys`` (sorted) are exactly this table's keys: one comparison of blobs, no object per key."""
        if len(keys) != self.count:
            return False
        joined = memoryview(("\0".join(keys) + "\0").encode("utf-8") if keys else b"")
        if len(joined) != len(self.key_blob):
            return False
        step = 1 << 22
        return all(self.key_blob[i : i + step].tobytes() == joined[i : i + step] for i in range(0, len(joined), step))

    def find(self, key: str) -> int:
        """The row of ``key``, or -1 (binary search)."""
        try:
            target = key.encode("utf-8")
        except UnicodeEncodeError:
            return -1
        i = bisect.bisect_left(_KeyView(self), target)
        return i if i < self.count and self.key_bytes(i) == target else -1

    def close(self) -> None:
        self._columns = {}
        try:
            self._mmap.close()
        except BufferError:  # a caller still holds a view; the mapping is freed with it
            pass


class _KeyView(Sequence[bytes]):
    def __init__(self, table: Table) -> None:
        self.table = table

    def __len__(self) -> int:
        return self.table.count

    def __getitem__(self, i: Any) -> Any:
        return self.table.key_bytes(i)
