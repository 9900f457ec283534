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

The code lives in one module per step of an image's path, and this module gathers their public names
(``vae_toolkit.dataset.encode_dataset``, ``LatentStore``, ... stay importable from here):

- :mod:`vae_toolkit.sources`: where images come from (the source walk and keys);
- :mod:`vae_toolkit.batching`: how they are read on threads and batched by size (shared with ``evaluate``);
- :mod:`vae_toolkit.encoding`: :func:`encode_dataset`, from batches to shards;
- :mod:`vae_toolkit.store_files`: the store's format (files, lock, index, checks);
- :mod:`vae_toolkit.store_update`: planning a run and committing its shards into the table and index;
- :mod:`vae_toolkit.store`: the store as a reader (:class:`LatentStore`, :class:`BucketBatchSampler`);
- :mod:`vae_toolkit.buckets`: aspect-ratio buckets and each image's resize and crop (its SDXL conditioning);
- :mod:`vae_toolkit.training`: :class:`TrainingDataset`, latents with their conditioning, flips and draws.
"""

from __future__ import annotations

from .batching import default_workers, failure_reason, iter_batches, iter_images
from .buckets import CropPlan, bucket_sizes, choose_bucket, plan_crop, prepare_image
from .encoding import MULTIPLE, EncodeSummary, encode_dataset, sample_generator
from .sources import find_images
from .store import BucketBatchSampler, LatentStore
from .store_files import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    LOCK_NAME,
    StoreDamagedError,
    StoreLockedError,
    StoreMismatchError,
    check_store,
)
from .training import TrainingDataset

__all__ = [
    "BucketBatchSampler",
    "CropPlan",
    "TrainingDataset",
    "bucket_sizes",
    "choose_bucket",
    "plan_crop",
    "prepare_image",
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
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "LOCK_NAME",
    "MULTIPLE",
]
