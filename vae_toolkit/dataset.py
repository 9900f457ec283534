"""Encode whole image folders to latents: a crash-safe, resumable store, on one device or many (torchrun).

:func:`encode_dataset` streams the images of a folder (or a list of files) through a VAE and writes the
*scaled* latents (exactly what :func:`vae_toolkit.latents.encode` returns) into safetensors shards plus
an index, in the style of the hub's sharded checkpoints::

    OUT/
      latents-<run>-r000-00000.safetensors       tensors named by the image path relative to the source
      latents-<run>-r000-00001.safetensors
      latents.safetensors.index.json             {"metadata": ..., "weight_map": {key: shard}, "entries": ...}

:class:`LatentStore` opens ``OUT`` as a lazy, memory-mapped, read-only mapping ``key -> latent`` that is
also a ``torch.utils.data.Dataset``.

How the properties hold:

- **Same values as one at a time.** Only images of equal size share a batch; with ``sample=True`` every
  image draws its noise from its own generator, seeded from ``(seed, key)`` (:func:`sample_generator`).
- **Bounded memory.** Images are decoded on threads ahead of the model through a bounded window; at most
  a few batches of images and one shard of latents are held at a time.
- **Crash-safe and resumable.** A shard is written to a temporary file, flushed, fsynced and renamed, so
  a shard on disk is always complete. Each shard carries its own entries (and the store's settings) in its
  header, so after a crash the next run rebuilds the state from the shards, skips every image already
  stored (unless its file's size or mtime changed) and writes the index at the end.
- **torchrun.** Under ``WORLD_SIZE > 1`` each rank encodes a disjoint, deterministic part of the images
  into its own shards; rank 0 writes the index after a barrier.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from . import __version__, latents
from .image_utils import ImageProcessingError, center_crop_to_multiple, image_extensions, open_image, pil_to_tensor
from .model_config import get_all_model_configs

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "EncodeSummary",
    "LatentStore",
    "StoreMismatchError",
    "check_store",
    "encode_dataset",
    "find_images",
    "sample_generator",
    "INDEX_NAME",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "latents.safetensors.index.json"
FORMAT = "vae-toolkit-latents"
FORMAT_VERSION = 1
MULTIPLE = 8  # images keep their size, center-cropped to a multiple of 8 (the SD / SDXL / FLUX downsampling)

_SHARD_RE = re.compile(r"^latents-[0-9a-f]{12}-r\d{3,}-\d{5,}\.safetensors$")
_TMP_SUFFIX = ".tmp"
# settings that change the stored values: a store made with other settings is refused
_COMPATIBLE = ("model", "scaling_factor", "shift_factor", "latent_channels", "dtype", "vae_dtype", "size", "sample",
               "seed")  # fmt: skip
_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


class StoreMismatchError(ValueError):
    """The output folder holds latents made with another model, image size, dtype or sampling."""


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
    """

    output: Path
    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    shards: int = 0
    rank: int = 0

    @property
    def images_per_second(self) -> float:
        """Encoded images per second of wall time."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.total} images: {self.encoded} encoded, {self.skipped} already stored, {len(self.failed)} failed "
            f"-> {self.output} ({self.shards} new shard(s)) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.1f} images/s"
        )


# --- inputs -----------------------------------------------------------------------------------------


def find_images(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> tuple[Path, list[str]]:
    """List the images to encode as ``(root, sorted keys)``; a key is a path relative to ``root``, with ``/``.

    Args:
        source: A folder (searched recursively; names starting with ``.`` are skipped; files are kept
            when PIL knows their extension) or a list of image files (``root`` is their common folder).

    Raises:
        FileNotFoundError: ``source`` (or a listed file) does not exist.
        ValueError: an empty list, or a folder without any image file.

    Example:
        >>> root, keys = find_images("photos")  # doctest: +SKIP
        >>> keys[:2]
        ['a.jpg', 'holiday/b.png']
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source).expanduser()
        if root.is_file():
            return root.parent.absolute(), [root.name]
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        extensions = image_extensions()
        keys = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(folder).relative_to(root)
            keys += [
                (rel / f).as_posix() for f in files if not f.startswith(".") and Path(f).suffix.lower() in extensions
            ]
        if not keys:
            raise ValueError(f"no image files found in {root} (searched recursively)")
        return root.absolute(), sorted(keys)
    paths = [Path(p).expanduser().absolute() for p in source]
    if not paths:
        raise ValueError("no image files given: pass a folder or a non-empty list of files")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
    root = Path(os.path.commonpath([p.parent for p in paths]))
    keys = sorted({p.relative_to(root).as_posix() for p in paths})
    return root, keys


