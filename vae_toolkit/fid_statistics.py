"""FID statistics files in pytorch-fid's ``.npz`` layout: ``mu`` ``[d]`` and ``sigma`` ``[d, d]`` (float64).

pytorch-fid's ``--save-stats`` writes ``np.savez_compressed(path, mu=mu, sigma=sigma)`` and its
``calculate_fid_given_paths`` reads any ``.npz`` path as ``f["mu"][:], f["sigma"][:]``; papers share such files
as reference statistics. :func:`write_statistics` adds ``num_images`` (pytorch-fid ignores other keys).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["read_statistics", "write_statistics"]

_HINT = "pytorch-fid's statistics files are .npz files holding 'mu' [d] and 'sigma' [d, d]"


def write_statistics(
    path: str | os.PathLike[str], mu: np.ndarray, sigma: np.ndarray, num_images: int | None = None
) -> Path:
    """Write ``mu`` and ``sigma`` (and ``num_images`` when known) to ``path`` as pytorch-fid's ``--save-stats``
    does; the file is written under a temporary name in the same folder, then moved into place. Returns the path.

    Raises:
        OSError: the file cannot be written.
    """
    import numpy as np

    target = Path(path).expanduser()
    extra = {} if num_images is None else {"num_images": np.int64(num_images)}
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as f:  # a file object: numpy adds no .npz suffix to the name
            np.savez_compressed(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return target


def read_statistics(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``(mu, sigma, num_images or None)`` from a pytorch-fid ``.npz`` statistics file, as float64 arrays.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an ``.npz`` file holding ``mu`` ``[d]`` and ``sigma`` ``[d, d]``.
    """
    import zipfile

    import numpy as np

    try:
        loaded = np.load(Path(path).expanduser(), allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not readable as statistics ({err}); {_HINT}") from err
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not statistics; {_HINT}")
    with loaded as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path} holds {sorted(f.files)}, not statistics; {_HINT}")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        n = int(f["num_images"]) if "num_images" in f.files else None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path} holds mu of shape {mu.shape} and sigma of shape {sigma.shape}; {_HINT}")
    return mu, sigma, n
