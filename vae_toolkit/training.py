""":class:`TrainingDataset`: a latent store as a trainer reads it, each latent with SDXL's conditioning.

Each item is the latent (the mirrored one for half the items of an epoch, with a store encoded with ``flip``;
a fresh draw from the stored distribution each epoch, with ``distribution``) together with
``original_size``, ``crops_coords_top_left`` and ``target_size``, and ``time_ids``, the six numbers that
diffusers' ``train_text_to_image_sdxl.py`` passes to the UNet as ``add_time_ids``. Every random choice is a
function of ``(seed, epoch, key)`` only, so that all DDP ranks and DataLoader workers agree and a run is
reproducible.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._checks import check_int
from .store import LatentStore

logger = logging.getLogger(__name__)


def _draw(seed: int, epoch: int, key: str, what: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{epoch}\0{what}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class TrainingDataset(Dataset):
    """Items ``{"key", "latent", "flipped", "original_size", "crops_coords_top_left", "target_size", "time_ids"}``.

    Args:
        store: A :class:`LatentStore`.
        flip: Use the mirrored latent for a seeded half of the items each epoch (None: when the store holds
            them). Its crop corner is the crop's in the mirrored image: ``left = W' - w - left``.
        seed: Seeds the flips and the draws from a stored distribution; epoch ``e`` draws anew
            (:meth:`set_epoch`).

    Sizes are ``(height, width)`` tuples; ``time_ids`` is
    ``torch.tensor(original_size + crops_coords_top_left + target_size)`` (float32). Batch it with
    ``BucketBatchSampler(store, ...)`` (same indices) so that a batch has one shape.

    Raises:
        ValueError: ``flip=True`` on a store without mirrored latents; reading an entry that was stored before
            the conditioning was recorded.

    Example:
        >>> view = TrainingDataset(LatentStore("latents"), seed=0)  # doctest: +SKIP
        >>> item = view[0]
        >>> item["latent"].shape, item["time_ids"]
        (torch.Size([4, 128, 96]), tensor([1365., 1024., 0., 0., 1024., 768.]))
    """

    def __init__(self, store: LatentStore, *, flip: bool | None = None, seed: int = 0) -> None:
        if not isinstance(store, LatentStore):
            raise TypeError(f"store must be a LatentStore, got {type(store).__name__}")
        check_int("seed", seed, 0)
        if flip is None:
            flip = store.flips
        if not isinstance(flip, bool):
            raise TypeError(f"flip must be True, False or None, got {flip!r}")
        if flip and not store.flips:
            raise ValueError(f"{store.path} holds no mirrored latents; encode with --flip, or pass flip=False")
        self.store, self.flip, self.seed, self.epoch = store, flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the flips and samples of epoch ``epoch`` (call it on every rank before each epoch)."""
        check_int("epoch", epoch, 0)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def shapes(self) -> np.ndarray:
        """The latents' shapes, as :attr:`LatentStore.shapes`."""
        return self.store.shapes

    def __getitem__(self, index: int) -> dict[str, Any]:
        store = self.store
        key = store.key(index)
        flipped = self.flip and _draw(self.seed, self.epoch, key, "flip") % 2 == 1
        if store.distributions:
            generator = torch.Generator().manual_seed(_draw(self.seed, self.epoch, key, "sample"))
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
        return {
            "key": key,
            "latent": latent,
            "flipped": flipped,
            "original_size": original,
            "crops_coords_top_left": crop,
            "target_size": target,
            "time_ids": torch.tensor(original + crop + target, dtype=torch.float32),
        }

    def __repr__(self) -> str:
        return f"TrainingDataset({self.store!r}, flip={self.flip}, seed={self.seed}, epoch={self.epoch})"