def sample_generator(seed: int, key: str) -> torch.Generator:
    """The CPU generator whose noise ``encode_dataset(..., sample=True, seed=seed)`` uses for ``key``.

    ``latents.encode(vae, x, sample=True, generator=sample_generator(seed, key))`` reproduces the stored
    latent of that image, whatever the batch size or number of ranks of the run that stored it.
    """
    digest = hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _load(path: Path, size: int | None) -> torch.Tensor:
    """The ``[3, H, W]`` tensor of one image: resized + center-cropped to ``size``, or cropped to a multiple of 8."""
    rgb = open_image(path)
    if size is not None:
        return pil_to_tensor(rgb, target_size=size)
    return pil_to_tensor(center_crop_to_multiple(rgb, MULTIPLE))


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


# --- distributed --------------------------------------------------------------------------------------


@dataclass
class _Dist:
    """torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, read in one place; a process group when > 1 rank."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> _Dist:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but this torch build has no torch.distributed; run a single process"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        # ranks wait for each other only at the end of their part, which can differ by hours on a big dataset
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=24))
        logger.info("initialised torch.distributed (%s): rank %d of %d", backend, dist.get_rank(), world_size)
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


# --- store files ----------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) never sees a partial file."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _read_shard_header(path: Path) -> tuple[dict[str, Any], int, dict[str, dict[str, Any]]]:
    """``(store settings, creation time in ns, entries)`` from a shard's header (the tensors are not read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = set(f.keys())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path.name} is not a vae-toolkit latent shard")
    settings = json.loads(meta["settings"])
    entries = json.loads(meta["entries"])
    if set(entries) != names:
        raise ValueError(f"{path.name}: header entries do not match its tensors")
    return settings, int(meta.get("created", 0)), entries


def _read_index(folder: Path) -> dict[str, Any] | None:
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable index %s (%s); it is rebuilt from the shards", path, err)
        return None
    if not isinstance(index, dict) or index.get("metadata", {}).get("format") != FORMAT:
        logger.warning("ignoring %s: not a vae-toolkit latent index; it is rebuilt from the shards", path)
        return None
    return index


@dataclass
class _State:
    """What a store folder holds: its settings, and for every stored key the shard and the entry."""

    settings: dict[str, Any] | None = None
    stored: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # key -> (shard, entry)
    shards: list[str] = field(default_factory=list)  # oldest first


def _scan(folder: Path) -> _State:
    """Read the index, and the headers of the shards it does not list (written by an interrupted run).

    Shards are taken oldest first (the index's order, then the others by creation time), so a key that
    was encoded again (its file changed) maps to its newest latent.
    """
    state = _State()
    index = _read_index(folder)
    on_disk = {p.name for p in folder.iterdir() if _SHARD_RE.match(p.name)} if folder.is_dir() else set()
    listed: dict[str, dict[str, dict[str, Any]]] = {}  # shard -> {key: entry}, from the index
    if index is not None:
        state.settings = {k: index["metadata"].get(k) for k in _COMPATIBLE}
        for name in index.get("shards", []):
            listed[name] = {}
        for key, name in index.get("weight_map", {}).items():
            listed.setdefault(name, {})[key] = index["entries"][key]
    ordered: list[tuple[str, dict[str, dict[str, Any]]]] = [
        (name, entries) for name, entries in listed.items() if name in on_disk
    ]
    orphans = []
    for name in sorted(on_disk - set(listed)):
        try:
            settings, created, entries = _read_shard_header(folder / name)
        except Exception as err:
            logger.warning("ignoring unreadable shard %s: %s", folder / name, err)
            continue
        if state.settings is None:
            state.settings = {k: settings.get(k) for k in _COMPATIBLE}
        elif problems := _mismatch(state.settings, settings):
            raise StoreMismatchError(
                f"{folder} holds shards made with different settings ({name}: {'; '.join(problems)}); "
                "pass overwrite=True (--overwrite) to encode everything again"
            )
        orphans.append((created, name, entries))
    ordered += [(name, entries) for _, name, entries in sorted(orphans)]
    for name, entries in ordered:
        state.shards.append(name)
        for key, entry in entries.items():
            state.stored[key] = (name, entry)
    return state


