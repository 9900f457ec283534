""":func:`encode_dataset`: from batches of images to the shards of a latent store.

It checks the arguments, plans the run (:mod:`vae_toolkit.store_update`) under the store's lock
(:mod:`vae_toolkit.store_files`), loads the model only when there is work, encodes the batches that
:mod:`vae_toolkit.batching` reads (halving a batch on out-of-memory), writes shards as they fill (and on
Ctrl-C or SIGTERM), and commits them; under torchrun each rank encodes its own part and rank 0 commits.
Reading a store is :mod:`vae_toolkit.store`'s.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import latents
from ._checks import DEFAULT_MAX_PIXELS, check_int
from ._dist import ProcessGroup
from ._encode_loop import ReadOptions, encode_items
from ._signals import sigterm_exits
from ._version import __version__
from .archives import (
    PARQUET,
    ArchivePlan,
    ArchiveSource,
    ReadLog,
    archive_source,
    check_parquet_available,
    iter_archive,
    plan_archives,
)
from .batching import Item, default_workers, share_cores
from .buckets import bucket_sizes, training_settings
from .latent_formats import crop_multiple, latent_format, supported_class
from .model_config import get_all_model_configs
from .sources import Source, scan_source
from .store_files import (
    FORMAT,
    FORMAT_VERSION,
    STORE_DTYPES,
    StoreMismatchError,
    StoreState,
    WriterLock,
    atomic_write,
    mismatch,
    normalise_settings,
    probe_writable,
    remove_store_files,
    scan_store,
    tidy,
    write_error,
)
from .store_update import Merge, Plan, commit_run, plan_run

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

MULTIPLE = 8  # images keep their size, center-cropped to a multiple of 8 (the SD / SDXL / FLUX downsampling)
EXIF_ORIENTATION = "applied"  # load_for_encoding turns images as their EXIF orientation says (the store records it)
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


@dataclass
class EncodeSummary:
    """What :func:`encode_dataset` did (over all ranks under torchrun).

    Attributes:
        output: The store folder.
        total: Images found in the input.
        encoded: Images encoded by this run.
        skipped: Images already in the store and unchanged (not encoded again).
        failed: ``key -> reason`` for images that could not be read or encoded (also in the index).
        seconds: Wall time of the run.
        shards: Shard files written by this run.
        rank: The torchrun rank that returned this summary (0 in a single process); the counts are the
            same on every rank.
        removed: Entries removed because their source file is gone (see ``keep_missing``).
        loaded_model: Whether the model was loaded (a run with nothing to encode does not load it).
        upscaled: Images of this run smaller than their bucket (``buckets``) or than ``size``, scaled up.
        verified: With ``verify=True``: listed shards whose whole file matched its SHA-256 (``None`` without).
        duplicates: Archive members read by this run that have the name of an earlier member of their shard
            (``tar -r`` / ``tar -u`` append such copies): the last one of a name is stored, one entry per name.
        size: The run's ``size`` (``None`` with buckets, or each image keeping its own size).
        too_small: ``key -> reason`` for images left out by ``min_size`` or ``no_upscale`` (not failures; also in
            the index, and not read again while unchanged). ``total`` = encoded + skipped + failed + too small.
    """

    output: Path
    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    shards: int = 0
    rank: int = 0
    removed: int = 0
    loaded_model: bool = False
    upscaled: int = 0
    verified: int | None = None
    duplicates: int = 0
    size: int | None = None
    too_small: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Encoded images per second of wall time."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        removed = f", {self.removed} removed (source file gone)" if self.removed else ""
        against = f"--size {self.size}" if self.size is not None else "their bucket"
        upscaled = f" ({self.upscaled} smaller than {against}, scaled up)" if self.upscaled else ""
        verified = f", {self.verified} shard(s) verified" if self.verified is not None else ""
        if self.duplicates:
            verified += f", {self.duplicates} duplicate name(s) (the last member of a name kept)"
        rate = f", {self.images_per_second:.1f} images/s" if self.encoded else ""  # no rate of nothing
        return (
            f"{self.total} images: {self.encoded} encoded{upscaled}, {self.skipped} already stored, "
            f"{len(self.failed)} failed{f', {len(self.too_small)} too small' if self.too_small else ''}{removed}"
            f"{verified} -> {self.output} ({self.shards} new shard(s)) in "
            f"{self.seconds:.1f} s{rate}"
        )


def sample_generator(seed: int, key: str, flipped: bool = False) -> torch.Generator:
    """The CPU generator whose noise ``encode_dataset(..., sample=True, seed=seed)`` uses for ``key``.

    ``latents.encode(vae, x, sample=True, generator=sample_generator(seed, key))`` reproduces the stored
    latent of that image, whatever the batch size or number of ranks of the run that stored it; with
    ``flip=True``, ``flipped=True`` gives the noise of the mirrored image's latent.
    """
    text = f"{int(seed)}\0{key}\0flipped" if flipped else f"{int(seed)}\0{key}"
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class _ShardWriter:
    """Collects latents and writes them as shards of at most ``max_bytes``, or every ``every`` seconds."""

    def __init__(
        self, folder: Path, run: str, rank: int, settings: dict[str, Any], max_bytes: int, every: float
    ) -> None:
        self.folder, self.run, self.rank = folder, run, rank
        self.settings_json = json.dumps(settings, sort_keys=True)
        self.max_bytes, self.every = max_bytes, every
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.nbytes = 0
        self.written: list[str] = []
        self.since = time.monotonic()

    def add(self, key: str, latent: torch.Tensor, entry: dict[str, Any]) -> None:
        self.tensors[key] = latent
        self.entries[key] = entry
        self.nbytes += latent.numel() * latent.element_size() + len(entry.get("caption") or "")  # captions: header
        if self.nbytes >= self.max_bytes or time.monotonic() - self.since >= self.every:
            self.flush()

    def flush(self) -> None:
        self.since = time.monotonic()
        if not self.tensors:
            return
        from safetensors.torch import save

        name = f"latents-{self.run}-r{self.rank:03d}-{len(self.written):05d}.safetensors"
        metadata = {
            "format": FORMAT,
            "settings": self.settings_json,
            "created": str(time.time_ns()),
            "entries": json.dumps(self.entries, sort_keys=True),
        }
        atomic_write(self.folder / name, save(self.tensors, metadata=metadata))
        logger.debug("wrote %s (%d latents, %d bytes)", name, len(self.tensors), self.nbytes)
        self.written.append(name)
        self.tensors, self.entries, self.nbytes = {}, {}, 0


class _Encoder:
    """Encodes batches of equal-size images; halves the batch on out-of-memory, down to one image."""

    def __init__(
        self,
        vae: Any,
        sample: bool,
        seed: int,
        store_dtype: torch.dtype,
        flip: bool = False,
        distribution: bool = False,
        tile: bool = False,
    ) -> None:
        self.vae, self.sample, self.seed, self.store_dtype = vae, sample, seed, store_dtype
        self.flip, self.distribution, self.tile = flip, distribution, tile
        self.limits: dict[tuple[int, ...], int] = {}  # image shape -> batch size that fitted after an OOM

    def __call__(
        self, items: list[Item], x: torch.Tensor | None = None
    ) -> tuple[list[tuple[Item, torch.Tensor]], dict[str, str]]:
        """Encode ``items`` (``x``: their images already stacked, as :func:`stacked_batches` gives them)."""
        shape = tuple(items[0].image.shape)
        done: list[tuple[Item, torch.Tensor]] = []
        failed: dict[str, str] = {}
        start = 0
        while start < len(items):
            n = min(self.limits.get(shape, len(items)), len(items) - start)
            chunk = items[start : start + n]
            try:
                z = self._encode(chunk, None if x is None else x[start : start + n])
            except _OOM_ERRORS as err:
                _free_cached_memory()
                if n == 1:
                    failed[chunk[0].key] = (
                        f"out of memory encoding one {shape[2]}x{shape[1]} image: {' '.join(str(err).split())[:200]}; "
                        "use a smaller size (--size), free GPU memory, or a float16 VAE"
                    )
                    logger.warning("out of memory encoding %s alone; skipped", chunk[0].key)
                    start += 1
                    continue
                self.limits[shape] = max(1, n // 2)
                logger.warning(
                    "out of memory encoding a batch of %d images of %dx%d; retrying with batches of %d",
                    n, shape[2], shape[1], self.limits[shape],
                )  # fmt: skip
                continue
            for item, latent in zip(chunk, z, strict=True):
                if bool(torch.isfinite(latent).all()):
                    done.append((item, latent))
                else:  # never stored: a NaN latent would poison every batch a trainer draws it into
                    failed[item.key] = (
                        f"the model gave a latent with NaN or infinite values ({_dtype_name(_vae_dtype(self.vae))} "
                        "VAE); encode in float32 (--dtype float32), or use an fp16-safe VAE"
                    )
                    logger.warning("skipped %s: %s", item.key, failed[item.key])
            start += n
        return done, failed

    def _encode(self, chunk: list[Item], x: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One tensor per item: its latent, or ``[mean, std]`` (``distribution``), then the same of the mirrored
        image (``flip``), concatenated along the channels."""
        if x is None:
            x = torch.stack([item.image for item in chunk])
        n = len(chunk)
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        with torch.inference_mode():
            if self.distribution:
                z = torch.cat(latents.encode_distribution(self.vae, x, tile=self.tile), dim=1)
            else:
                generator = None
                if self.sample:
                    generator = [sample_generator(self.seed, item.key) for item in chunk]
                    if self.flip:
                        generator += [sample_generator(self.seed, item.key, flipped=True) for item in chunk]
                z = latents.encode(self.vae, x, sample=self.sample, generator=generator, tile=self.tile)
        z = z.to(device="cpu", dtype=self.store_dtype)
        if self.flip:
            z = torch.cat([z[:n], z[n:]], dim=1)
        return [t.clone() for t in z.contiguous()]  # own storage: safetensors refuses tensors that share memory


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _vae_dtype(vae: Any) -> torch.dtype:
    dtype = getattr(vae, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(vae.parameters()).dtype


def _vae_device(vae: Any) -> torch.device:
    device = getattr(vae, "device", None)
    return device if isinstance(device, torch.device) else next(vae.parameters()).device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_model(vae: Any, size: int | None, bucket_step: int | None, sample: bool, distribution: bool) -> int:
    """The multiple the model's images are cropped to (its spatial factor, at least 8), after refusing a size or
    bucket step that is not one, and a sample or distribution of a model without a posterior."""
    fmt = latent_format(vae) if supported_class(vae) is not None else None
    multiple = crop_multiple([vae])
    name = type(vae).__name__
    if size is not None and size % multiple:
        raise ValueError(f"size {size} is not a multiple of {multiple}, the spatial factor of the model ({name}); "
                         f"pass a multiple of {multiple}")  # fmt: skip
    if bucket_step is not None and bucket_step % multiple:
        raise ValueError(f"bucket step {bucket_step} is not a multiple of {multiple}, the spatial factor of the "
                         f"model ({name}); pass --bucket-step {max(64, multiple)} or another multiple of "
                         f"{multiple}")  # fmt: skip
    if fmt is not None and not fmt.has_posterior and (sample or distribution):
        what = "--sample (sample=True)" if sample else "--distribution (distribution=True)"
        raise ValueError(f"{what} needs a model with a latent distribution; {fmt.class_name} encodes to one latent "
                         "(no posterior): drop the option")  # fmt: skip
    return multiple


def _settings(
    vae: Any,
    model: str | None,
    size: int | None,
    dtype: torch.dtype,
    sample: bool,
    seed: int,
    reader: str = "exact",
    training: dict[str, Any] | None = None,
    tile: bool = False,
) -> dict[str, Any]:
    """What a reader must know about the latents, and what must match for a store to be resumed."""
    from .vae_loader import weights_fingerprint

    config = getattr(vae, "config", None)
    fmt = latent_format(vae).to_dict() if supported_class(vae) is not None else None
    try:
        scale, shift = latents.scaling_factors(vae)
    except ValueError:  # normalised per channel or by batch-norm statistics: latent_format says how
        scale, shift = None, None
    name = model if model is not None else (getattr(config, "_name_or_path", None) or type(vae).__name__)
    registered = get_all_model_configs().get(name, {})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vae_toolkit_version": __version__,
        "model": name,
        "repo_id": registered.get("repo_id"),
        "subfolder": registered.get("subfolder"),
        "scaling_factor": scale,
        "shift_factor": shift,
        "latent_channels": fmt["latent_channels"] if fmt else getattr(config, "latent_channels", None),
        "class_name": fmt["class_name"] if fmt else type(vae).__name__,
        "latent_format": fmt,
        "dtype": _dtype_name(dtype),
        "vae_dtype": _dtype_name(_vae_dtype(vae)),
        "size": size,
        "sample": bool(sample),
        "seed": int(seed) if sample else None,
        "reader": reader,
        "weights": weights_fingerprint(name),
        "exif_orientation": EXIF_ORIENTATION,
        "tile": bool(tile),
        **(training or {}),
    }


