"""How much a VAE loses on a folder of images: metrics per image and per model, and a report to look at.

:func:`evaluate` runs every image of a folder through one or more VAEs (encode, decode, the lossless
:func:`~vae_toolkit.image_utils.tensor_to_pil` of the decoded tensor) and compares the prepared original with
that uint8 reconstruction, exactly what a user would save and look at. :meth:`EvaluationResult.save_report`
writes ``metrics.csv``, ``summary.json``, pictures under ``images/`` and a self-contained ``index.html``.

The metrics carry their definitions (:data:`DEFINITIONS`):

- ``psnr``: ``10 log10(255^2 / MSE)`` in dB on the uint8 values; identical images give ``inf``.
- ``ssim``: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 255,
  averaged over R, G, B: the value of ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)``. Computed by pytorch-msssim
  in float32 with a window normalised in float64 (within 2e-5 of scikit-image's float64 value on 8-bit
  images; its default float32 window is 3e-5 off).
- ``ms_ssim``: the 5-scale MS-SSIM of Wang et al. 2003 (weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333, the
  same window, 2x2 average pooling between scales) by pytorch-msssim; empty (``None``) for images whose
  shorter side is 160 pixels or less, too small for 5 scales of an 11-pixel window.
- ``mae``: the mean absolute difference of the uint8 values.
- ``lpips`` (per image) and ``rfid`` (per model): LPIPS v0.1 and rFID as the ``lpips`` package 0.1.4 and
  pytorch-fid 0.3.0 compute them, through :mod:`vae_toolkit.metrics` (:mod:`vae_toolkit.eval_perceptual`); on by
  default when their weights are there or can be fetched, else left out with a note.

pytorch-msssim (the ``eval`` extra: ``pip install "vae-toolkit[eval]"``) is imported on the first
evaluation, never by ``import vae_toolkit``; :func:`require_metrics` checks it before any model loads.

The report folder is checked (and written to) before the first image: rows go to ``metrics.csv`` as they come,
and Ctrl-C or SIGTERM leaves that file and a ``summary.json`` that says ``"partial": true``
(:mod:`vae_toolkit.report_folder`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from . import latents
from ._checks import DEFAULT_MAX_PIXELS, check_int
from .device_manager import DeviceManager
from .eval_perceptual import FID_MIN_IMAGES, FID_NOTE, PerceptualMetrics, plan
from .eval_results import (
    DEFINITIONS,
    METRICS,
    EvaluationResult,
    Keeper,
    ReportExistsError,
    ReportInSourceError,
    ReportLinkError,
    Shown,
    check_report_folder,
    versions,
)
from .latent_formats import crop_multiple, describe

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from PIL import Image

__all__ = [
    "DEFINITIONS",
    "METRICS",
    "EvaluationResult",
    "ReportExistsError",
    "ReportInSourceError",
    "ReportLinkError",
    "check_report_folder",
    "compare",
    "evaluate",
    "lpips_status",
    "mae",
    "ms_ssim",
    "psnr",
    "reconstruct",
    "require_metrics",
    "ssim",
]

logger = logging.getLogger(__name__)

_MS_SSIM_MIN_SIDE = 161  # pytorch-msssim: the shorter side must exceed (11 - 1) * 2**4 for 5 scales
_MSSSIM_MISSING = 'evaluate needs pytorch-msssim (SSIM, MS-SSIM): pip install "vae-toolkit[eval]"'


def require_metrics() -> None:
    """Raise ``ImportError`` saying what to install when the metrics' library (pytorch-msssim) cannot be imported.

    :func:`evaluate` calls it before reading any image; the ``evaluate`` command before loading any model.
    """
    try:
        import pytorch_msssim  # noqa: F401
    except ImportError as err:
        raise ImportError(_MSSSIM_MISSING) from err


# --- metrics ----------------------------------------------------------------------------------------


def _array(image: Image.Image | np.ndarray, name: str) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 array of an RGB PIL image or an array."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(
            f"{name} must be an RGB PIL image or a uint8 array of shape [H, W, 3], got dtype {arr.dtype} shape "
            f"{arr.shape}; convert with image.convert('RGB')"
        )
    return arr


def _pair(original: Image.Image | np.ndarray, reconstruction: Image.Image | np.ndarray) -> tuple[np.ndarray, ...]:
    a, b = _array(original, "original"), _array(reconstruction, "reconstruction")
    if a.shape != b.shape:
        raise ValueError(f"the images differ in size: {a.shape[1]}x{a.shape[0]} and {b.shape[1]}x{b.shape[0]}")
    return a, b


def psnr(original: Image.Image | np.ndarray, reconstruction: Image.Image | np.ndarray) -> float:
    """PSNR in dB of two RGB images on their uint8 values (peak 255); ``inf`` when they are identical.

    Raises:
        ValueError: not RGB uint8 images, or of different sizes.
    """
    a, b = _pair(original, reconstruction)
    diff = a.astype(np.int32) - b.astype(np.int32)
    mse = float(np.mean(diff * diff, dtype=np.float64))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def mae(original: Image.Image | np.ndarray, reconstruction: Image.Image | np.ndarray) -> float:
    """Mean absolute difference of the uint8 values of two RGB images (0 to 255)."""
    a, b = _pair(original, reconstruction)
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)), dtype=np.float64))


def ssim(original: Image.Image | np.ndarray, reconstruction: Image.Image | np.ndarray) -> float:
    """SSIM as scikit-image's ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)`` computes it (see :data:`DEFINITIONS`).

    Raises:
        ValueError: not RGB uint8 images, of different sizes, or a side shorter than 11 pixels.
        ImportError: pytorch-msssim is not installed (``pip install "vae-toolkit[eval]"``).
    """
    a, b = _pair(original, reconstruction)
    if min(a.shape[:2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels (its window), got {a.shape[1]}x{a.shape[0]}")
    return float(_ssim_batch(_planes(a[None]), _planes(b[None]))[0][0])


def ms_ssim(original: Image.Image | np.ndarray, reconstruction: Image.Image | np.ndarray) -> float | None:
    """5-scale MS-SSIM (see :data:`DEFINITIONS`); ``None`` when the shorter side is 160 pixels or less."""
    a, b = _pair(original, reconstruction)
    if min(a.shape[:2]) < _MS_SSIM_MIN_SIDE:
        return None
    value = _ssim_batch(_planes(a[None]), _planes(b[None]), multiscale=True)[1][0]
    return None if value is None else float(value)


def compare(original: Image.Image | np.ndarray, reconstruction: Image.Image | np.ndarray) -> dict[str, float | None]:
    """Every metric of :data:`METRICS` for one pair of RGB images, as :func:`evaluate` computes it.

    Example:
        >>> compare(Image.open("a.png").convert("RGB"), Image.open("a-roundtrip.png").convert("RGB"))  # doctest: +SKIP
        {'psnr': 31.2, 'ssim': 0.912, 'ms_ssim': 0.978, 'mae': 4.1}
    """
    a, b = _pair(original, reconstruction)
    return _metrics(a[None], b[None])[0]


def _planes(batch: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float32 on ``device``."""
    planes = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    return planes.to(device=device or "cpu").to(torch.float32)