def _mismatch(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """The settings of ``requested`` (those it has) that differ from ``stored``, one line each."""
    return [
        f"{k}: stored {stored.get(k)!r}, requested {requested[k]!r}"
        for k in _COMPATIBLE
        if k in requested and stored.get(k) != requested[k]
    ]


def _refusal(folder: Path, problems: list[str]) -> StoreMismatchError:
    return StoreMismatchError(
        f"{folder} holds latents made with other settings ({'; '.join(problems)}); "
        "use another output folder, or pass overwrite=True (--overwrite) to encode everything again"
    )


def check_store(output: str | os.PathLike[str], **settings: Any) -> dict[str, Any] | None:
    """Check that the store at ``output`` (if any) was made with ``settings``; return its settings.

    Only the settings given are compared (any of ``model``, ``size``, ``dtype``, ``vae_dtype``, ``sample``,
    ``seed``, ``scaling_factor``, ``shift_factor``, ``latent_channels``; dtypes as names like ``"float32"``),
    so a command can refuse a folder of another model before loading one.

    Returns:
        The store's settings, or ``None`` when ``output`` holds no store yet.

    Raises:
        StoreMismatchError: the store was made with other settings.
        NotADirectoryError: ``output`` is a file.
    """
    folder = Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output {folder} is a file; pass a folder for the latent store")
    unknown = set(settings) - set(_COMPATIBLE)
    if unknown:
        raise TypeError(f"check_store() got unknown settings {sorted(unknown)}; known: {', '.join(_COMPATIBLE)}")
    stored = _scan(folder).settings if folder.is_dir() else None
    if stored is None:
        return None
    problems = _mismatch(stored, settings)
    if problems:
        raise _refusal(folder, problems)
    return stored


def _is_temporary(name: str) -> bool:
    """A file :func:`_atomic_write` had not renamed yet: ``<shard or index name>.<8 hex>.tmp``."""
    base, _, rest = name.rpartition(".")[0].rpartition(".")
    return name.endswith(_TMP_SUFFIX) and len(rest) == 8 and (base == INDEX_NAME or bool(_SHARD_RE.match(base)))


def _remove_store_files(folder: Path) -> int:
    """Delete this library's files in ``folder`` (shards, temporary files, index); nothing else."""
    removed = 0
    for path in folder.iterdir():
        name = path.name
        if (_SHARD_RE.match(name) or name == INDEX_NAME or _is_temporary(name)) and path.is_file():
            path.unlink()
            removed += 1
    return removed


# --- the pipeline ---------------------------------------------------------------------------------


class _ShardWriter:
    """Collects latents and writes them as shards of at most ``max_bytes`` (atomically)."""

    def __init__(self, folder: Path, run: str, rank: int, settings: dict[str, Any], max_bytes: int) -> None:
        self.folder, self.run, self.rank = folder, run, rank
        self.settings_json = json.dumps(settings, sort_keys=True)
        self.max_bytes = max_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self.nbytes = 0
        self.written: list[str] = []

    def add(self, key: str, latent: torch.Tensor, entry: dict[str, Any]) -> None:
        self.tensors[key] = latent
        self.entries[key] = entry
        self.nbytes += latent.numel() * latent.element_size()
        if self.nbytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
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
        _atomic_write(self.folder / name, save(self.tensors, metadata=metadata))
        logger.debug("wrote %s (%d latents, %d bytes)", name, len(self.tensors), self.nbytes)
        self.written.append(name)
        self.tensors, self.entries, self.nbytes = {}, {}, 0


@dataclass
class _Item:
    key: str
    stat: tuple[int, int]
    image: torch.Tensor


def _prefetch(
    paths: Sequence[tuple[str, Path]], size: int | None, workers: int, window: int
) -> Iterator[tuple[str, tuple[int, int] | None, torch.Tensor | BaseException]]:
    """Decode images on ``workers`` threads, at most ``window`` ahead; yield them in input order."""

    def work(path: Path) -> tuple[tuple[int, int], torch.Tensor]:
        stat = _stat(path)
        return stat, _load(path, size)

    pending: deque[tuple[str, Future[tuple[tuple[int, int], torch.Tensor]]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vae_toolkit_encode") as pool:
        it = iter(paths)
        try:
            for key, path in it:
                pending.append((key, pool.submit(work, path)))
                if len(pending) >= window:
                    break
            while pending:
                key, future = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt[0], pool.submit(work, nxt[1])))
                try:
                    stat, image = future.result()
                except Exception as err:  # a bad file: reported, never stops the run
                    yield key, None, err
                else:
                    yield key, stat, image
        finally:
            for _, future in pending:
                future.cancel()


class _Encoder:
    """Encodes batches of equal-size images; halves the batch on out-of-memory, down to one image."""

    def __init__(self, vae: Any, sample: bool, seed: int, store_dtype: torch.dtype) -> None:
        self.vae, self.sample, self.seed, self.store_dtype = vae, sample, seed, store_dtype
        self.limits: dict[tuple[int, ...], int] = {}  # image shape -> batch size that fitted after an OOM

    def __call__(self, items: list[_Item]) -> tuple[list[tuple[_Item, torch.Tensor]], dict[str, str]]:
        shape = tuple(items[0].image.shape)
        done: list[tuple[_Item, torch.Tensor]] = []
        failed: dict[str, str] = {}
        start = 0
        while start < len(items):
            n = min(self.limits.get(shape, len(items)), len(items) - start)
            chunk = items[start : start + n]
            try:
                z = self._encode(chunk)
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
            done += list(zip(chunk, z, strict=True))
            start += n
        return done, failed

    def _encode(self, chunk: list[_Item]) -> list[torch.Tensor]:
        x = torch.stack([item.image for item in chunk])
        generator = [sample_generator(self.seed, item.key) for item in chunk] if self.sample else None
        with torch.inference_mode():
            z = latents.encode(self.vae, x, sample=self.sample, generator=generator)
        z = z.to(device="cpu", dtype=self.store_dtype).contiguous()
        return [t.clone() for t in z]  # own storage: safetensors refuses tensors that share memory


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


def _settings(
    vae: Any, model: str | None, size: int | None, dtype: torch.dtype, sample: bool, seed: int
) -> dict[str, Any]:
    """What a reader must know about the latents, and what must match for a store to be resumed."""
    config = getattr(vae, "config", None)
    scale, shift = latents.scaling_factors(vae)
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
        "latent_channels": getattr(config, "latent_channels", None),
        "dtype": _dtype_name(dtype),
        "vae_dtype": _dtype_name(_vae_dtype(vae)),
        "size": size,
        "sample": bool(sample),
        "seed": int(seed) if sample else None,
    }