def encode_dataset(
    vae: AutoencoderKL | Callable[[], AutoencoderKL],
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    model: str | None = None,
    size: int | None = None,
    batch_size: int = 8,
    sample: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    workers: int | None = None,
    max_shard_size: int = 256 * 2**20,
    overwrite: bool = False,
    progress: bool = True,
    exact_resize: bool = False,
    checkpoint_every: float = 60.0,
    keep_missing: bool = False,
    device: str | torch.device | None = None,
    buckets: int | None = None,
    bucket_step: int = 64,
    max_aspect: float = 4.0,
    flip: bool = False,
    distribution: bool = False,
    verify: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    image_column: str = "image",
    key_column: str | None = None,
    tile: bool = False,
    no_upscale: bool = False,
    min_size: int | None = None,
    caption_column: str | None = None,
) -> EncodeSummary:
    """Encode every image of a folder (recursively) or a list of files into a latent store at ``output``.

    The latents are stored scaled, exactly as :func:`vae_toolkit.latents.encode` returns them for
    ``load_for_encoding(path, size, exact=exact_resize)`` alone (with ``buckets``, for
    :func:`vae_toolkit.buckets.prepare_image`'s image). Running the same call again resumes: images
    already stored (and unchanged on disk) are skipped, and the model is not even loaded when there is
    nothing to encode (pass a loader function as ``vae``). Under torchrun (``WORLD_SIZE > 1``) call it on every
    rank with the same arguments and the VAE on the rank's own device; the ranks split the images and rank 0
    writes the index.

    Args:
        vae: A loaded ``AutoencoderKL`` (any device and dtype), or a function without arguments that loads
            it (called only when there is work; then ``model`` is required).
        source: A folder of images (searched recursively) or a list of image files; keys are paths
            relative to the folder (for a list, to the files' common folder). Or tar shards (webdataset's
            layout) or Parquet files: a ``.tar``/``.parquet`` file, a folder holding them, a list of them, or
            a brace pattern (``"shards/{00000..00099}.tar"``); keys are the shard's relative path, ``/``, then
            the member's name (``00042.tar/000420123.jpg``) or the Parquet row's key
            (:mod:`vae_toolkit.archives`). A tar is read in one sequential pass, never unpacked.
        output: The store folder (created if needed).
        model: The model's name, recorded in the store (default: ``vae.config._name_or_path``).
        size: Resize the shorter side to ``size`` and center-crop ``size x size`` (as ``pil_to_tensor``);
            ``None`` keeps each image's size, center-cropped to a multiple of 8.
        batch_size: Images per ``encode`` call; only images of equal size share a batch.
        sample: Store a sample of the latent distribution instead of its mean.
        seed: With ``sample=True``, each image's noise comes from :func:`sample_generator` ``(seed, key)``.
        dtype: Dtype of the stored latents (float32 default; float16/bfloat16 halve the store; float64).
        workers: Image decoding threads (default :func:`default_workers`: the cores this process may use,
            divided among the ranks of the machine).
        max_shard_size: Bytes of latents per shard file.
        overwrite: Replace a store made with other settings (model, size, dtype, reader, sampling) instead
            of refusing it. A store made with the same settings is resumed either way.
        progress: Show a tqdm progress bar (images/s); on rank 0 only.
        exact_resize: With ``size``, resize from the full-resolution decode (exactly ``pil_to_tensor``);
            by default a large JPEG is decoded at a reduced DCT scale first (see :func:`load_for_encoding`).
            The store records the reader, and refuses the other one.
        checkpoint_every: Write the open shard at least every this many seconds, so that a kill loses at
            most this much work (plus the batch being encoded).
        keep_missing: Keep the entries of images no longer in ``source`` (a folder); by default a run
            removes them. Entries not in a list of files are always kept.
        device: With a loader function as ``vae``: the device it loads on (chooses the process group's
            backend under torchrun).
        buckets: Aspect-ratio buckets of about ``buckets x buckets`` pixels (instead of ``size``): each image
            is resized to cover the bucket nearest its aspect ratio and center-cropped to it (the rule:
            :mod:`vae_toolkit.buckets`; the list: :func:`vae_toolkit.buckets.bucket_sizes`).
        bucket_step: With ``buckets``: both sides of a bucket are multiples of it (default 64).
        max_aspect: With ``buckets``: the largest long side / short side of a bucket (default 4).
        flip: Also store the latent of the horizontally mirrored image (``store.get(key, flipped=True)``).
        distribution: Store the latent distribution's mean and std instead of one latent; a reader draws a
            sample (``store.sample(key, generator)``). Not with ``sample``.
        verify: Also read every listed shard in full and compare it with the SHA-256 the index records (every
            run checks sizes and header checksums only); a damaged shard is moved aside as ``*.corrupt`` and its
            images are encoded again. Costs one read of the whole store.
        max_pixels: An image whose header says more pixels is a failure, found before it is decoded (default
            89,478,485, PIL's decompression-bomb warning threshold); ``None`` for no limit.
        image_column: With Parquet files: the column holding the images (bytes, or ``{bytes, path}``).
        key_column: With Parquet files: the column whose value is the row's key (default: the row number).
        tile: Encode in tiles (the model's own tiling) images larger than its ``sample_size``. By default never:
            each latent is the whole image's, as diffusers' training scripts cache them and as
            ``latents.encode(vae, x, tile=False)`` gives it; recorded in the store.
        no_upscale: Never scale an image up (kohya's ``--no-upscale``): with ``buckets`` an image smaller than its
            bucket takes the largest bucket inside it, else its own size rounded down to the step; with ``size``
            an image whose shorter side is below ``size`` is left out as too small (the rule:
            :mod:`vae_toolkit.buckets`). Recorded in the store.
        min_size: Leave out as too small an image whose shorter side is below this many pixels. Recorded.
        caption_column: With Parquet files: a string column holding each row's caption. A folder image's caption
            is its ``NAME.txt``, a tar sample's its ``KEY.txt`` (or ``KEY.json``'s ``"caption"``); read when the
            image is encoded (an unchanged image keeps its stored caption) and given by ``store.entry(key)``.

    Returns:
        An :class:`EncodeSummary` with counts, failures and time (over all ranks).

    Raises:
        StoreMismatchError: (a ``ValueError``) ``output`` holds latents made with other settings.
        StoreLockedError: another run is writing ``output``.
        FileNotFoundError: ``source`` does not exist (or a shard of a brace pattern).
        ImportError: a Parquet source without pyarrow (``pip install "vae-toolkit[parquet]"``).
        NotADirectoryError: ``output`` is a file.
        OSError: ``output`` cannot be written (the message names the path), checked before the model loads.
        ValueError / TypeError: bad arguments, or no images found.

    Example:
        >>> vae, device = VAELoader().load_sd_vae("sd15")  # doctest: +SKIP
        >>> summary = encode_dataset(vae, "photos/", "photos-latents/", model="sd15", size=512)
        >>> store = LatentStore("photos-latents/")
        >>> store["holiday/beach.jpg"].shape
        torch.Size([4, 64, 64])
    """
    start = time.perf_counter()
    check_int("batch_size", batch_size, 1)
    check_int("size", size, MULTIPLE, allow_none=True)
    if size is not None and size % MULTIPLE:
        raise ValueError(f"size must be a multiple of {MULTIPLE}, got {size}")
    check_int("workers", workers, 1, allow_none=True)
    check_int("max_shard_size", max_shard_size, 1)
    check_int("seed", seed, 0)
    check_int("max_pixels", max_pixels, 1, allow_none=True)
    if not isinstance(image_column, str) or not image_column:
        raise TypeError(f"image_column must be a column name, got {image_column!r}")
    for name, column in (("key_column", key_column), ("caption_column", caption_column)):
        if column is not None and (not isinstance(column, str) or not column):
            raise TypeError(f"{name} must be a column name or None, got {column!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float)):
        raise TypeError(f"checkpoint_every must be a number of seconds, got {checkpoint_every!r}")
    if not checkpoint_every > 0 or checkpoint_every == float("inf"):
        raise ValueError(f"checkpoint_every must be a finite number of seconds > 0, got {checkpoint_every}")
    training = training_settings(size, buckets, bucket_step, max_aspect, flip, distribution, sample, no_upscale,
                                 min_size)  # fmt: skip
    bucket_list = None if buckets is None else bucket_sizes(buckets, bucket_step, max_aspect)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(_dtype_name, STORE_DTYPES))}, got {dtype!r}")
    loaded = isinstance(vae, torch.nn.Module)
    if not loaded and not callable(vae):
        raise TypeError(f"vae must be an AutoencoderKL or a function that loads one, got {type(vae).__name__}")
    if not loaded and model is None:
        raise ValueError("model is required when vae is a loader function (it is recorded in the store)")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} is a file; pass a folder for the latent store")
    reader = "exact" if exact_resize or (size is None and buckets is None) else "fast"
    if not isinstance(tile, bool):
        raise TypeError(f"tile must be True or False, got {tile!r}")
    settings = _settings(vae, model, size, dtype, sample, seed, reader, training, tile) if loaded else None
    if settings is not None:
        known = {k: settings[k] for k in ("model", "weights")}
    else:
        from .vae_loader import weights_fingerprint

        known = {"model": model, "weights": weights_fingerprint(str(model))}  # checked before the model loads
    known.update({
        "dtype": _dtype_name(dtype),
        "size": size,
        "sample": bool(sample),
        "seed": int(seed) if sample else None,
        "reader": reader,
        "exif_orientation": EXIF_ORIENTATION,
        "tile": tile,
        **training,
    })  # fmt: skip
    workers = workers if workers is not None else default_workers()
    vae_device = _vae_device(vae) if loaded else torch.device(device if device is not None else "cpu")

    dist = ProcessGroup.from_env(vae_device)
    lock: WriterLock | None = None
    merge: Merge | None = None
    try:
        prepared: tuple[Plan, ArchivePlan | None] | BaseException
        columns = (image_column, key_column, caption_column)
        if dist.rank == 0:
            try:
                lock, plan, merge, archived = _prepare(out, source, known, overwrite, keep_missing, verify, columns)
                prepared = (plan, archived)
            except Exception as err:
                prepared = err
        else:
            prepared = RuntimeError("unset")
        prepared = dist.broadcast(prepared)
        if isinstance(prepared, BaseException):
            raise prepared
        plan, archived = prepared
        summary = EncodeSummary(output=out, total=plan.total, skipped=plan.skipped, removed=plan.removed,
                                rank=dist.rank, verified=plan.verified if verify else None)  # fmt: skip
        if plan.up_to_date:
            summary.failed = dict(sorted(plan.failures.items()))
            summary.too_small = {k: v["reason"] for k, v in plan.too_small.items()}
            summary.seconds = time.perf_counter() - start
            logger.info("nothing to encode: all %d images are stored in %s", plan.total, out)
            return summary
        if plan.todo and not loaded:
            vae = vae()
            loaded = True
            summary.loaded_model = True
        multiple = 8
        if loaded:
            multiple = _check_model(vae, size, bucket_step if buckets is not None else None, sample, distribution)
            settings = _settings(vae, model, size, dtype, sample, seed, reader, training, tile)
        else:  # nothing to encode, only the index to update: the stored settings stand
            settings = _stored_settings(merge) if dist.rank == 0 else {}
        if plan.stored_settings is not None and loaded:
            problems = mismatch(plan.stored_settings, settings)
            if problems and not overwrite:
                raise StoreMismatchError(out, problems)
            if not problems and not overwrite:
                _warn_unknown_weights(out, plan.stored_settings, settings)
            if problems:  # differs in what only the loaded model tells (its dtype or factors): replan from empty
                if dist.rank == 0:
                    assert merge is not None
                    merge.state.close()
                    logger.info("overwrite: removed %d file(s) of the previous store in %s",
                                remove_store_files(out), out)  # fmt: skip
                    plan, merge, archived = _plan(StoreState(), _scan(source, columns), keep_missing)
                plan, archived = dist.broadcast((plan, archived))
                summary.skipped, summary.removed = plan.skipped, 0
        todo = plan.todo
        mine = todo[dist.rank :: dist.world_size]
        share_cores(workers)
        share = f"; rank {dist.rank} of {dist.world_size} takes {len(mine)}" if dist.world_size > 1 else ""
        if archived is None:
            logger.info("encoding %d of %d images (%d already stored) into %s%s",
                        len(todo), plan.total, plan.skipped, out, share)  # fmt: skip
        else:  # members are only known once read
            logger.info("reading %d of %d shard(s) (%d image(s) of the others already stored) into %s%s", len(todo),
                        len(todo) + len(archived.records), plan.skipped, out, share)  # fmt: skip
        writer = _ShardWriter(out, uuid.uuid4().hex[:12], dist.rank, settings, max_shard_size, checkpoint_every)
        encoded, failed, upscaled = 0, dict[str, str](), 0
        log = ReadLog()
        if mine:
            encoder = _Encoder(vae, sample, seed, dtype, flip, distribution, tile)
            unit = "shards" if archived is not None else "images"
            desc = "encode" if dist.world_size == 1 else f"encode (rank 0's share: {len(mine)} of {len(todo)} {unit})"
            items: Iterable[tuple[str, Any]]
            if archived is None:
                items, count = [(key, plan.root / key) for key in mine], len(mine)
            else:
                members = iter_archive(archived, archived.tasks[dist.rank :: dist.world_size], log)
                items, count = ((key, (stat, data, key)) for key, stat, data in members), None
            with sigterm_exits():  # SIGTERM ends the run as Ctrl-C does: shards flushed, exit 143
                try:
                    options = ReadOptions(size, bucket_list, exact_resize, max_pixels, no_upscale, min_size,
                                          bucket_step, max_aspect, multiple)  # fmt: skip
                    show = progress and dist.rank == 0
                    encoded, failed, upscaled = encode_items(items, options, batch_size, workers, encoder, writer,
                                                             show, desc, count, log)  # fmt: skip
                finally:  # also on Ctrl-C, SIGTERM or an error: keep what was encoded, the next run resumes from it
                    writer.flush()
        dist.barrier()  # all shards are on disk
        results = dist.gather((encoded, failed, writer.written, upscaled, log))
        failures = {k: v for _, f, _, _, _ in results for k, v in f.items()}
        failures.update(plan.failures)
        too_small = {**plan.too_small, **{k: v for r in results for k, v in r[4].too_small.items()}}
        if dist.rank == 0:
            assert merge is not None
            records = None
            if archived is not None:  # shards read to their end this run, and the complete ones not opened
                records = dict(archived.records)
                for r in results:
                    records.update(r[4].complete)
                records = dict(sorted(records.items()))
            commit_run(out, merge, [name for r in results for name in r[2]], settings, failures, plan.root,
                       archives=records, too_small=too_small)  # fmt: skip
        dist.barrier()  # the index exists when encode_dataset returns on any rank
        if archived is not None:  # members are only known once read
            summary.total += sum(r[4].seen for r in results)
            summary.skipped += sum(r[4].stored for r in results)
            summary.duplicates = sum(r[4].duplicates for r in results)
        summary.encoded = sum(r[0] for r in results)
        summary.upscaled = sum(r[3] for r in results)
        summary.size = size
        summary.failed = dict(sorted(failures.items()))
        summary.too_small = {k: v["reason"] for k, v in sorted(too_small.items())}
        summary.shards = sum(len(r[2]) for r in results)
        summary.seconds = time.perf_counter() - start
        return summary
    finally:
        if merge is not None:
            merge.state.close()
        if lock is not None:
            lock.release()
        dist.close()


