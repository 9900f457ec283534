"""One rank's share of an encode run: read (threads) -> group by size -> encode (this thread) -> shards.

:func:`encode_items` is the loop :func:`vae_toolkit.encoding.encode_dataset` runs over its images (or archive
members): each is prepared as :class:`ReadOptions` say (:func:`vae_toolkit.buckets.prepare_image`), with its
caption (a folder image's sidecar ``NAME.txt``, :func:`vae_toolkit.sources.read_caption`; an archive member's
from its sample, :mod:`vae_toolkit.archives`), read on the same thread as the image. Images of equal size are
batched and encoded, and each latent goes to the shard writer with its entry (sizes, source stat, crop plan,
caption). An image left out as too small is listed in the read log, with its source stat, not as a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .archives import MemberBytes, ReadLog
from .batching import Item, failure_reason, group_batches, read_ahead, stacked_batches
from .buckets import ImageTooSmallError, Prepared, prepare_image
from .sources import file_stat, read_caption
from .store_update import too_small_entry

logger = logging.getLogger(__name__)

Encoder = Callable[[list[Item], torch.Tensor], tuple[list[tuple[Item, torch.Tensor]], dict[str, str]]]


class Writer(Protocol):
    def add(self, key: str, latent: torch.Tensor, entry: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ReadOptions:
    """How each image is prepared (the arguments of :func:`vae_toolkit.buckets.prepare_image`)."""

    size: int | None = None
    buckets: list[tuple[int, int]] | None = None
    exact: bool = False
    max_pixels: int | None = None
    no_upscale: bool = False
    min_size: int | None = None
    bucket_step: int | None = None
    max_aspect: float | None = None
    multiple: int = 8  # without size or buckets: sides cropped to multiples of the model's spatial factor (>= 8)

    def prepare(self, source: Any) -> Prepared:
        return prepare_image(
            source, size=self.size, buckets=self.buckets, exact=self.exact, max_pixels=self.max_pixels,
            no_upscale=self.no_upscale, min_size=self.min_size, bucket_step=self.bucket_step,
            max_aspect=self.max_aspect, multiple=self.multiple,
        )  # fmt: skip


def encode_items(
    items: Iterable[tuple[str, Any]],
    options: ReadOptions,
    batch_size: int,
    workers: int,
    encoder: Encoder,
    writer: Writer,
    progress: bool,
    desc: str,
    total: int | None = None,
    log: ReadLog | None = None,
) -> tuple[int, dict[str, str], int]:
    """Read, group, encode, write; returns ``(encoded, failures, upscaled)``; images too small go to ``log``.

    ``items`` are ``(key, path)``, or ``(key, (stat, bytes or exception, key))`` for an archive's members: those
    are produced one at a time on the reading thread (a tar read in one pass), and decoded on the threads.
    """
    from tqdm.auto import tqdm

    log = log if log is not None else ReadLog()
    failed: dict[str, str] = {}
    encoded = upscaled = 0
    captions: dict[str, str | None] = {}  # of the items read and not written yet

    # A shard may hold several members of one name (tar -r, tar -u): the last one read is stored. ``latest`` holds
    # such names (bounded by the duplicates) -> the generation of the last one read; an earlier one still in a
    # size group when a later one has been read is not written, and one written before is replaced at the merge.
    latest: dict[str, int] = {}
    written_again: set[str] = set()

    def read(
        path: Path | tuple[tuple[int, int], bytes | Exception, str],
    ) -> tuple[tuple[int, int], Prepared, int, str | None]:
        if isinstance(path, tuple):  # a member of a tar or a Parquet row
            stat, data, key = path
            if isinstance(data, Exception):
                raise data
            try:
                prepared = options.prepare(MemberBytes(data, key))
            except ImageTooSmallError as err:
                err.stat = stat
                raise
            return stat, prepared, getattr(data, "generation", 0), getattr(data, "caption", None)
        stat = file_stat(path)
        try:
            prepared = options.prepare(path)
        except ImageTooSmallError as err:
            err.stat = stat
            raise
        return stat, prepared, 0, read_caption(path)

    def prepared() -> Iterator[tuple[str, Item | Exception]]:
        for key, result in read_ahead(items, read, workers, max(2 * batch_size, 2 * workers)):
            if isinstance(result, Exception):
                yield key, result
            else:
                stat, image, generation, caption = result
                if generation:
                    latest[key] = generation
                captions[key] = caption
                yield key, Item(key, stat, image.image, image.plan, generation)

    bar = tqdm(total=total, desc=desc, unit="image", disable=not progress, dynamic_ncols=True)
    try:
        batches = group_batches(prepared(), batch_size)
        with closing(stacked_batches(batches)) as assembled:  # closed at once on an exception: the helper stops
            for batch in assembled:
                if isinstance(batch[0], str):
                    key, err = batch
                    if isinstance(err, ImageTooSmallError):
                        log.too_small[key] = too_small_entry(str(err), err.stat)
                        logger.info("left out %s: %s", key, err)
                    else:
                        failed[key] = failure_reason(err)
                        logger.warning("skipped %s: %s", key, failed[key])
                    bar.update(1)
                    continue
                chunk, x = batch
                done, errors = encoder(chunk, x)
                for item, z in done:
                    caption = captions.pop(item.key, None) if item.generation >= latest.get(item.key, 0) else None
                    if item.key in latest:
                        if item.generation < latest[item.key]:  # a later member of this name was read
                            continue
                        failed.pop(item.key, None)
                        log.too_small.pop(item.key, None)
                        if item.key in written_again:
                            encoded -= 1  # one entry per name: an earlier member's latent is replaced
                        written_again.add(item.key)
                    encoded += 1
                    entry: dict[str, Any] = {
                        "size": [int(item.image.shape[-1]), int(item.image.shape[-2])],
                        "source_bytes": item.stat[0],
                        "source_mtime_ns": item.stat[1],
                    }
                    if item.plan is not None:
                        entry.update(original_size=list(item.plan.original), resized_size=list(item.plan.resized),
                                     crop=list(item.plan.crop))  # fmt: skip
                        upscaled += item.plan.upscaled
                    if caption is not None:
                        entry["caption"] = caption
                    writer.add(item.key, z, entry)
                for key in errors:
                    captions.pop(key, None)
                failed.update(errors)
                bar.update(len(chunk))
    finally:
        bar.close()
    return encoded, failed, upscaled