def _check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


_STORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def encode_dataset(
    vae: AutoencoderKL,
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
) -> EncodeSummary:
    """Encode every image of a folder (recursively) or a list of files into a latent store at ``output``.

    The latents are stored scaled, exactly as :func:`vae_toolkit.latents.encode` returns them for each
    image alone. Running the same call again resumes: images already stored (and unchanged on disk) are
    skipped. Under torchrun (``WORLD_SIZE > 1``) call it on every rank with the same arguments and the
    VAE on the rank's own device; the ranks split the images and rank 0 writes the index.

    Args:
        vae: A loaded ``AutoencoderKL`` (any device and dtype), e.g. from ``VAELoader().load_sd_vae(...)``.
        source: A folder of images (searched recursively) or a list of image files; keys are paths
            relative to the folder (for a list, to the files' common folder).
        output: The store folder (created if needed).
        model: The model's name, recorded in the store (default: ``vae.config._name_or_path``).
        size: Resize the shorter side to ``size`` and center-crop ``size x size`` (as ``pil_to_tensor``);
            ``None`` keeps each image's size, center-cropped to a multiple of 8.
        batch_size: Images per ``encode`` call; only images of equal size share a batch.
        sample: Store a sample of the latent distribution instead of its mean.
        seed: With ``sample=True``, each image's noise comes from :func:`sample_generator` ``(seed, key)``.
        dtype: Dtype of the stored latents (float32 default; float16/bfloat16 halve the store).
        workers: Image decoding threads (default: the CPU count, at most 8).
        max_shard_size: Bytes of latents per shard file; also the most work a crash can lose.
        overwrite: Delete a store made with other settings (model, size, dtype, sampling) instead of
            refusing it, and encode everything again.
        progress: Show a tqdm progress bar (images/s); on rank 0 only.

    Returns:
        An :class:`EncodeSummary` with counts, failures and time (over all ranks).

    Raises:
        StoreMismatchError: (a ``ValueError``) ``output`` holds latents made with other settings.
        FileNotFoundError: ``source`` does not exist.
        NotADirectoryError: ``output`` is a file.
        ValueError / TypeError: bad arguments, or no images found.

    Example:
        >>> vae, device = VAELoader().load_sd_vae("sd15")  # doctest: +SKIP
        >>> summary = encode_dataset(vae, "photos/", "photos-latents/", model="sd15", size=512)
        >>> store = LatentStore("photos-latents/")
        >>> store["holiday/beach.jpg"].shape
        torch.Size([4, 64, 64])
    """
    start = time.perf_counter()
    _check_int("batch_size", batch_size, 1)
    _check_int("size", size, MULTIPLE, allow_none=True)
    if size is not None and size % MULTIPLE:
        raise ValueError(f"size must be a multiple of {MULTIPLE}, got {size}")
    _check_int("workers", workers, 1, allow_none=True)
    _check_int("max_shard_size", max_shard_size, 1)
    _check_int("seed", seed, 0)
    if dtype not in _STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(_dtype_name, _STORE_DTYPES))}, got {dtype!r}")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} is a file; pass a folder for the latent store")
    root, keys = find_images(source)
    settings = _settings(vae, model, size, dtype, sample, seed)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)

    dist = _Dist.from_env(_vae_device(vae))
    try:
        if dist.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            for tmp in out.iterdir():  # left by a killed run; no rank writes yet
                if _is_temporary(tmp.name):
                    tmp.unlink(missing_ok=True)
        dist.barrier()
        state = _scan(out)
        problems = _mismatch(state.settings, settings) if state.settings is not None else []
        if problems and not overwrite:
            raise _refusal(out, problems)
        if overwrite and (state.shards or state.settings is not None):
            dist.barrier()  # everyone has scanned before rank 0 deletes
            if dist.rank == 0:
                logger.info("overwrite: removed %d file(s) of the previous store in %s", _remove_store_files(out), out)
            dist.barrier()
            state = _State()
        todo: list[tuple[str, Path]] = []
        for key in keys:
            path = root / key
            stored = state.stored.get(key)
            if stored is not None:
                try:
                    stat = _stat(path)
                except OSError:
                    stat = None
                entry = stored[1]
                if stat is not None and (entry.get("source_bytes"), entry.get("source_mtime_ns")) == stat:
                    continue
            todo.append((key, path))
        mine = todo[dist.rank :: dist.world_size]
        dist.barrier()  # every rank has read the store before any rank writes to it
        logger.info(
            "encoding %d of %d images (%d already stored) into %s%s",
            len(todo), len(keys), len(keys) - len(todo), out,
            f"; rank {dist.rank} of {dist.world_size} takes {len(mine)}" if dist.world_size > 1 else "",
        )  # fmt: skip
        writer = _ShardWriter(out, uuid.uuid4().hex[:12], dist.rank, settings, max_shard_size)
        encoder = _Encoder(vae, sample, seed, dtype)
        try:
            encoded, failed = _pipeline(mine, size, batch_size, workers, encoder, writer, progress and dist.rank == 0)
        finally:  # also on Ctrl-C or an error: keep what was encoded, the next run resumes from it
            writer.flush()
        dist.barrier()  # all shards are on disk
        results = dist.gather((encoded, failed, len(writer.written)))
        failures = {k: v for _, f, _ in results for k, v in f.items()}
        if dist.rank == 0:
            _write_index(out, settings, failures, set(keys))
        dist.barrier()  # the index exists when encode_dataset returns on any rank
    finally:
        dist.close()
    return EncodeSummary(
        output=out,
        total=len(keys),
        encoded=sum(r[0] for r in results),
        skipped=len(keys) - len(todo),
        failed=dict(sorted(failures.items())),
        seconds=time.perf_counter() - start,
        shards=sum(r[2] for r in results),
        rank=dist.rank,
    )


