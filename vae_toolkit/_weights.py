"""The weight files of the metrics' networks: where they are looked up, how they are fetched and checked.

Files are the ones the field already shares, under their usual names in torch hub's checkpoint folder
(``torch.hub.get_dir()/checkpoints/``, i.e. ``$TORCH_HOME/hub/checkpoints``), so a machine that has run
torchvision, pytorch-fid or lpips reuses them. A missing file is downloaded there from its canonical address
(progress bar on stderr, SHA-256 checked, written to a temporary file in the same folder and moved into place),
unless ``HF_HUB_OFFLINE`` is true or the network is unreachable: then :class:`WeightsUnavailableError` says, in
one line, which file to download from where and where to put it. A file that is present is checked when it is
loaded: readable, and holding exactly the expected tensors (names and shapes), else :class:`InvalidWeightsError`.

Nothing here runs at import.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
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
    "LPIPS_VGG",
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


class WeightsUnavailableError(FileNotFoundError):
    """A weight file is not in the checkpoint folder and cannot be downloaded (offline, or no network)."""


class InvalidWeightsError(ValueError):
    """A weight file is unreadable (truncated), holds another network's tensors, or fails its SHA-256 check."""


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


def weights_dir() -> Path:
    """The folder the weight files are looked up in and downloaded to: ``torch.hub.get_dir()/checkpoints``.

    Read at each call, so ``TORCH_HOME`` (or ``torch.hub.set_dir``) set at run time is honoured.
    """
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network (the library's one offline switch), read now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _unavailable(spec: WeightsFile, folder: Path, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"{spec.name} ({spec.what}) is not in {folder} and cannot be downloaded ({reason}): "
        f"download {spec.url} and put it in {folder} as {spec.name}"
    )


def locate(spec: WeightsFile) -> Path:
    """The path of ``spec``'s file in :func:`weights_dir`, downloading it first when it is missing.

    Raises:
        WeightsUnavailableError: missing, and offline (``HF_HUB_OFFLINE``) or the download failed on the network.
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


def _download(spec: WeightsFile, path: Path) -> None:
    """Download ``spec.url`` to ``path``: a temporary file in the same folder, SHA-256 checked, then renamed."""
    from tqdm import tqdm

    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unavailable(spec, folder, f"cannot create the folder: {err}") from err
    logger.info("Downloading %s from %s to %s", spec.name, spec.url, folder)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{spec.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with _urlopen(spec.url, timeout=60) as response:
                    length = getattr(response, "headers", {}).get("Content-Length")
                    total = int(length) if length and str(length).isdigit() else None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=spec.name) as bar:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                raise _unavailable(spec, folder, f"{type(err).__name__}: {err}") from err
        actual = digest.hexdigest()
        if not actual.startswith(spec.sha256):
            raise InvalidWeightsError(
                f"the file downloaded from {spec.url} has SHA-256 {actual}, expected "
                f"{spec.sha256 if len(spec.sha256) == 64 else spec.sha256 + '...'}; nothing was saved. Try again, "
                f"or download it by hand and put it in {folder} as {spec.name}"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("Saved %s (SHA-256 %s)", path, actual)


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
        InvalidWeightsError: the file cannot be read (truncated?) or does not hold the expected tensors.
    """
    path = locate(spec)
    remedy = f"delete it (it is downloaded again when online) or replace it with {spec.url}"
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
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
