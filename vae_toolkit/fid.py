"""FID (and KID) between two folders of images or saved statistics: ``python -m vae_toolkit fid A B``.

:func:`fid_between` gives the value ``python -m pytorch_fid A B`` prints on the same weights: the images of a
folder are pytorch-fid's (the files directly in it whose extension is one of :data:`IMAGE_EXTENSIONS`, sorted
by path), each read as PIL's ``convert("RGB")`` and taken to ``[0, 1]`` as torchvision's ``ToTensor``, then
:func:`vae_toolkit.metrics.inception_features` (bilinear resize to 299x299, FID Inception-v3) and
:func:`vae_toolkit.metrics.frechet_distance` of the float64 mean and covariance. An ``.npz`` path is a
statistics file (pytorch-fid's ``--save-stats`` layout, ``mu`` and ``sigma``), as pytorch-fid reads it.

Images are decoded on ``workers`` threads ahead of the network; consecutive images of the same size share a
batch (pytorch-fid needs every image of a batch to have one size, and fails otherwise; here any sizes mix).
KID (:mod:`vae_toolkit.kid`) needs the features themselves, so it is computed between two folders only.

Example:
    >>> result = fid_between("real/", "generated/", kid=True, kid_subset_size=100)  # doctest: +SKIP
    >>> result.fid, result.kid_mean, result.kid_std  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .batching import default_workers, read_ahead
from .fid_statistics import read_statistics, write_statistics
from .kid import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, kernel_inception_distance
from .metrics import FrechetInceptionDistance, frechet_distance, inception_features, load_networks

if TYPE_CHECKING:
    import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "FidResult", "fid_between", "folder_features", "list_images"]

logger = logging.getLogger(__name__)

#: pytorch-fid 0.3.0's ``IMAGE_EXTENSIONS``, matched as its ``glob("*.ext")`` matches them.
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


@dataclass
class FidResult:
    """What :func:`fid_between` computed.

    Attributes:
        fid: the Fréchet distance, or None when only statistics were saved.
        kid_mean, kid_std: KID over the subsets (None without ``kid``).
        images: the number of images of each path (None for a statistics file without a count).
        dims: the Inception features compared.
        kid_subset_size: the subset size used (lowered to the smaller set's size when needed).
        notes: lines for a person, e.g. that the subset size was lowered.
    """

    fid: float | None
    kid_mean: float | None = None
    kid_std: float | None = None
    images: list[int | None] = field(default_factory=list)
    dims: int = 2048
    kid_subset_size: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """``{"fid": ..., "kid_mean": ..., "kid_std": ..., "images": [...], "dims": ..., "notes": [...]}``."""
        return {
            "fid": self.fid,
            "kid_mean": self.kid_mean,
            "kid_std": self.kid_std,
            "images": self.images,
            "dims": self.dims,
            "kid_subset_size": self.kid_subset_size,
            "notes": self.notes,
        }


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The images pytorch-fid reads from ``folder``: its files (not recursive) with an extension of
    :data:`IMAGE_EXTENSIONS` as written there (lower case), sorted.

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
        ValueError: it holds no such image.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of images (nor an .npz statistics file)")
    files = sorted(p for ext in IMAGE_EXTENSIONS for p in path.glob(f"*.{ext}"))
    if not files:
        raise ValueError(
            f"{folder} holds no image with an extension pytorch-fid reads ({', '.join(IMAGE_EXTENSIONS)}; not "
            "searched recursively)"
        )
    return files


def _read(path: Path) -> torch.Tensor:
    """One image as a uint8 tensor ``[3, H, W]``: PIL's ``convert("RGB")``, as pytorch-fid's dataset."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _batches(files: list[Path], batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    """Stacked uint8 batches of consecutive images of one size, decoded ahead on ``workers`` threads."""
    pending: list[torch.Tensor] = []
    for key, result in read_ahead(((str(p), p) for p in files), _read, workers, window=2 * batch_size):
        if isinstance(result, Exception):
            raise ValueError(f"cannot read {key} as an image: {result}") from result
        if pending and (result.shape != pending[0].shape or len(pending) == batch_size):
            yield torch.stack(pending)
            pending = []
        pending.append(result)
    if pending:
        yield torch.stack(pending)


def folder_features(
    folder: str | os.PathLike[str],
    dims: int = 2048,
    *,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    workers: int | None = None,
) -> torch.Tensor:
    """The ``[N, dims]`` float32 Inception features of the images of ``folder`` (:func:`list_images`), on the CPU.

    Raises:
        NotADirectoryError, ValueError: as :func:`list_images`; ValueError also for an unreadable image.
        WeightsUnavailableError: pytorch-fid's weight file is missing and cannot be downloaded.
    """
    files = list_images(folder)
    load_networks(fid=True)  # a missing or broken weight file fails before any image is read
    out = []
    for batch in _batches(files, batch_size, workers or default_workers()):
        x = batch.to(device)
        out.append(inception_features(x, dims, input_range=(0, 255), batch_size=batch_size).cpu())
    logger.info("FID: %d images of %s", len(files), folder)
    return torch.cat(out)


def _is_statistics(path: Path) -> bool:
    return path.suffix.lower() == ".npz" and not path.is_dir()


def fid_between(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str] | None,
    *,
    dims: int = 2048,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    workers: int | None = None,
    kid: bool = False,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_seed: int = KID_SEED,
    save_stats: str | os.PathLike[str] | None = None,
) -> FidResult:
    """FID between ``a`` and ``b``, each a folder of images or an ``.npz`` statistics file, as pytorch-fid 0.3.0's
    ``calculate_fid_given_paths``; optionally KID (two folders) and ``a``'s statistics saved to ``save_stats``.

    Args:
        a, b: the two sets (``b`` may be None when only ``save_stats`` is wanted, as ``pytorch_fid --save-stats``).
        dims: the Inception features (2048, 768, 192 or 64).
        batch_size: images per forward pass (pytorch-fid's default 50).
        device: where the network runs.
        workers: decoding threads (default: the CPUs, at most 8).
        kid: also compute KID (torch-fidelity's definition); ``kid_subset_size`` is lowered to the smaller set's
            number of images when larger, with a note.
        kid_subsets, kid_subset_size, kid_seed: as :func:`vae_toolkit.kid.kernel_inception_distance`.
        save_stats: write ``a``'s statistics there in pytorch-fid's ``.npz`` layout (``a`` must be a folder).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a folder without images, an unreadable image or statistics file, statistics of another
            ``dims``, KID asked with a statistics file, or neither ``b`` nor ``save_stats``.
        WeightsUnavailableError: pytorch-fid's weight file is missing and cannot be downloaded.
    """
    paths = [Path(p).expanduser() for p in (a, b) if p is not None]
    if b is None and save_stats is None:
        raise ValueError("fid_between needs two paths, or one folder and save_stats to write its statistics")
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    if kid and any(_is_statistics(p) for p in paths):
        raise ValueError("KID needs the images' features: give two folders, not a statistics (.npz) file")
    if save_stats is not None and _is_statistics(paths[0]):
        raise ValueError(f"save_stats writes the statistics of a folder of images; {paths[0]} is already statistics")
    result = FidResult(fid=None, dims=dims)
    loaded: dict[Path, tuple[np.ndarray, np.ndarray, int | None]] = {}
    for path in paths:  # every path checked before any image is read
        if _is_statistics(path):
            loaded[path] = read_statistics(path)
            if loaded[path][0].shape != (dims,):
                d = loaded[path][0].shape[0]
                raise ValueError(f"{path} holds statistics of {d}-d features, not {dims}: pass dims={d}")
        else:
            list_images(path)
    stats: list[tuple[np.ndarray, np.ndarray]] = []
    features: list[torch.Tensor] = []
    for path in paths:
        if path in loaded:
            mu, sigma, n = loaded[path]
            stats.append((mu, sigma))
            result.images.append(n)
            continue
        f = folder_features(path, dims, batch_size=batch_size, device=device, workers=workers)
        acc = FrechetInceptionDistance(dims, device="cpu")
        acc.update_features(f, real=True)
        stats.append(acc.statistics(True))
        features.append(f)
        result.images.append(len(f))
        if save_stats is not None and path == paths[0]:
            write_statistics(save_stats, *stats[0], len(f))
    if len(stats) == 2:
        result.fid = frechet_distance(*stats[0], *stats[1])
    if kid and len(features) == 2:
        size = min(kid_subset_size, len(features[0]), len(features[1]))
        if size < kid_subset_size:
            result.notes.append(
                f"KID subset size lowered from {kid_subset_size} to {size}, the number of images of the smaller set"
            )
        result.kid_subset_size = size
        result.kid_mean, result.kid_std = kernel_inception_distance(
            features[0], features[1], subsets=kid_subsets, subset_size=size, seed=kid_seed
        )
    return result