def _pipeline(
    items: Sequence[tuple[str, Path]],
    size: int | None,
    batch_size: int,
    workers: int,
    encoder: _Encoder,
    writer: _ShardWriter,
    progress: bool,
) -> tuple[int, dict[str, str]]:
    """Decode (threads) -> group by size -> encode (this thread) -> shards; returns (encoded, failures)."""
    from tqdm.auto import tqdm

    failed: dict[str, str] = {}
    encoded = 0
    buckets: dict[tuple[int, ...], list[_Item]] = {}
    held = 0
    max_held = 4 * batch_size  # images waiting for a full batch of their size, over all sizes
    bar = tqdm(total=len(items), desc="encode", unit="image", disable=not progress, dynamic_ncols=True)

    def run(batch: list[_Item]) -> None:
        nonlocal encoded
        done, errors = encoder(batch)
        for item, z in done:
            entry = {
                "size": [int(item.image.shape[-1]), int(item.image.shape[-2])],
                "source_bytes": item.stat[0],
                "source_mtime_ns": item.stat[1],
            }
            writer.add(item.key, z, entry)
        encoded += len(done)
        failed.update(errors)
        bar.update(len(batch))

    try:
        window = max(2 * batch_size, 2 * workers)
        for key, stat, result in _prefetch(items, size, workers, window):
            if isinstance(result, BaseException):
                text = " ".join(str(result).split())
                reason = text if isinstance(result, ImageProcessingError) else f"{type(result).__name__}: {text}"
                failed[key] = reason
                logger.warning("skipped %s: %s", key, reason)
                bar.update(1)
                continue
            assert stat is not None
            shape = tuple(result.shape)
            bucket = buckets.setdefault(shape, [])
            bucket.append(_Item(key, stat, result))
            held += 1
            if len(bucket) >= batch_size:
                held -= len(bucket)
                run(buckets.pop(shape))
            elif held >= max_held:  # many sizes at once: encode the fullest partial batch
                fullest = max(buckets, key=lambda s: len(buckets[s]))
                held -= len(buckets[fullest])
                run(buckets.pop(fullest))
        for shape in list(buckets):
            run(buckets.pop(shape))
    finally:
        bar.close()
    return encoded, failed