def _warn_unknown_weights(out: Path, stored: dict[str, Any], settings: dict[str, Any]) -> None:
    if stored.get("weights") is None and settings.get("weights") is not None:
        logger.warning(
            "%s records no model weights (written before stores recorded them): the new latents are added, but "
            "whether the stored ones were made with the same weights cannot be checked; pass --overwrite "
            "(overwrite=True) to encode everything again",
            out,
        )


def _prepare(
    out: Path,
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    known: dict[str, Any],
    overwrite: bool,
    keep_missing: bool,
    verify: bool = False,
    columns: tuple[str, str | None, str | None] = ("image", None, None),
) -> tuple[WriterLock | None, Plan, Merge, ArchivePlan | None]:
    """Rank 0, before any model loads: lock the store, walk the source once, read the store, plan the work.

    A store with nothing to do is left exactly as it was (nothing is written), so a rerun works on read-only
    media too.
    """
    src = _scan(source, columns)
    lock: WriterLock | None = None
    if out.is_dir() or _can_create(out):
        lock = WriterLock(out).acquire()
    try:
        writable = lock is not None and lock.writable
        state = scan_store(out, verify=verify)
        problems = mismatch(state.settings, known) if state.settings is not None else []
        if problems and not overwrite:
            state.close()
            raise StoreMismatchError(out, problems)
        if problems:
            state.close()
            if not writable:
                raise PermissionError(errno.EACCES, f"cannot write to {out} (read-only) to replace the store")
            logger.info("overwrite: removed %d file(s) of the previous store in %s", remove_store_files(out), out)
            state = StoreState()
        plan, merge, archived = _plan(state, src, keep_missing)
        plan.verified = state.verified
        if plan.up_to_date:
            tidy(state, writable)
            return lock, plan, merge, archived
        if not writable:
            state.close()
            raise PermissionError(
                errno.EACCES,
                f"cannot write to {out}: it is read-only or not writable, and {len(plan.todo)} image(s) need "
                "encoding; choose a writable output folder",
            )
        assert lock is not None
        lock.claim()
        probe_writable(out)
        tidy(state, writable)
        return lock, plan, merge, archived
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _scan(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], columns: tuple[str, str | None, str | None]
) -> Source | ArchiveSource:
    """The source's listing: its archives (tar, Parquet), else its image files."""
    archives = archive_source(source, *columns)
    if archives is None:
        if columns[2] is not None:
            raise ValueError(f"caption_column ({columns[2]}) is for Parquet files; a folder image's caption is its "
                             "NAME.txt beside it")  # fmt: skip
        return scan_source(source)
    if archives.kind == PARQUET:
        check_parquet_available()
    return archives


def _plan(
    state: StoreState, src: Source | ArchiveSource, keep_missing: bool
) -> tuple[Plan, Merge, ArchivePlan | None]:
    if isinstance(src, ArchiveSource):
        return plan_archives(state, src, keep_missing)
    plan, merge = plan_run(state, src, keep_missing)
    return plan, merge, None


def _can_create(out: Path) -> bool:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return False
        raise write_error(out, err) from err
    return True


def _stored_settings(merge: Merge | None) -> dict[str, Any]:
    assert merge is not None
    state = merge.state
    if state.index is not None:
        meta = state.index["metadata"]
        return {k: v for k, v in meta.items() if k not in ("count", "total_size", "source", "updated")}
    if state.orphans:
        return normalise_settings(state.orphans[-1].settings)
    return {}
