""":class:`TrainingDataset`: latent stores as a trainer reads them, each latent with SDXL's conditioning.

Each item is the latent (with a store encoded with ``flip``, the mirrored one on a seeded coin per item and
epoch; with ``distribution``, a fresh draw from the stored distribution each epoch) together with
``original_size``, ``crops_coords_top_left`` and ``target_size`` (``[2]`` tensors, ``[B, 2]`` once batched),
and ``time_ids``, the six numbers that diffusers' ``train_text_to_image_sdxl.py`` passes to the UNet as
``add_time_ids``, and the entry's caption. Several stores train together, each repeated a whole number of
times per epoch (kohya's and SimpleTuner's ``repeats``). Every random choice is a function of
``(seed, epoch, store, key, repeat)`` only, so that all DDP ranks and DataLoader workers agree and a run is
reproducible; the epoch comes with the index from :class:`~vae_toolkit.store.BucketBatchSampler`, so that
it reaches DataLoader workers that outlive an epoch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._checks import check_int
from .store import EpochIndex, LatentStore

logger = logging.getLogger(__name__)

# What the stores of one training set must share: latents of one latent space.
_SAME = ("latent_channels", "scaling_factor", "shift_factor")


def _draw(seed: int, epoch: int, name: str, what: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{epoch}\0{what}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TrainingDataset(Dataset):
    """Items ``{"key", "store", "latent", "flipped", "original_size", "crops_coords_top_left", "target_size",
    "time_ids", "caption"}``.

    Args:
        store: A :class:`LatentStore`, or a list of them to train on together (of one latent space: the same
            ``latent_channels``, ``scaling_factor`` and ``shift_factor``).
        repeats: How many times each store's latents come per epoch: one int per store (or one int for all;
            None: 1). Index ``i`` of store ``s`` and repeat ``r`` is ``start(s) + r * len(store) + i``.
        flip: Use the mirrored latent on a seeded coin per item and epoch (each item independently, so about
            half of them; every repeat of an image flips its own coin). None: for each store that holds
            mirrored latents. Its crop corner is the crop's in the mirrored image: ``left = W' - w - left``.
        seed: Seeds the flips and the draws from a stored distribution; epoch ``e`` draws anew.

    The epoch of an item is the one its index carries (:class:`EpochIndex`, from
    :class:`BucketBatchSampler`, whose :meth:`~BucketBatchSampler.set_epoch` is the one that counts), else the
    one of :meth:`set_epoch` (indexing ``view[i]`` by hand). Sizes are ``(height, width)`` as int64 tensors of
    shape ``[2]``, so that the DataLoader batches them into ``[B, 2]``; ``time_ids`` is
    ``torch.cat([original_size, crops_coords_top_left, target_size])`` in float32. ``"store"`` is the index of
    the item's store in :attr:`stores`, ``"caption"`` the entry's caption, ``""`` when it has none (the
    DataLoader cannot batch None; ``store.entry(key)`` tells no caption from an empty one). Batch it with
    ``BucketBatchSampler(view, ...)`` so that a batch has one shape.

    Raises:
        ValueError: ``flip=True`` with a store without mirrored latents; stores of different latent spaces;
            reading an entry that was stored before the conditioning was recorded.

    Example:
        >>> view = TrainingDataset([LatentStore("photos"), LatentStore("faces")], repeats=[1, 3])  # doctest: +SKIP
        >>> item = view[0]
        >>> item["latent"].shape, item["time_ids"]
        (torch.Size([4, 128, 96]), tensor([1365., 1024., 0., 0., 1024., 768.]))
    """

    def __init__(
        self,
        store: LatentStore | Sequence[LatentStore],
        *,
        repeats: int | Sequence[int] | None = None,
        flip: bool | None = None,
        seed: int = 0,
    ) -> None:
        stores = (store,) if isinstance(store, LatentStore) else store
        if not isinstance(stores, (list, tuple)) or not all(isinstance(s, LatentStore) for s in stores):
            raise TypeError(f"store must be a LatentStore or a list of them, got {type(store).__name__}: {store!r}")
        if not stores:
            raise ValueError("store: give at least one LatentStore")
        stores = tuple(stores)
        self.repeats = _repeats(repeats, len(stores))
        check_int("seed", seed, 0)
        if flip is not None and not isinstance(flip, bool):
            raise TypeError(f"flip must be True, False or None, got {flip!r}")
        if flip:
            for s in stores:
                if not s.flips:
                    raise ValueError(f"{s.path} holds no mirrored latents; encode with --flip, or pass flip=False")
        for s in stores[1:]:
            _check_same_space(stores[0], s)
        self.stores: tuple[LatentStore, ...] = stores
        self.store = stores[0]
        #: Whether each store's items flip.
        self.flips = tuple(s.flips if flip is None else flip for s in stores)
        self.flip = self.flips[0] if len(set(self.flips)) == 1 else None
        self.seed, self.epoch = seed, 0
        sizes = [len(s) * r for s, r in zip(stores, self.repeats, strict=True)]
        self._starts = np.cumsum([0, *sizes], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Draw the flips and samples of epoch ``epoch`` for plain int indices (``view[i]``)."""
        check_int("epoch", epoch, 0)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shapes(self) -> np.ndarray:
        """The latents' shapes ``(C, h, w)``, one row per index (:attr:`LatentStore.shapes` for one store)."""
        if len(self.stores) == 1 and self.repeats[0] == 1:
            return self.store.shapes
        out = np.concatenate([np.tile(s.shapes, (r, 1)) for s, r in zip(self.stores, self.repeats, strict=True)])
        out.flags.writeable = False
        return out

    def locate(self, index: int) -> tuple[int, int, int]:
        """``(store, row, repeat)`` of ``index``: the item is ``stores[store][row]``, repeat ``repeat``."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"indices are ints, got {type(index).__name__}: {index!r}")
        n = len(self)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a training set of {n} latents")
        i %= n
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        offset = i - int(self._starts[part])
        length = len(self.stores[part])
        return part, offset % length, offset // length

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch = index.epoch if isinstance(index, EpochIndex) else self.epoch
        part, row, repeat = self.locate(index)
        store = self.stores[part]
        key = store.key(row)
        name = key if part == 0 and repeat == 0 else f"{key}\0{part}\0{repeat}"
        flipped = self.flips[part] and _draw(self.seed, epoch, name, "flip") % 2 == 1
        if store.distributions:
            generator = torch.Generator().manual_seed(_draw(self.seed, epoch, name, "sample"))
            latent = store.sample(key, generator, flipped=flipped)
        else:
            latent = store.get(key, flipped=flipped)
        entry = store.entry(key)
        original, resized, crop = entry["original_size"], entry["resized_size"], entry["crops_coords_top_left"]
        if original is None or resized is None or crop is None:
            raise ValueError(
                f"{key!r} in {store.path} was stored before the original size and crop were recorded; encode the "
                "images again into a new store folder to train with them"
            )
        target = entry["target_size"]
        if flipped:
            crop = (crop[0], resized[1] - target[1] - crop[1])
        caption = entry.get("caption")
        return {
            "key": key,
            "store": part,
            "latent": latent,
            "flipped": flipped,
            "original_size": torch.tensor(original, dtype=torch.int64),
            "crops_coords_top_left": torch.tensor(crop, dtype=torch.int64),
            "target_size": torch.tensor(target, dtype=torch.int64),
            "time_ids": torch.tensor(original + crop + target, dtype=torch.float32),
            "caption": "" if caption is None else caption,
        }

    def __repr__(self) -> str:
        if len(self.stores) == 1 and self.repeats == (1,):
            stores = repr(self.store)
        else:
            stores = f"[{', '.join(map(repr, self.stores))}], repeats={list(self.repeats)}"
        return f"TrainingDataset({stores}, flip={self.flip}, seed={self.seed}, epoch={self.epoch})"


def _repeats(repeats: int | Sequence[int] | None, count: int) -> tuple[int, ...]:
    if repeats is None:
        return (1,) * count
    if isinstance(repeats, int) and not isinstance(repeats, bool):
        check_int("repeats", repeats, 1)
        return (repeats,) * count
    if not isinstance(repeats, (list, tuple)):
        raise TypeError(f"repeats must be an int or a list of ints, one per store, got {type(repeats).__name__}")
    if len(repeats) != count:
        raise ValueError(f"repeats must hold one int per store ({count}), got {len(repeats)}: {list(repeats)}")
    for r in repeats:
        check_int("repeats", r, 1)
    return tuple(repeats)


def _check_same_space(first: LatentStore, other: LatentStore) -> None:
    for name in _SAME:
        a, b = first.metadata.get(name), other.metadata.get(name)
        if a != b:
            raise ValueError(
                f"{other.path} holds latents of another latent space than {first.path} ({name}: {b!r}, not {a!r}); "
                "train together only on stores encoded with one VAE"
            )