def _ssim_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, 3, H, W]`` in the memory layout where SSIM's Gaussian filter is fastest on its device.

    On a CPU, pytorch-msssim's depthwise 11-tap convolutions run 3-5x faster on channels-last tensors
    (oneDNN's NHWC depthwise kernels) than on NCHW; the values agree to 1e-7. Other devices keep the layout
    that was measured there (NCHW).
    """
    if x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _fold(x: torch.Tensor) -> torch.Tensor:
    """``[n, C, H, W]`` -> ``[1, n * C, H, W]`` channels-last: the images side by side as channels.

    The depthwise convolutions of SSIM filter each channel on its own, so the values are those of the
    unfolded batch bit for bit, and on a CPU they run about 2.5x faster with 12-15 channels to vectorise
    over than with 3.
    """
    n, c, h, w = x.shape
    folded = x.permute(2, 3, 0, 1).reshape(1, h, w, n * c).permute(0, 3, 1, 2)
    return folded.contiguous(memory_format=torch.channels_last)  # a view of an NCHW batch is not channels-last


def _window(device: torch.device, channels: int = 3) -> torch.Tensor:
    """The 11-tap Gaussian (sigma 1.5), normalised in float64 then rounded to float32, once per channel.

    Float32 is about twice as fast as float64 on a CPU and agrees with scikit-image's float64 SSIM within 2e-5
    on 8-bit images (tested to 1e-4, the agreement the definition asks); pytorch-msssim's own float32 window,
    normalised in float32, is 3e-5 off.
    """
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    return (g / g.sum()).to(torch.float32).reshape(1, 1, 1, 11).repeat(channels, 1, 1, 1).to(device)


def _ssim_batch(x: torch.Tensor, y: torch.Tensor, multiscale: bool = False) -> tuple[list[float], list[float | None]]:
    """Per image ``(ssim, ms_ssim)`` of two ``[N, 3, H, W]`` float32 batches in 0..255 (on any device).

    With ``multiscale`` (and images large enough for 5 scales), both come from one pass
    (:func:`_ssim_and_ms_ssim`); on a CPU a few images at a time, folded into channels (:func:`_fold`), so that
    the dozen full-size maps of each step stay in the core's cache: at 256², 4 images per group take about
    6 ms per image on one core, against 10 ms unfolded in groups of 2 and 14 ms for 8 images at once.
    """
    try:
        from pytorch_msssim import ms_ssim as _ms_ssim
        from pytorch_msssim import ssim as _ssim
    except ImportError as err:
        raise ImportError(_MSSSIM_MISSING) from err
    with torch.inference_mode():
        if multiscale and min(x.shape[-2:]) >= _MS_SSIM_MIN_SIDE:
            if x.device.type == "cpu":
                step = max(1, _SSIM_CPU_PIXELS // (x.shape[-1] * x.shape[-2]))
                parts = [
                    _ssim_and_ms_ssim(
                        _fold(x[i : i + step]), _fold(y[i : i + step]), _window(x.device, 3 * len(x[i : i + step]))
                    )
                    for i in range(0, len(x), step)
                ]
            else:
                parts = [_ssim_and_ms_ssim(x.contiguous(), y.contiguous(), _window(x.device))]
            if all(p is not None for p in parts):
                return (
                    [v for p in parts if p for v in p[0].tolist()],
                    [v for p in parts if p for v in p[1].tolist()],
                )
        win = _window(x.device)
        x, y = _ssim_layout(x), _ssim_layout(y)
        s = _ssim(x, y, data_range=255, size_average=False, win=win).tolist()
        if multiscale and min(x.shape[-2:]) >= _MS_SSIM_MIN_SIDE:
            return s, _ms_ssim(x, y, data_range=255, size_average=False, win=win).tolist()
    return s, [None] * len(s)


_SSIM_CPU_PIXELS = 2**18  # pixels per group of images for SSIM on a CPU (see _ssim_batch)
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, pytorch-msssim's default


def _ssim_and_ms_ssim(x: torch.Tensor, y: torch.Tensor, win: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(ssim, ms_ssim)`` per image (3 channels each, in order) in one pass, or None when pytorch-msssim's
    internals are not the expected ones.

    pytorch-msssim's ``ms_ssim`` computes the full-scale SSIM map at its first scale and discards it, so calling
    ``ssim`` as well filters the full-size image twice (about 40% of the time of both). This is ``ms_ssim``'s own
    loop (pytorch-msssim 1.0: its ``_ssim`` at each scale, ReLU of the contrast-structure terms, 2x2 average
    pooling padded on odd sides (:func:`_pool2`), the weighted product, the mean over each image's 3 channels),
    keeping the first scale's SSIM, which is what ``ssim`` returns. ``x`` and ``y`` may be folded
    (:func:`_fold`). A test checks both values against ``ssim`` and ``ms_ssim`` bit for bit; should a
    pytorch-msssim release change ``_ssim``, None makes the caller use the two public functions.
    """
    try:
        from pytorch_msssim.ssim import _ssim
    except ImportError:
        return None

    mcs: list[torch.Tensor] = []
    first: torch.Tensor | None = None
    per_channel = x.new_empty(0)
    try:
        for level in range(len(_MS_SSIM_WEIGHTS)):
            per_channel, cs = _ssim(x, y, win=win, data_range=255, size_average=False, K=(0.01, 0.03))
            if first is None:
                first = per_channel.reshape(-1, 3).mean(1)
            if level < len(_MS_SSIM_WEIGHTS) - 1:
                mcs.append(torch.relu(cs))
                padding = (x.shape[2] % 2, x.shape[3] % 2)
                x, y = _pool2(x, padding), _pool2(y, padding)
    except TypeError:  # another _ssim signature
        return None
    stacked = torch.stack([*mcs, torch.relu(per_channel)], dim=0)  # (scale, image, channel)
    weights = stacked.new_tensor(_MS_SSIM_WEIGHTS).view(-1, 1, 1)
    assert first is not None
    return first, torch.prod(stacked**weights, dim=0).reshape(-1, 3).mean(1)


def _pool2(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    """``F.avg_pool2d(x, 2, padding=padding)`` bit for bit (zero padding counted, sums in the same order), 2x faster.

    torch's CPU average pooling takes about 2.3 ns per input value; four strided views added take half of that.
    """
    import torch.nn.functional as F

    ph, pw = padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return (x[..., 0:h:2, 0:w:2] + x[..., 0:h:2, 1:w:2] + x[..., 1:h:2, 0:w:2] + x[..., 1:h:2, 1:w:2]) / 4


def _exact_sums(diff: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per image of a batch of differences of uint8 values (whole numbers in float32), ``(sum d², sum |d|)``, exact.

    Blocks of 256 values are summed in float32: a block's sum is at most 256 * 255² < 2**24, so every partial
    sum is a whole number that float32 holds exactly, in any order of addition. The block sums are then added
    in float64, exact below 2**53 (any image under 46 gigapixels).
    """
    flat = diff.reshape(len(diff), -1)
    main = flat.shape[1] // 256 * 256
    out: list[list[float]] = []
    for values in (flat * flat, flat.abs()):
        total = values.narrow(1, 0, main).reshape(len(diff), -1, 256).sum(-1).sum(-1, dtype=torch.float64)
        out.append((total + values.narrow(1, main, flat.shape[1] - main).sum(-1, dtype=torch.float64)).tolist())
    return out[0], out[1]


def _metrics(a: np.ndarray, b: np.ndarray, device: torch.device | None = None) -> list[dict[str, float | None]]:
    """The metrics of a batch of pairs ``[N, H, W, 3]`` uint8 (all of one size), computed on ``device``.

    PSNR and MAE come from exact sums (:func:`_exact_sums`), SSIM and MS-SSIM from the same float32 values.
    """
    # a read-only array (np.asarray of a PIL image) is copied: torch warns about sharing it
    ta = torch.from_numpy(np.require(a, requirements=["C", "W"])).to(device or "cpu")
    tb = torch.from_numpy(np.require(b, requirements=["C", "W"])).to(device or "cpu")
    with torch.inference_mode():
        xa, yb = ta.to(torch.float32), tb.to(torch.float32)  # [N, H, W, 3]: uint8 values are exact in float32
        squares, absolute = _exact_sums(xa - yb)
        count = a.shape[1] * a.shape[2] * a.shape[3]
        s: list[float | None]
        if min(a.shape[1:3]) >= 11:
            s_, m = _ssim_batch(xa.permute(0, 3, 1, 2), yb.permute(0, 3, 1, 2), multiscale=True)
            s = list(s_)
        else:  # smaller than the SSIM window
            s, m = [None] * len(a), [None] * len(a)
    return [
        {
            "psnr": math.inf if e == 0 else 10.0 * math.log10(255.0**2 * count / e),
            "ssim": s[i],
            "ms_ssim": m[i],
            "mae": absolute[i] / count,
        }
        for i, e in enumerate(squares)
    ]


def lpips_status(net: Literal["alex", "vgg", "squeeze"] = "alex") -> tuple[bool, str]:
    """Whether LPIPS (``net``) can run here without downloading: its weight files are in
    ``torch.hub.get_dir()/checkpoints``; if not, the one line that says which file to put where."""
    from . import _weights
    from .metrics import lpips_weight_files

    files = lpips_weight_files(net)
    folder = _weights.weights_dir()
    missing = [spec for spec in files if not (folder / spec.name).is_file()]
    if not missing:
        return True, f"LPIPS: v0.1, {net}, weights in {folder}"
    return False, "; ".join(f"{spec.name} is not in {folder}: download {spec.url} there" for spec in missing)


# --- the pipeline -----------------------------------------------------------------------------------


def reconstruct(
    vae: AutoencoderKL, images: torch.Tensor, *, timings: dict[str, float] | None = None, tile: bool | None = None
) -> list[Image.Image]:
    """Encode and decode a batch; return the lossless ``tensor_to_pil`` of each decoded image.

    This is the reconstruction both ``evaluate`` and the ``roundtrip`` command measure.

    Args:
        vae: A loaded ``AutoencoderKL`` (any device and dtype).
        images: ``[N, 3, H, W]`` in ``[-1, 1]`` (as ``pil_to_tensor`` gives them), any device.
        timings: When given, the seconds of ``"encode"`` and ``"decode"`` (device synchronised) are added to it.
        tile: As in :func:`vae_toolkit.latents.encode`: ``None`` tiles images larger than the model's
            ``sample_size``; :func:`evaluate` passes ``False`` unless asked to tile.

    Returns:
        ``N`` RGB PIL images, the reconstructions a user would save.
    """
    from .image_utils import tensor_to_pil

    sync = DeviceManager(_device(vae)).synchronize
    with torch.inference_mode():
        start = time.perf_counter()
        z = latents.encode(vae, images, tile=tile)
        sync()
        middle = time.perf_counter()
        y = latents.decode(vae, z, tile=tile)
        sync()
        end = time.perf_counter()
    if timings is not None:
        timings["encode"] = timings.get("encode", 0.0) + middle - start
        timings["decode"] = timings.get("decode", 0.0) + end - middle
    return [tensor_to_pil(t) for t in y]


def _device(vae: Any) -> torch.device:
    device = getattr(vae, "device", None)
    return device if isinstance(device, torch.device) else next(vae.parameters()).device


def _dtype(vae: Any) -> str:
    dtype = getattr(vae, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else next(vae.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def evaluate(
    vaes: Mapping[str, AutoencoderKL],
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] | None = None,
    *,
    size: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    workers: int | None = None,
    worst: int = 4,
    picks: int = 4,
    seed: int = 0,
    lpips: Literal["alex", "vgg", "squeeze", "none"] | bool | None = None,
    fid: bool | None = None,
    fast_reader: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tile: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> EvaluationResult:
    """Measure how much each VAE loses on the images of ``source``; optionally write the report to ``output``.

    Every image is prepared as ``encode`` and ``roundtrip`` prepare it (its own size center-cropped to a
    multiple of 8, or with ``size`` resized and center-cropped to ``size x size``), read once on threads ahead
    of the models, batched by size, and reconstructed by every model (:func:`reconstruct`). The metrics
    (:data:`DEFINITIONS`) compare the prepared original with the uint8 reconstruction. Memory stays bounded:
    only the rows, and the images the pictures show (the ``worst`` per model and ``picks`` seeded picks), are
    kept. Under torchrun (``WORLD_SIZE > 1``) every rank calls it with the same arguments; the ranks split the
    images, every rank returns the whole result, and rank 0 writes the report.

    Args:
        vaes: ``name -> AutoencoderKL`` (loaded, any device and dtype); the names label the rows.
        source: An image file, a folder (searched recursively) or a list of image files; the rows' ``image``
            is the path relative to the folder, as ``encode_dataset`` keys it.
        output: A report folder to write (see :meth:`EvaluationResult.save_report`); checked before any work.
        size: Resize the shorter side to ``size`` and center-crop ``size x size`` (a multiple of 8).
        batch_size: Images per model call; only images of equal size share a batch.
        limit: Evaluate the first ``limit`` images (in key order) only.
        workers: Image decoding threads (default: the CPU count, at most 8).
        worst: Pictures of the ``worst`` lowest-PSNR images of each model.
        picks: Pictures of ``picks`` images chosen by ``seed`` (the same whatever the ranks or batches).
        seed: Seed of the picks.
        lpips: LPIPS per image (:mod:`vae_toolkit.metrics`): ``None`` (default) AlexNet when its weights are
            in ``torch.hub.get_dir()/checkpoints`` or can be fetched, else left out with a note; ``"alex"``,
            ``"vgg"`` or ``True`` (AlexNet) require it; ``"none"`` or ``False`` leave it out.
        fid: rFID per model over the images it reconstructed: ``None`` (default) when the Inception weights are
            there or can be fetched, else left out with a note; ``True`` requires it; ``False`` leaves it out.
        fast_reader: Decode large JPEGs at a reduced DCT scale before resizing to ``size`` (as ``encode`` does
            by default); by default the originals are read exactly (full decode, then resize), as other tools
            read them, so that the numbers are comparable.
        overwrite: Replace the report in a non-empty ``output`` folder: the files the previous report's
            ``report-manifest.json`` lists are replaced; no other file there is removed or replaced.
        progress: Show a progress bar (images/s per model), on rank 0.
        tile: Encode and decode in tiles images larger than a model's ``sample_size``
            (:func:`vae_toolkit.latents.encode`); by default never, so that the model is measured as it is.
        max_pixels: An image whose header says more pixels is a failure, found before it is decoded (the
            default is PIL's decompression-bomb warning threshold); ``None`` for no limit.

    Returns:
        An :class:`EvaluationResult`.

    Rows go to ``output/metrics.csv`` as they come. On Ctrl-C (``KeyboardInterrupt``) or SIGTERM (``SystemExit``
    143, in the main thread) ``output`` keeps that file and a ``summary.json`` saying ``"partial": true`` with the
    counts, and the exception is raised again. Under torchrun, rank 0 writes its own rows as they come.

    Raises:
        ReportExistsError: (a ``FileExistsError``) ``output`` exists and is not empty.
        ReportInSourceError: (a ``ValueError``) ``output`` is the ``source`` folder or inside it.
        OSError: ``output`` cannot be written (checked before the first image); the message names the file.
        FileNotFoundError: ``source`` does not exist.
        ValueError / TypeError: bad arguments, or no images found.
        ImportError: pytorch-msssim is missing.
        WeightsUnavailableError: (a ``FileNotFoundError``) a metric asked for by name (``lpips="alex"``,
            ``fid=True``) cannot find or fetch its weights; checked before the first image.

    Example:
        >>> loader = VAELoader()  # doctest: +SKIP
        >>> vaes = {name: loader.load_sd_vae(name)[0] for name in ("sd-vae-ft-mse", "sd-vae-ft-ema")}
        >>> result = evaluate(vaes, "photos/", "report/", size=256)
        >>> result.ranking, result.summary["sd-vae-ft-mse"]["psnr"]["mean"]
    """
    from ._dist import ProcessGroup
    from ._signals import sigterm_exits
    from .batching import default_workers
    from .report_folder import RowWriter, check_report_folder, clear_previous_report, write_manifest
    from .sources import scan_source

    start = time.perf_counter()
    if not isinstance(vaes, Mapping) or not vaes:
        raise TypeError(f"vaes must be a non-empty mapping of name -> AutoencoderKL, got {vaes!r}")
    for name in vaes:
        if not isinstance(name, str) or not name:
            raise TypeError(f"the model names (keys of vaes) must be non-empty strings, got {name!r}")
    check_int("size", size, 8, allow_none=True)
    multiple = crop_multiple(vaes.values())
    if size is not None and size % multiple:
        raise ValueError(f"size must be a multiple of {multiple}, got {size} (the models' largest spatial factor)")
    check_int("batch_size", batch_size, 1)
    check_int("limit", limit, 1, allow_none=True)
    check_int("workers", workers, 1, allow_none=True)
    check_int("worst", worst, 0)
    check_int("picks", picks, 0)
    check_int("seed", seed, 0)
    check_int("max_pixels", max_pixels, 1, allow_none=True)
    for flag, value in (("tile", tile), ("fast_reader", fast_reader)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    require_metrics()
    chosen = plan(lpips, fid)
    src = scan_source(source)
    root, keys = src.root, src.keys
    if limit is not None:
        keys = keys[:limit]
    models = list(vaes)
    metrics = list(METRICS)
    notes: list[str] = list(chosen.notes)
    first = vaes[models[0]]
    perceptual = PerceptualMetrics(chosen, models, _device(first))
    metrics += perceptual.metrics
    dist = ProcessGroup.from_env(_device(first))
    out = Path(output).expanduser() if output is not None and dist.rank == 0 else None
    settings = {
        "source": str(root),
        "images": len(keys) + len(src.bad),
        "limit": limit,
        "size": size,
        "preparation": "resized and center-cropped to size x size"
        if size
        else f"center-cropped to a multiple of {multiple}",
        # exact: full decode, then resize; fast (fast_reader): large JPEGs decoded at a reduced DCT scale first
        "reader": "fast" if size and fast_reader else "exact",
        "lpips": chosen.lpips,
        "rfid": {"images": "reconstructed by the model", "dims": perceptual.fid_dims} if chosen.fid else None,
        "tile": tile,
        "exif_orientation": "applied",  # as load_for_encoding reads the images (and encode stores them)
        "max_pixels": max_pixels,
        "batch_size": batch_size,
        "models": {
            m: {
                "dtype": _dtype(v),
                "device": str(_device(v)),
                "name_or_path": getattr(getattr(v, "config", None), "_name_or_path", None),
                **describe(v),
            }
            for m, v in vaes.items()
        },
        "world_size": dist.world_size,
        "worst": worst,
        "picks": picks,
        "seed": seed,
        "versions": versions(chosen.fid),
    }
    rows: list[dict[str, Any]] = []
    failures = dict(src.bad)
    for name, reason in src.bad.items():
        logger.warning("skipped %s: %s", name, reason)
    writer: RowWriter | None = None
    try:
        problem: Exception | None = None
        if out is not None:  # rank 0, before the first image (rank 0 alone: its own files would make it non-empty)
            try:
                check_report_folder(out, overwrite, source=source if isinstance(source, (str, os.PathLike)) else None)
                check_report_folder(out, True, probe=True)  # writable? the rows go to metrics.csv as they come
                if overwrite:
                    clear_previous_report(out)
                writer = RowWriter(out / "metrics.csv", ["image", "model", "width", "height", *metrics])
                write_manifest(out, ["metrics.csv"], partial=True)
            except Exception as err:
                problem = err
        problem = dist.broadcast(problem)  # every rank stops, not only rank 0
        if problem is not None:
            raise problem
        mine = keys[dist.rank :: dist.world_size]
        keeper = Keeper(models, worst, picks, seed)
        try:
            with sigterm_exits():
                _pipeline(
                    vaes,
                    [(key, root / key) for key in mine],
                    _Run(
                        size,
                        batch_size,
                        workers if workers is not None else default_workers(),
                        tile,
                        max_pixels,
                        fast_reader and size is not None,
                        multiple,
                    ),  # fmt: skip
                    keeper,
                    perceptual,
                    progress and dist.rank == 0,
                    rows,
                    failures,
                    writer.add if writer is not None else None,
                )
        except (KeyboardInterrupt, SystemExit):
            if out is not None and writer is not None:
                partial = EvaluationResult(models, metrics, _sorted_rows(rows, models), dict(sorted(failures.items())),
                                           settings, notes, time.perf_counter() - start, partial=True)  # fmt: skip
                partial.save_partial(out, ["metrics.csv"])
                counts = partial.counts
                logger.warning(
                    "stopped: partial report in %s: %d of %d images evaluated (summary.json says partial)",
                    out, counts["evaluated"], counts["images"],
                )  # fmt: skip
            raise
        gathered = dist.gather((rows, failures, keeper))
        rfid = perceptual.results(all_reduce=dist.world_size > 1) if perceptual.fid else {}
        if rfid and min(v["rfid_images"] for v in rfid.values()) < FID_MIN_IMAGES:
            notes.append(FID_NOTE)
            logger.info("%s", FID_NOTE)  # once; the CLI prints the notes, the report shows them
        all_rows = _sorted_rows([r for g in gathered for r in g[0]], models)
        all_failures = dict(sorted((k, v) for g in gathered for k, v in g[1].items()))
        merged = Keeper(models, worst, picks, seed)
        merged.merge([g[2] for g in gathered])
        result = EvaluationResult(
            models=models,
            metrics=metrics,
            rows=all_rows,
            failures=all_failures,
            settings=settings,
            notes=notes,
            seconds=time.perf_counter() - start,
            rank=dist.rank,
            _shown=merged,
            rfid=rfid,
        )
        if out is not None:
            if writer is not None:
                writer.close()
            result.save_report(out, overwrite=True)  # replaces only what this run wrote (its manifest)
        dist.barrier()  # the report is written when evaluate returns on any rank
    finally:
        if writer is not None:
            writer.close()
        dist.close()
    return result


def _sorted_rows(rows: Sequence[dict[str, Any]], models: Sequence[str]) -> list[dict[str, Any]]:
    order = {m: i for i, m in enumerate(models)}
    return sorted(rows, key=lambda r: (r["image"], order[r["model"]]))


@dataclass
class _Run:
    """How the images are read and reconstructed: the settings :func:`_pipeline` passes on."""

    size: int | None
    batch_size: int
    workers: int
    tile: bool
    max_pixels: int | None
    fast: bool  # the reduced-scale JPEG decode of load_for_encoding
    multiple: int = 8  # sides cropped to multiples of it: every model's spatial factor divides it


def _pipeline(
    vaes: Mapping[str, Any],
    items: Sequence[tuple[str, Path]],
    run: _Run,
    keeper: Keeper,
    perceptual: PerceptualMetrics,
    progress: bool,
    rows: list[dict[str, Any]],
    failures: dict[str, str],
    sink: Callable[[list[dict[str, Any]]], None] | None,
) -> None:
    """Read (threads) -> group by size -> every model -> metrics, into ``rows`` and ``failures`` (kept by the caller
    when the run is interrupted); each batch's rows also go to ``sink`` (``metrics.csv``) as they come.

    The models run on this thread. On a GPU (or another accelerator), the metrics of a batch run on one
    background thread (on the first model's device, on their own stream) while the models work on the next
    batch, so that they cost little time beside the models; at most one batch waits for its metrics. On a CPU
    they run on this thread after the models: the models' operations already use every core, and a second
    thread's OpenMP team spinning beside theirs made evaluating slower and its speed erratic (0.60-0.94x
    encode + decode over 8 rounds, against 0.79-0.91x with ``OMP_WAIT_POLICY=PASSIVE``; the tiny VAE on the
    48 images of ``benchmarks/evaluate.py --vae tiny``).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from tqdm.auto import tqdm

    from .batching import failure_reason, iter_batches

    seconds = dict.fromkeys(vaes, 0.0)
    counted = dict.fromkeys(vaes, 0)
    device = _device(next(iter(vaes.values())))
    # on a GPU the metrics get their own stream, so that their kernels run beside the models' instead of after them
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    bar = tqdm(total=len(items), desc="evaluate", unit="image", disable=not progress, dynamic_ncols=True)

    def measure(keys: list[str], originals: np.ndarray, recons: dict[str, list[np.ndarray | str]]) -> None:
        """The metrics of one batch (on a CPU this thread, on a GPU the background one): rows, failures, pictures."""
        good = [i for i in range(len(keys)) if not any(isinstance(recons[n][i], str) for n in vaes)]
        for i in sorted(set(range(len(keys))) - set(good)):
            failures[keys[i]] = "; ".join(f"{n}: {recons[n][i]}" for n in vaes if isinstance(recons[n][i], str))
            logger.warning("skipped %s: %s", keys[i], failures[keys[i]])
        values: dict[str, list[dict[str, Any]]] = {}
        arrays: dict[str, np.ndarray] = {}
        if good:
            kept = originals if len(good) == len(keys) else originals[good]
            for name in vaes:
                arrays[name] = np.stack([recons[name][i] for i in good])
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    values[name] = _metrics(kept, arrays[name], device)
                if perceptual.lpips is not None:
                    for v, d in zip(values[name], perceptual.lpips_values(kept, arrays[name]), strict=True):
                        v["lpips"] = d
            perceptual.add(kept, arrays)  # rFID: the originals' features once, every model's reconstructions
        h, w = originals.shape[1:3]
        done = [
            {"image": keys[i], "model": name, "width": int(w), "height": int(h), **values[name][j]}
            for j, i in enumerate(good)
            for name in vaes
        ]
        if sink is not None:
            sink(done)  # a write error stops the run here, naming the file
        rows.extend(done)
        for j, i in enumerate(good):
            shown = Shown(keys[i], originals[i], {n: arrays[n][j] for n in vaes})
            keeper.offer(shown, {n: values[n][j]["psnr"] for n in vaes})
        bar.update(len(keys))
        bar.set_postfix_str(
            ", ".join(f"{n} {counted[n] / seconds[n]:.1f} img/s" for n in vaes if seconds[n] > 0), refresh=False
        )

    pending: Future[None] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae_toolkit_metrics") as pool:
        try:
            batches = iter_batches(
                items,
                run.size,
                run.batch_size,
                exact_resize=not run.fast,
                workers=run.workers,
                max_pixels=run.max_pixels,
                multiple=run.multiple,
            )
            for batch in batches:
                if isinstance(batch, tuple):
                    key, err = batch
                    failures[key] = failure_reason(err)
                    logger.warning("skipped %s: %s", key, failures[key])
                    bar.update(1)
                    continue
                keys = [key for key, _, _ in batch]
                x = torch.stack([image for _, _, image in batch])
                # the prepared originals as uint8, exact: tensor_to_pil(pil_to_tensor(image)) gives the pixels back
                originals = torch.add(x, 1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
                recons: dict[str, list[np.ndarray | str]] = {}
                for name, vae in vaes.items():
                    began = time.perf_counter()
                    recons[name] = _reconstruct_batch(vae, x, run.tile)
                    seconds[name] += time.perf_counter() - began
                    counted[name] += len(keys)
                if pending is not None:
                    pending.result()  # one batch waits for its metrics at most
                # [N, H, W, 3] in memory, copied here by torch (threads, without the GIL), not gathered by numpy in
                # the metrics thread (holding the GIL that this thread's model needs)
                nhwc = originals.permute(0, 2, 3, 1).contiguous().numpy()
                if device.type == "cpu":
                    measure(keys, nhwc, recons)
                else:
                    pending = pool.submit(measure, keys, nhwc, recons)
            if pending is not None:
                pending.result()
        finally:
            bar.close()


def _reconstruct_batch(vae: Any, x: torch.Tensor, tile: bool) -> list[np.ndarray | str]:
    """Per image its reconstruction ``[H, W, 3]`` uint8, or why it failed; a failed batch is retried one by one."""
    try:
        return [np.asarray(im) for im in reconstruct(vae, x, tile=tile)]
    except Exception as err:
        if len(x) == 1:
            return [f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"]
        return [r for i in range(len(x)) for r in _reconstruct_batch(vae, x[i : i + 1], tile)]
