"""The weight files of the metrics' networks: where they are looked up, how they are fetched and checked.

Files are the ones the field already shares, under their usual names in torch hub's checkpoint folder
(``torch.hub.get_dir()/checkpoints/``, i.e. ``$TORCH_HOME/hub/checkpoints``), so a machine that has run
torchvision, pytorch-fid or lpips reuses them. A missing file is downloaded there from its canonical address
(progress bar on stderr, SHA-256 checked, written to a hidden part file in the same folder and moved into place,
with the mode the umask gives, as torch.hub's files), unless ``HF_HUB_OFFLINE`` is true, the network is unreachable
or the folder cannot be written: then :class:`WeightsUnavailableError` says, in one line, which file to download
from where and where to put it. A file that is present is checked when it is loaded: readable, and holding exactly
the expected tensors (names and shapes), else :class:`InvalidWeightsError`.

Nothing here runs at import.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import logging
import os
import re
import secrets
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

__all__ = [
    "ALEXNET",
    "FID_INCEPTION",
    "LPIPS_ALEX",
    "LPIPS_SQUEEZE",
    "LPIPS_VGG",
    "SQUEEZENET1_1",
    "VGG16",
    "InvalidWeightsError",
    "WeightsFile",
    "WeightsUnavailableError",
    "load_state_dict",
    "locate",
    "weights_dir",
]

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_CHUNK = 1 << 20
#: A part file whose writer cannot be asked (see :func:`_remove_abandoned_parts`) is taken as abandoned after this
#: long without a write: a running download writes every megabyte and gives up after 60 s without data.
_STALE_AFTER_S = 24 * 3600
#: The middle of the part files this module names (``.<name>.<pid>-<8 hex digits>.part``), whose writer holds a lock.
_LOCKED_PART = re.compile(r"\d+-[0-9a-f]{8}")
_NOT_WRITABLE = ", or set TORCH_HOME to a folder you can write to"


class WeightsUnavailableError(FileNotFoundError):
    """A weight file is not in the checkpoint folder and cannot be downloaded (offline, or no network)."""


class InvalidWeightsError(ValueError):
    """A weight file is unreadable (truncated, or not readable by this user), holds another network's tensors, or
    fails its SHA-256 check."""


@dataclass(frozen=True)
class WeightsFile:
    """One weight file: its name in the checkpoint folder, where it comes from, and its SHA-256.

    ``sha256`` is the full hex digest where it is known, otherwise the leading hex digits that the file's name
    carries (torch hub's naming convention: ``name-<first digits of the SHA-256>.pth``); a download is checked
    against as many digits as are given.
    """

    name: str
    url: str
    sha256: str
    what: str


#: torchvision's AlexNet (``AlexNet_Weights.IMAGENET1K_V1``), the LPIPS backbone. torchvision loads it with
#: ``check_hash=True``, so the 8 digits of the name are the start of its SHA-256; the full digest is not known here.
ALEXNET = WeightsFile(
    "alexnet-owt-7be5be79.pth",
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "7be5be79",
    "torchvision's AlexNet (IMAGENET1K_V1)",
)
#: torchvision's VGG-16 (``VGG16_Weights.IMAGENET1K_V1``), the LPIPS VGG backbone; name-prefix check as above.
VGG16 = WeightsFile(
    "vgg16-397923af.pth",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
    "397923af",
    "torchvision's VGG-16 (IMAGENET1K_V1)",
)
#: torchvision's SqueezeNet 1.1 (``SqueezeNet1_1_Weights.IMAGENET1K_V1``, 4.7 MB), the LPIPS squeeze backbone;
#: name-prefix check as above.
SQUEEZENET1_1 = WeightsFile(
    "squeezenet1_1-b8a52dc0.pth",
    "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
    "b8a52dc0",
    "torchvision's SqueezeNet 1.1 (IMAGENET1K_V1)",
)
#: pytorch-fid's FID Inception (ported from TensorFlow's 2015-12-05 Inception graph). Its name follows torch
#: hub's convention, so only those 8 digits of its SHA-256 are checked; the full digest is not known here.
FID_INCEPTION = WeightsFile(
    "pt_inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "6726825d",
    "pytorch-fid's FID Inception-v3",
)
#: The ``lpips`` package's v0.1 linear heads (``lpips/weights/v0.1/alex.pth``), byte for byte: the SHA-256 is
#: that of the file in the lpips 0.1.4 wheel (also recorded in the wheel's RECORD).
LPIPS_ALEX = WeightsFile(
    "lpips-v0.1-alex.pth",
    "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/alex.pth",
    "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "the lpips package's v0.1 AlexNet heads",
)
#: The ``lpips`` package's v0.1 VGG heads (``lpips/weights/v0.1/vgg.pth``), SHA-256 of lpips 0.1.4's file.
LPIPS_VGG = WeightsFile(
    "lpips-v0.1-vgg.pth",
    "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth",
    "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    "the lpips package's v0.1 VGG heads",
)
#: The ``lpips`` package's v0.1 SqueezeNet heads (``lpips/weights/v0.1/squeeze.pth``, 10,811 bytes, seven heads),
#: SHA-256 of lpips 0.1.4's file.
LPIPS_SQUEEZE = WeightsFile(
    "lpips-v0.1-squeeze.pth",
    "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/squeeze.pth",
    "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76",
    "the lpips package's v0.1 SqueezeNet heads",
)


def weights_dir() -> Path:
    """The folder the weight files are looked up in and downloaded to: ``torch.hub.get_dir()/checkpoints``.

    Read at each call, so ``TORCH_HOME`` (or ``torch.hub.set_dir``) set at run time is honoured.
    """
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network (the library's one offline switch), read now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _unavailable(spec: WeightsFile, folder: Path, reason: str, hint: str = "") -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{spec.name} ({spec.what}) is not in {folder} and cannot be downloaded ({reason}): "
        f"download {spec.url} and put it in {folder} as {spec.name}{hint}"
    )


def locate(spec: WeightsFile) -> Path:
    """The path of ``spec``'s file in :func:`weights_dir`, downloading it first when it is missing.

    Raises:
        WeightsUnavailableError: missing, and offline (``HF_HUB_OFFLINE``), the download failed on the network, or
            the folder cannot be written (read-only, another user's).
        InvalidWeightsError: the downloaded bytes do not have the expected SHA-256 (nothing is kept).
    """
    folder = weights_dir()
    path = folder / spec.name
    if path.is_file():
        return path
    if _offline():
        raise _unavailable(spec, folder, "HF_HUB_OFFLINE is set")
    _download(spec, path)
    return path


def _urlopen(url: str, timeout: float) -> IO[bytes]:
    """``urllib.request.urlopen`` (a seam for tests, which serve bytes without a network)."""
    return urllib.request.urlopen(url, timeout=timeout)  # fixed https addresses of the weight files


def _lock(fd: int, *, wait: bool) -> bool | None:
    """Take an exclusive ``flock`` on ``fd``: True when taken, False when another open file holds it (only with
    ``wait=False``), None where files cannot be locked (Windows, a file system without locks)."""
    if sys.platform == "win32":
        return None
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _new_part(spec: WeightsFile, folder: Path) -> tuple[int, Path]:
    """Create this download's part file ``.<name>.<pid>-<hex>.part`` in ``folder`` and lock it; ``(fd, path)``.

    Created with mode 0o666, which the umask reduces as it does for torch.hub's downloads, so the finished file
    is readable by whom the umask allows. The lock is held until ``fd`` is closed, and dies with the process.
    """
    while True:
        part = folder / f".{spec.name}.{os.getpid()}-{secrets.token_hex(4)}.part"
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        if _lock(fd, wait=True) is None or _same_file(fd, part):
            return fd, part
        os.close(fd)  # another download's clean-up removed it between its creation and the lock: another name


def _remove_abandoned_parts(spec: WeightsFile, folder: Path, keep: Path) -> None:
    """Remove the part files of ``spec`` that killed downloads left in ``folder`` (never another file's).

    A part file named by :func:`_new_part` is abandoned when nobody holds its lock: its writer locks it for the
    whole download and a lock dies with its process, however it ends, so the part file of a download still
    running (in this process or another, on this machine or another sharing the folder) is kept, however old.
    Where its lock cannot be asked (Windows, a file system without locks) and for the part files of earlier
    versions, which took no lock, a part file is abandoned when nothing was written to it for a day
    (:data:`_STALE_AFTER_S`). Part files this user cannot open for writing (another user's) are left alone.
    """
    now = time.time()
    for part in folder.glob(f".{glob.escape(spec.name)}.*.part"):
        if part == keep:
            continue
        middle = part.name[len(spec.name) + 2 : -len(".part")]
        if middle.startswith(f"{os.getpid()}-"):
            continue  # another thread's download, whose lock this process may share (NFS's emulated flock)
        lockable = _LOCKED_PART.fullmatch(middle) is not None
        try:
            fd = os.open(part, os.O_WRONLY)  # open for writing: NFS emulates flock with write locks
        except OSError:
            continue  # gone meanwhile, or not ours to remove
        try:
            held = _lock(fd, wait=False) if lockable else None
            if held is False or (held is None and now - os.fstat(fd).st_mtime < _STALE_AFTER_S):
                continue  # its download runs, or may
            if _same_file(fd, part):
                part.unlink()
                logger.info("Removed %s, left by a download of %s that no longer runs", part, spec.name)
        except OSError as err:
            logger.debug("Could not remove %s: %s", part, err)
        finally:
            os.close(fd)


def _download(spec: WeightsFile, path: Path) -> None:
    """Download ``spec.url`` to ``path``: a locked part file in the same folder, SHA-256 checked, then renamed.

    Part files that killed downloads of the same file left are removed first (see :func:`_remove_abandoned_parts`).
    """
    from tqdm import tqdm

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, part = _new_part(spec, folder)
    except OSError as err:  # read-only, another user's: nothing to download to
        raise _unavailable(spec, folder, f"cannot save it there: {err.strerror or err}", _NOT_WRITABLE) from err
    _remove_abandoned_parts(spec, folder, keep=part)
    logger.info("Downloading %s from %s to %s", spec.name, spec.url, folder)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:  # the lock is held until this closes, after the file is in place
            try:
                with _urlopen(spec.url, timeout=60) as response:
                    length = getattr(response, "headers", {}).get("Content-Length")
                    total = int(length) if length and str(length).isdigit() else None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=spec.name) as bar:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
                out.flush()
            except (OSError, http.client.HTTPException) as err:
                raise _unavailable(spec, folder, f"{type(err).__name__}: {err}") from err
            actual = digest.hexdigest()
            if not actual.startswith(spec.sha256):
                raise InvalidWeightsError(
                    f"the file downloaded from {spec.url} has SHA-256 {actual}, expected "
                    f"{spec.sha256 if len(spec.sha256) == 64 else spec.sha256 + '...'}; nothing was saved. Try "
                    f"again, or download it by hand and put it in {folder} as {spec.name}"
                )
            if sys.platform != "win32":
                _move(spec, part, path)
        if sys.platform == "win32":
            _move(spec, part, path)  # Windows renames no open file (and has no lock to keep)
    finally:
        part.unlink(missing_ok=True)
    logger.info("Saved %s (SHA-256 %s)", path, actual)


def _move(spec: WeightsFile, part: Path, path: Path) -> None:
    try:
        os.replace(part, path)
    except OSError as err:
        raise _unavailable(spec, path.parent, f"cannot save it there: {err.strerror or err}", _NOT_WRITABLE) from err


def load_state_dict(
    spec: WeightsFile,
    expected: Mapping[str, torch.Size],
    *,
    ignore_prefixes: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """The tensors of ``spec``'s file named in ``expected``, each of the expected shape, on the CPU.

    The file is found (or downloaded) by :func:`locate` and read with ``torch.load(map_location="cpu",
    weights_only=True)``. Keys starting with one of ``ignore_prefixes`` (a classifier the metric does not use)
    are dropped; keys in ``optional`` may be absent; any other missing, extra or misshapen tensor is an error.

    Raises:
        WeightsUnavailableError: see :func:`locate`.
        InvalidWeightsError: the file cannot be read (truncated?, or this user may not read it) or does not hold
            the expected tensors.
    """
    path = locate(spec)
    remedy = f"delete it (it is downloaded again when online) or replace it with {spec.url}"
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:  # another user's private file: intact, and not this user's to delete
        raise InvalidWeightsError(
            f"cannot read {path}: permission denied; ask its owner to make it readable or point TORCH_HOME "
            f"elsewhere (a folder of your own, where {spec.name} is downloaded again)"
        ) from err
    except Exception as err:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ... on a damaged file
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InvalidWeightsError(
            f"{path} is not a readable PyTorch weights file ({type(err).__name__}: {detail[:200]}), probably "
            f"truncated; expected {spec.what}: {remedy}"
        ) from err
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InvalidWeightsError(f"{path} does not hold a state dict of tensors; expected {spec.what}: {remedy}")
    prefixes = tuple(ignore_prefixes)
    state = {k: v for k, v in loaded.items() if not k.startswith(prefixes)}
    optional_keys = set(optional)
    missing = [k for k in expected if k not in state and k not in optional_keys]
    extra = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(s)})"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    if missing or extra or wrong:
        problems = []
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
            if items:
                shown = ", ".join(items[:4]) + (f", ... ({len(items)} in all)" if len(items) > 4 else "")
                problems.append(f"{label}: {shown}")
        names = list(expected)
        raise InvalidWeightsError(
            f"{path} is not {spec.what} ({'; '.join(problems)}); expected {len(names)} tensors "
            f"{names[0]} ... {names[-1]}: {remedy}"
        )
    return {k: state[k] for k in expected if k in state}
