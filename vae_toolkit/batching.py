"""How images are read and batched, for ``encode`` and ``evaluate`` alike.

:func:`iter_images` decodes files on threads, a bounded window ahead, in input order, a bad file yielded as its
exception; :func:`iter_batches` groups them by size into batches; :func:`stacked_batches` runs that on a helper
thread that also stacks each batch, so that the model's thread only runs the model. The cores are shared
among the ranks of a machine (:func:`default_workers`, :func:`share_cores`). Where the images come from is
:mod:`vae_toolkit.sources`'; what is done with a batch, the caller's.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from .buckets import CropPlan
from .image_utils import ImageProcessingError, available_cpus, load_for_encoding
from .sources import file_stat

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


def default_workers() -> int:
    """Decoding threads for this process: the cores it may use, shared among the ranks of this machine.

    The cores are :func:`vae_toolkit.available_cpus` (the affinity mask and a cgroup's CPU quota, a
    container's or SLURM's limit); under torchrun they are divided by ``LOCAL_WORLD_SIZE``, so that the ranks
    of one machine do not each start a thread per core.
    """
    return max(1, available_cpus() // _local_world_size())


def _local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def share_cores(workers: int) -> None:
    """Each rank of this machine takes its share of the cores, as torchrun's ``OMP_NUM_THREADS`` intends.

    Under torchrun with ``OMP_NUM_THREADS`` unset, torch's threads are limited to ``cores / LOCAL_WORLD_SIZE``;
    a warning says when the threads asked for clearly exceed the cores (one run was ~100x slower so).
    """
    cores, local = available_cpus(), _local_world_size()
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cores // local))
    threads = torch.get_num_threads()
    if local * threads > 2 * cores or local * workers > 4 * cores:
        logger.warning(
            "oversubscribed: %d process(es) on this machine each use %d torch and %d decoding threads on %d cores; "
            "set OMP_NUM_THREADS and --workers so that their sum stays near the core count",
            local, threads, workers, cores,
        )  # fmt: skip


@dataclass
class Item:
    key: str
    stat: tuple[int, int]
    image: torch.Tensor
    plan: CropPlan | None = None  # how the image was resized and cropped (its conditioning)
    generation: int = 0  # a later archive member of the same name: 1, 2, ... (the last one is stored)


T = TypeVar("T")
R = TypeVar("R")


def read_ahead(
    items: Iterable[tuple[str, T]], work: Callable[[T], R], workers: int, window: int
) -> Iterator[tuple[str, R | Exception]]:
    """``work(source)`` for each ``(key, source)`` on ``workers`` threads, ``window`` ahead, in input order.

    ``items`` is consumed on the calling thread as results are taken (a tar stream is read so, one member at a
    time); a failure is yielded as its exception.
    """
    pending: deque[tuple[str, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vae_toolkit_read") as pool:
        it = iter(items)
        try:
            for key, source in it:
                pending.append((key, pool.submit(work, source)))
                if len(pending) >= window:
                    break
            while pending:
                key, future = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.submit(work, nxt[1])))
                try:
                    result = future.result()
                except Exception as err:  # a bad file: reported, never stops the run
                    yield key, err
                else:
                    yield key, result
        finally:
            for _, future in pending:
                future.cancel()
            close = getattr(it, "close", None)
            if close is not None:
                close()


def group_batches(
    prepared: Iterable[tuple[str, Item | Exception]], batch_size: int
) -> Iterator[list[Item] | tuple[str, Exception]]:
    """Batches of items of equal image shape (at most ``batch_size``), or ``(key, exception)``.

    Items wait for a full batch of their size; when ``4 * batch_size`` wait over all sizes, the fullest
    partial batch goes, so memory stays bounded.
    """
    buckets: dict[tuple[int, ...], list[Item]] = {}
    held = 0
    max_held = 4 * batch_size
    for key, item in prepared:
        if isinstance(item, Exception):
            yield key, item
            continue
        shape = tuple(item.image.shape)
        bucket = buckets.setdefault(shape, [])
        bucket.append(item)
        held += 1
        if len(bucket) >= batch_size:
            held -= len(bucket)
            yield buckets.pop(shape)
        elif held >= max_held:  # many sizes at once: the fullest partial batch
            fullest = max(buckets, key=lambda s: len(buckets[s]))
            held -= len(buckets[fullest])
            yield buckets.pop(fullest)
    for shape in list(buckets):
        yield buckets.pop(shape)


def iter_images(
    items: Sequence[tuple[str, str | os.PathLike[str]]],
    size: int | None = None,
    *,
    exact_resize: bool = False,
    workers: int | None = None,
    window: int | None = None,
    max_pixels: int | None = None,
    multiple: int = 8,
) -> Iterator[tuple[str, tuple[int, int] | None, torch.Tensor | Exception]]:
    """Read images on threads, at most ``window`` ahead, and yield them in input order.

    Each image is read by :func:`vae_toolkit.load_for_encoding` ``(path, size, exact=exact_resize)``, the
    reader of ``encode`` (and ``evaluate``). A file that cannot be read is yielded as its exception, so that
    one bad file never stops the caller.

    Args:
        items: ``(key, path)`` pairs.
        size: As in :func:`encode_dataset`.
        exact_resize: Resize from the full-resolution decode (``pil_to_tensor``'s values) instead of JPEG DCT scaling.
        workers: Decoding threads (default :func:`default_workers`).
        window: Images decoded ahead (default ``2 * workers``).
        max_pixels: An image whose header says more pixels fails before it is decoded (``None``: no limit).
        multiple: Without ``size``: sides cropped to multiples of it (the model's spatial factor, at least 8).

    Yields:
        ``(key, (file size, mtime in ns), [3, H, W] tensor)``, or ``(key, None, exception)``.
    """
    workers = workers if workers is not None else default_workers()
    window = window if window is not None else 2 * workers

    def work(path: str | os.PathLike[str]) -> tuple[tuple[int, int], torch.Tensor]:
        stat = file_stat(Path(path))
        return stat, load_for_encoding(path, size, exact=exact_resize, max_pixels=max_pixels, multiple=multiple)

    for key, result in read_ahead(items, work, workers, window):
        if isinstance(result, Exception):
            yield key, None, result
        else:
            yield key, result[0], result[1]


def iter_batches(
    items: Sequence[tuple[str, str | os.PathLike[str]]],
    size: int | None,
    batch_size: int,
    *,
    exact_resize: bool = False,
    workers: int | None = None,
    max_pixels: int | None = None,
    multiple: int = 8,
) -> Iterator[list[tuple[str, tuple[int, int], torch.Tensor]] | tuple[str, Exception]]:
    """Batches of images of equal size, read ahead on threads by :func:`iter_images`: what ``encode`` and
    ``evaluate`` run through a model.

    Yields a batch ``[(key, (file size, mtime), tensor), ...]`` (at most ``batch_size``, one shape), or
    ``(key, exception)`` for a file that could not be read. Images wait for a full batch of their size;
    when ``4 * batch_size`` wait over all sizes, the fullest partial batch goes, so memory stays bounded.
    """
    workers = workers if workers is not None else default_workers()
    window = max(2 * batch_size, 2 * workers)
    images = iter_images(items, size, exact_resize=exact_resize, workers=workers, window=window, max_pixels=max_pixels,
                         multiple=multiple)  # fmt: skip

    def prepared() -> Iterator[tuple[str, Item | Exception]]:
        for key, stat, result in images:
            if isinstance(result, Exception) or stat is None:
                yield key, result if isinstance(result, Exception) else RuntimeError("no stat")
            else:
                yield key, Item(key, stat, result)

    for batch in group_batches(prepared(), batch_size):
        yield batch if isinstance(batch, tuple) else [(item.key, item.stat, item.image) for item in batch]


def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(images)`` of equal-shape CPU tensors, copied by numpy on the calling thread.

    numpy copies without the GIL and on this thread only: ``torch.stack`` would start an OpenMP team of
    ``torch.get_num_threads()`` threads from a helper thread, beside the decoding threads that keep the cores
    busy. dtypes numpy lacks (bfloat16) are stacked by torch.
    """
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype)
    try:
        dst = out.numpy()
        for i, image in enumerate(images):
            np.copyto(dst[i], image.numpy(), casting="no")
    except (TypeError, RuntimeError):  # a dtype numpy does not have
        torch.stack(list(images), out=out)
    return out


class _Raised:
    def __init__(self, err: BaseException) -> None:
        self.err = err


_END = object()


def stacked_batches(
    batches: Iterator[list[tuple[str, tuple[int, int], torch.Tensor]] | list[Item] | tuple[str, Exception]],
) -> Generator[tuple[list[Item], torch.Tensor] | tuple[str, Exception], None, None]:
    """``batches`` run on a helper thread that also stacks each batch: the model's thread only encodes.

    Stacking a batch (50 MB for 16 images of 512²) on the model's thread left a GPU idle for as long as it
    took beside busy decoding threads (``benchmarks/gpu_feed.py``). The helper stays one batch ahead (a
    queue of one), so at most two more batches are held than without it. Each item's image becomes a view
    into the stacked tensor, so the batch's memory is held once. Errors in the helper are raised here;
    leaving the loop early (an exception, Ctrl-C, SIGTERM) stops the helper, which closes ``batches``.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if isinstance(batch, tuple):
                    out: Any = batch
                elif isinstance(batch[0], Item):  # Items keep their crop plans
                    x = _stack([item.image for item in batch])
                    out = ([Item(it.key, it.stat, x[i], it.plan, it.generation) for i, it in enumerate(batch)], x)
                else:
                    x = _stack([image for _, _, image in batch])
                    out = ([Item(key, stat, x[i]) for i, (key, stat, _) in enumerate(batch)], x)
                del batch
                if not put(out):
                    return
            put(_END)
        except BaseException as err:  # raised again in the consumer's thread
            put(_Raised(err))
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # a generator: iter_images cancels what it had submitted

    helper = threading.Thread(target=produce, name="vae_toolkit_batches", daemon=True)
    helper.start()
    try:
        while True:
            try:
                item = ready.get(timeout=0.1)
            except queue.Empty:
                if helper.is_alive() or not ready.empty():
                    continue
                raise RuntimeError("the batch reading thread ended without a result") from None
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.err
            yield item
            del item
    finally:
        stop.set()
        while helper.is_alive():
            try:
                ready.get(timeout=0.05)  # unblock a waiting put
            except queue.Empty:
                pass
        helper.join()


def failure_reason(err: BaseException) -> str:
    """One line for a file that could not be read: the library's message, or the exception's type and text."""
    text = " ".join(str(err).split())
    return text if isinstance(err, ImageProcessingError) else f"{type(err).__name__}: {text}"