def _write_index(folder: Path, settings: dict[str, Any], failures: dict[str, str], keys: set[str]) -> None:
    """Merge the shards on disk into the index (rank 0, after every rank has written its shards)."""
    state = _scan(folder)
    weight_map = {key: shard for key, (shard, _) in sorted(state.stored.items())}
    used = set(weight_map.values())
    for name in state.shards:
        if name not in used:  # every entry in it was encoded again later
            (folder / name).unlink(missing_ok=True)
            logger.info("removed %s: all its latents were superseded", name)
    shards = [name for name in state.shards if name in used]
    total_size = sum((folder / name).stat().st_size for name in shards)
    index = {
        "metadata": {**settings, "total_size": total_size, "count": len(weight_map)},
        "shards": shards,
        "weight_map": weight_map,
        "entries": {key: entry for key, (_, entry) in sorted(state.stored.items())},
        "failures": {k: v for k, v in sorted(failures.items()) if k in keys and k not in weight_map},
    }
    _atomic_write(folder / INDEX_NAME, json.dumps(index, indent=1).encode("utf-8"))


# --- reading --------------------------------------------------------------------------------------


class LatentStore(Mapping[str, torch.Tensor], Dataset):
    """A latent store opened read-only: a mapping ``key -> latent`` and a ``torch.utils.data.Dataset``.

    Opening reads the index only; a latent is read from its memory-mapped shard when asked for. As a
    dataset, ``store[i]`` is the latent of the i-th key in sorted order (``store.key(i)`` names it), so a
    ``DataLoader`` can batch latents of equal shape. ``store.metadata`` holds the model, its scaling and
    shift factors, dtype and the settings of the run; ``store.entry(key)`` the image size used and the
    source file's size and mtime; ``store.failures`` the images that could not be encoded.

    Example:
        >>> store = LatentStore("photos-latents")  # doctest: +SKIP
        >>> z = store["holiday/beach.jpg"]                # scaled latents, as latents.encode returns them
        >>> loader = torch.utils.data.DataLoader(store, batch_size=16, shuffle=True)
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        index_path = self.path / INDEX_NAME
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if self.path.is_dir() and any(_SHARD_RE.match(p.name) for p in self.path.iterdir()):
                raise FileNotFoundError(
                    f"{self.path} has latent shards but no {INDEX_NAME}: the encode run did not finish; "
                    "run the same encode command again to complete the store"
                ) from None
            raise FileNotFoundError(f"no latent store at {self.path}: {INDEX_NAME} not found") from None
        except ValueError as err:
            raise ValueError(f"{index_path} is not valid JSON ({err}); run the encode command again") from err
        if not isinstance(index, dict) or index.get("metadata", {}).get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a vae-toolkit latent index")
        self.metadata: dict[str, Any] = index["metadata"]
        self.failures: dict[str, str] = index.get("failures", {})
        self._weight_map: dict[str, str] = index["weight_map"]
        self._entries: dict[str, dict[str, Any]] = index.get("entries", {})
        self._keys = sorted(self._weight_map)
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._weight_map

    def __getitem__(self, key: str | int) -> torch.Tensor:
        """The latent of ``key`` (a str), or of the ``key``-th key in sorted order (an int)."""
        if isinstance(key, int) and not isinstance(key, bool):
            key = self.key(key)
        elif not isinstance(key, str):
            raise TypeError(f"keys are str (image paths relative to the source) or int indices, got {key!r}")
        try:
            shard = self._weight_map[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in the latent store {self.path} ({len(self)} latents)") from None
        return self._shard(shard).get_tensor(key)

    def key(self, index: int) -> str:
        """The ``index``-th key in sorted order (the key of ``store[index]``)."""
        try:
            return self._keys[index]
        except IndexError:
            raise IndexError(f"index {index} out of range for a store of {len(self)} latents") from None

    def entry(self, key: str) -> dict[str, Any]:
        """What the index records for ``key``: ``size`` [w, h] used, ``source_bytes``, ``source_mtime_ns``."""
        if key not in self._weight_map:
            raise KeyError(f"{key!r} is not in the latent store {self.path} ({len(self)} latents)")
        return dict(self._entries[key])

    def _shard(self, name: str) -> Any:
        handle = self._handles.get(name)
        if handle is None:
            from safetensors import safe_open

            with self._lock:
                handle = self._handles.get(name)
                if handle is None:
                    handle = safe_open(str(self.path / name), framework="pt")
                    self._handles[name] = handle
        return handle

    def close(self) -> None:
        """Release the memory-mapped shards (they are opened again when needed)."""
        with self._lock:
            self._handles.clear()

    def __enter__(self) -> LatentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started with spawn
        state = self.__dict__.copy()
        state["_handles"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"LatentStore({str(self.path)!r}, {len(self)} latents, model={m.get('model')!r}, dtype={m.get('dtype')})"
        )
