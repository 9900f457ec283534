"""The store as a reader: :class:`LatentStore` (a lazy read-only mapping and a ``Dataset``) and
:class:`BucketBatchSampler` (its indices, :class:`EpochIndex`, carry the epoch).

Opening reads the index and memory-maps the per-key table (:mod:`vae_toolkit._table`); a latent is read from
its shard at the recorded offset when asked for. Writing a store is :mod:`vae_toolkit.encoding`'s; its files,
:mod:`vae_toolkit.store_files`'.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from . import _table
from ._checks import check_int
from .store_files import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    REBUILD,
    SHARD_RE,
    STORE_DTYPES,
    StoreDamagedError,
    index_problem,
    table_problem,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


class LatentStore(Mapping[str, torch.Tensor], Dataset):
    """A latent store opened read-only: a mapping ``key -> latent`` and a ``torch.utils.data.Dataset``.

    Opening reads the small index and memory-maps the per-key table: no Python object per key is made, so
    a store of millions of latents opens in milliseconds, and forked DataLoader workers share the table
    instead of copying it. A latent is read from its shard at the recorded byte offset when asked for. As a
    dataset, ``store[i]`` is the latent of the i-th key in sorted order (``store.key(i)`` names it);
    :class:`BucketBatchSampler` batches latents of equal shape. ``store.metadata`` holds the model, its
    scaling and shift factors, dtype and the settings of the run; ``store.entry(key)`` the image size used
    and the source file's size and mtime; ``store.failures`` the images that could not be encoded.

    Opening checks the table's SHA-256 against the index (and the index's own checksum), so a damaged table is
    refused rather than misread; each read checks that the latent's bytes lie inside its shard's tensor data.
    The shards' data is checked in full by ``encode --verify``. A store opened before a later encode run keeps
    serving what it had (shards are never changed, only replaced); if a shard it had not read yet was replaced
    meanwhile, reading raises a :class:`StoreDamagedError` that says to open the store again (or, when the
    shard was deleted, to run the encode command again).

    Example:
        >>> store = LatentStore("photos-latents")  # doctest: +SKIP
        >>> z = store["holiday/beach.jpg"]                # scaled latents, as latents.encode returns them
        >>> loader = torch.utils.data.DataLoader(store, batch_size=16, shuffle=True)  # with --size
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        index_path = self.path / INDEX_NAME
        rebuild = REBUILD.format(out=self.path)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if self.path.is_dir() and any(SHARD_RE.match(p.name) for p in self.path.iterdir()):
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
        problem = index_problem(index)
        if problem is not None:
            raise ValueError(f"{index_path} is damaged ({problem}); {rebuild}")
        table_path = self.path / index["table"]["file"]
        try:
            size = table_path.stat().st_size
            if size != index["table"]["bytes"]:
                raise _table.TableError(f"{table_path} has {size} bytes, the index recorded {index['table']['bytes']}")
            # Every byte of the table, once: a changed offset or key would serve another image's latent.
            # SHA-256 of a 1M-entry table (~100 MB): ~0.13 s here, within the 0.3 s that opening may take.
            if _table.sha256_file(table_path) != index["table"]["sha256"]:
                raise _table.TableError(f"{table_path} does not match its checksum in the index")
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
        problem = table_problem(index, self._table)
        if problem is not None:
            self._table.close()
            raise StoreDamagedError(errno.EIO, f"{table_path} does not match the index ({problem}); {rebuild}")

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
        """The latent of ``key`` (a str), or of the ``key``-th key in sorted order (an int).

        A store of the ``distribution`` gives its mean, scaled as a latent (``(mean - shift) * scale``).
        """
        return self._latent(self._row(key), False)

    @property
    def flips(self) -> bool:
        """Whether the store holds each image's mirrored latent too (``encode --flip``)."""
        return bool(self.metadata.get("flip", False))

    @property
    def distributions(self) -> bool:
        """Whether the store holds each latent's distribution, mean and std (``encode --distribution``)."""
        return bool(self.metadata.get("distribution", False))

    def _blocks(self) -> int:
        return (2 if self.flips else 1) * (2 if self.distributions else 1)

    def get(self, key: str | int, default: Any = None, *, flipped: bool = False) -> Any:
        """The latent of ``key`` (``default`` when it is not stored, as a mapping's ``get``); ``flipped=True``:
        the latent of the horizontally mirrored image (a store encoded with ``flip``).

        Raises:
            ValueError: ``flipped=True`` on a store encoded without ``flip``.
        """
        try:
            row = self._row(key)
        except (KeyError, IndexError):
            return default
        return self._latent(row, flipped)

    def _latent(self, row: int, flipped: bool) -> torch.Tensor:
        if self.distributions:
            mean, _ = self._distribution(row, flipped)
            return (mean - self._shift) * self._scale
        return self._read_block(row, self._variant(flipped), 1)

    def distribution(self, key: str | int, *, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the latent distribution of ``key`` (unscaled, float32), from a ``--distribution`` store.

        Raises:
            ValueError: the store holds latents, not distributions (or no flips, with ``flipped=True``).
        """
        return self._distribution(self._row(key), flipped)

    def _distribution(self, row: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.distributions:
            raise ValueError(f"{self.path} holds latents, not their distribution; encode with --distribution")
        both = self._read_block(row, 2 * self._variant(flipped), 2).float()
        half = both.shape[0] // 2
        return both[:half], both[half:]

    def sample(
        self, key: str | int, generator: torch.Generator | None = None, *, flipped: bool = False
    ) -> torch.Tensor:
        """A latent drawn from the stored distribution: ``(mean + std * noise - shift) * scale`` (float32).

        The noise comes from ``generator`` (a CPU generator the caller seeds, e.g. per epoch); on a store of
        latents (no ``--distribution``) the stored latent is returned as it is.
        """
        row = self._row(key)
        if not self.distributions:
            return self._latent(row, flipped)
        mean, std = self._distribution(row, flipped)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise - self._shift) * self._scale

    @property
    def _scale(self) -> float:
        return float(self.metadata.get("scaling_factor") or 1.0)

    @property
    def _shift(self) -> float:
        return float(self.metadata.get("shift_factor") or 0.0)

    def _variant(self, flipped: bool) -> int:
        if not isinstance(flipped, bool):
            raise TypeError(f"flipped must be True or False, got {flipped!r}")
        if flipped and not self.flips:
            raise ValueError(f"{self.path} holds no mirrored latents; encode with --flip to store them")
        return int(flipped)

    def _read_block(self, row: int, first: int, count: int) -> torch.Tensor:
        """Channel blocks ``first .. first + count - 1`` of the row's tensor (one block per stored variant)."""
        t = self._table
        blocks = self._blocks()
        shard = int(t.column("shard")[row])
        offset, nbytes = int(t.column("offset")[row]), int(t.column("nbytes")[row])
        dtype = STORE_DTYPES[int(t.column("dtype")[row])]
        channels, h, w = (int(v) for v in t.column("shape")[row])
        record = self._shards[shard]
        begin, end = 8 + int(record["header_bytes"]), int(record["bytes"])
        if offset < begin or offset + nbytes > end or nbytes != channels * h * w * dtype.itemsize:
            raise StoreDamagedError(  # the table was checked at open: a last guard that costs nothing
                errno.EIO,
                f"the latent of {t.key(row)!r} lies outside the tensor data of its shard {record['file']} (bytes "
                f"{offset}-{offset + nbytes} of {begin}-{end}); {REBUILD.format(out=self.path)}: it rebuilds it",
            )
        shape = (channels // blocks * count, h, w)
        if blocks > 1:
            offset, nbytes = offset + nbytes // blocks * first, nbytes // blocks * count
        buffer = bytearray(nbytes)
        got = self._read(shard, offset, buffer)
        if got != nbytes:
            raise StoreDamagedError(
                errno.EIO,
                f"latent shard {self.path / self._shards[shard]['file']} is truncated or damaged (read {got} of "
                f"{nbytes} bytes at {offset}); {REBUILD.format(out=self.path)}: it encodes them again",
            )
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
            rebuild = REBUILD.format(out=self.path)
            try:
                handle: Any = os.open(path, os.O_RDONLY) if hasattr(os, "preadv") else open(path, "rb")
            except FileNotFoundError:
                if self._still_current():  # deleted or lost: opening again cannot bring it back
                    raise StoreDamagedError(
                        errno.ENOENT, f"latent shard {path} is missing; {rebuild}: it encodes its latents again"
                    ) from None
                raise StoreDamagedError(
                    errno.ENOENT,
                    f"latent shard {path} is gone: the store changed since it was opened (a later encode run "
                    "replaced it); open it again with LatentStore(...)",
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

    def _still_current(self) -> bool:
        """Whether the index on disk is still the one this store opened (same table file)."""
        try:
            index = json.loads((self.path / INDEX_NAME).read_text(encoding="utf-8"))
            return bool(index["table"]["file"] == self._table.path.name)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def key(self, index: int) -> str:
        """The ``index``-th key in sorted order (the key of ``store[index]``)."""
        return self._table.key(self._row(index))

    def entry(self, key: str) -> dict[str, Any]:
        """What the table records for ``key``.

        ``size`` [w, h] encoded, ``source_bytes``, ``source_mtime_ns``, and SDXL's conditioning:
        ``original_size`` (H, W) of the file, ``crops_coords_top_left`` (top, left) of the crop in the image
        resized to ``resized_size`` (H', W'), and ``target_size`` (h, w) encoded. The conditioning is None for
        entries written before it was recorded (vae-toolkit 0.2.0). ``caption``: the sample's caption as read
        when its image was encoded (a folder image's ``NAME.txt``, a tar sample's ``KEY.txt`` or its ``KEY.json``'s
        ``"caption"``, a Parquet row's ``--caption-column``), None when it has none (or was stored before captions
        were).
        """
        if not isinstance(key, str):
            raise TypeError(f"keys are str (image paths relative to the source), got {key!r}")
        row = self._row(key)
        t = self._table
        w, h = (int(v) for v in t.column("size")[row])
        original, resized, crop = (_pair(t.column(name)[row]) for name in ("original_size", "resized_size", "crop"))
        return {
            "size": [w, h],
            "source_bytes": int(t.column("source_bytes")[row]),
            "source_mtime_ns": int(t.column("source_mtime_ns")[row]),
            "original_size": original,
            "resized_size": resized,
            "crops_coords_top_left": crop,
            "target_size": (h, w),
            "caption": t.caption(row),
        }

    @property
    def shapes(self) -> np.ndarray:
        """The latents' shapes ``(C, h, w)`` as a read-only ``[len(store), 3]`` int array (memory-mapped).

        With ``flip`` or ``distribution``, ``C`` is one latent's channels (a copy of the table's column).
        """
        shapes = self._table.column("shape")
        blocks = self._blocks()
        if blocks == 1:
            return shapes
        out = np.array(shapes)
        out[:, 0] //= blocks
        out.flags.writeable = False
        return out

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


def _pair(values: np.ndarray) -> tuple[int, int] | None:
    a, b = (int(v) for v in values)
    return None if a < 0 else (a, b)


def _close(handle: Any) -> None:
    if isinstance(handle, int):
        os.close(handle)
    else:
        handle.close()


class EpochIndex(int):
    """A dataset index that carries the epoch it is drawn for: ``int(i)`` is the index, ``i.epoch`` the epoch.

    :class:`BucketBatchSampler` yields these, so that the epoch travels with each index to wherever the item is
    built. A DataLoader with ``persistent_workers=True`` keeps one copy of the dataset per worker for the whole
    run, and ``set_epoch`` on the main process's copy never reaches them; :class:`TrainingDataset` reads the
    epoch from the index instead. Anything that takes an int index (``store[i]``, a list, an array) takes it.
    """

    epoch: int

    def __new__(cls, index: int, epoch: int) -> EpochIndex:
        value = super().__new__(cls, index)
        value.epoch = int(epoch)
        return value

    def __reduce__(self) -> tuple[type[EpochIndex], tuple[int, int]]:  # sent to DataLoader workers
        return (EpochIndex, (int(self), self.epoch))

    def __repr__(self) -> str:
        return f"EpochIndex({int(self)}, epoch={self.epoch})"


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose latents have the same shape, shuffled and seeded (aspect-ratio buckets).

    A store encoded without ``size`` holds latents of several shapes, which ``torch.stack`` cannot batch.
    This sampler groups the indices by shape (from the store's memory-mapped table: no Python object per
    key), shuffles within each group and then the order of the batches, with a generator seeded by
    ``seed + epoch`` (call :meth:`set_epoch` each epoch). ``store`` is a :class:`LatentStore`, a
    :class:`TrainingDataset` (of one store or several, with repeats: batches then mix the stores, one shape per
    batch) or any dataset with a ``shapes`` array of one row per index.

    **Short batches.** Each shape's indices are cut into batches of ``batch_size``; the last batch of a shape
    holds the rest (1 to ``batch_size - 1`` indices), so an epoch has up to one short batch per shape. With
    ``drop_last=True`` those short batches are left out (at most ``batch_size - 1`` latents of each shape per
    epoch, other ones each epoch when shuffled).

    **Several processes (DDP).** Pass ``num_replicas`` (the world size) and ``rank``: every process draws the
    same batches and takes every ``num_replicas``-th. Every rank gets the same number of batches, ``len(self)``,
    every epoch, as collective operations (DDP's gradient all-reduce) need: when the batches do not divide
    evenly, ``drop_last=False`` repeats the epoch's first batches (whole batches, one shape each) to fill the
    last round, so every latent is seen at least once and at most ``num_replicas - 1`` batches twice, as
    ``DistributedSampler`` repeats samples; ``drop_last=True`` leaves out the epoch's last batches instead (at
    most ``num_replicas - 1``), so no latent is seen twice. ``len(self)`` is the same every epoch.

    **The epoch travels with each index.** The indices are :class:`EpochIndex` ints that carry the sampler's
    epoch, which :class:`TrainingDataset` uses for its flips and draws, also in DataLoader workers that outlive
    an epoch (``persistent_workers=True``). Call :meth:`set_epoch` every epoch, also with ``shuffle=False``.

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
        store: Any,
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
        shapes = getattr(store, "shapes", None)
        if shapes is None:
            raise TypeError(
                "store must be a LatentStore, a TrainingDataset or a dataset with a shapes array (one row per "
                f"index), got {type(store).__name__}"
            )
        shapes = np.asarray(shapes)
        if shapes.ndim != 2 or len(shapes) != len(store):
            raise ValueError(
                f"store.shapes must hold one row per index ({len(store)}), got an array of shape {shapes.shape}"
            )
        if len(shapes):
            _, group = np.unique(shapes, axis=0, return_inverse=True)
            self._group = group.reshape(-1)
        else:
            self._group = np.zeros(0, dtype=np.int64)
        counts = np.bincount(self._group)
        per_shape = counts // batch_size if drop_last else -(-counts // batch_size)
        self._count = int(per_shape.sum())  # the epoch's batches before they are dealt to the ranks
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        if self._count and not len(self):
            logger.warning(
                "BucketBatchSampler: %d full batch(es) of %d for %d ranks leave no batch to any rank; lower "
                "batch_size or pass drop_last=False",
                self._count,
                batch_size,
                num_replicas,
            )

    def set_epoch(self, epoch: int) -> None:
        """Draw another order, and send ``epoch`` with the indices: epoch ``e`` uses the seed ``seed + e``."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
            raise TypeError(f"epoch must be an int >= 0, got {type(epoch).__name__}: {epoch!r}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
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
        if self.drop_last:  # leave out the last round's batches
            batches = batches[: len(batches) - len(batches) % self.num_replicas]
        elif batches:  # repeat the first batches to fill the last round
            batches += [batches[i % len(batches)] for i in range(-len(batches) % self.num_replicas)]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        for batch in self._batches():
            yield [EpochIndex(i, epoch) for i in batch.tolist()]

    def __len__(self) -> int:
        """The batches each rank gets per epoch (the same on every rank, every epoch)."""
        if self.drop_last:
            return self._count // self.num_replicas
        return -(-self._count // self.num_replicas)
