"""Image metrics on tensors, as the field computes them: PSNR, SSIM, MS-SSIM, MAE, LPIPS and FID.

Every function takes two batches ``[N, 3, H, W]`` (PSNR, SSIM, MS-SSIM and MAE also ``[N, 1, H, W]``; LPIPS
repeats a single channel) and returns one value per image as a tensor of shape ``[N]`` on the inputs' device
(or their ``reduction=``: ``"mean"``, ``"sum"``; PSNR also ``"pooled"``), differentiable where the definition is,
so that ``loss = metrics.lpips(decoded, target).mean()`` works in an optimisation loop. Running totals over many
batches and ranks (``update`` / ``compute`` / ``reset``) are :mod:`vae_toolkit.running`'s; KID is
:mod:`vae_toolkit.kid`'s; FID between two folders :mod:`vae_toolkit.fid`'s.

- Input range: every function and class takes ``input_range=(-1, 1)`` (the library's convention, as
  :func:`~vae_toolkit.load_and_preprocess_image` returns and :func:`vae_toolkit.latents.decode` produces, the
  default), ``(0, 1)`` or ``(0, 255)`` (floats, or uint8 tensors). Values beyond the declared range by more than
  a quarter of its width raise ``ValueError`` naming the range found (:mod:`vae_toolkit.pixel_metrics`).
- Computation dtype: float16 and bfloat16 inputs are computed (and returned) in float32, float64 stays
  float64 for PSNR, SSIM, MS-SSIM and MAE; LPIPS runs in its network's dtype (float32).
- Pixel values: ``[-1, 1]`` is mapped to ``[0, 255]`` as ``(x + 1) * 127.5``, without rounding or clamping,
  so the metrics stay differentiable. On images whose values are whole levels (``u / 127.5 - 1`` of uint8
  ``u``, e.g. from :func:`~vae_toolkit.pil_to_tensor`) PSNR, SSIM, MS-SSIM and MAE equal
  :mod:`vae_toolkit.evaluate`'s values of the uint8 images. To measure what would be saved as a PNG, quantise
  first: ``((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1``.
- NaN or inf in an image gives NaN for that image (no error); :class:`FrechetInceptionDistance` leaves such
  images out and logs how many.
- Inference mode: the networks (and :class:`FrechetInceptionDistance`'s running sums) are made outside
  ``torch.inference_mode()`` even when first needed inside it, so a validation pass under inference mode does not
  stop a later ``metrics.lpips(...).mean().backward()``.

Definitions (:data:`DEFINITIONS`) and references: PSNR with peak 255; SSIM as scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``;
MS-SSIM as pytorch-msssim 1.0's ``ms_ssim``; LPIPS as the ``lpips`` package 0.1.4 (``lpips=True``, v0.1);
FID as pytorch-fid 0.3.0. The networks are plain modules of this library (no torchvision, lpips or pytorch-fid
at run time) loading the field's weight files from ``torch.hub.get_dir()/checkpoints`` (see
:mod:`vae_toolkit._weights`); they are fetched when first needed, never at import. scipy (the ``eval`` extra) is
imported only by :func:`frechet_distance`.

Example:
    >>> from vae_toolkit import metrics
    >>> metrics.psnr(decoded, target)  # doctest: +SKIP
    tensor([24.1, 26.3])
    >>> metrics.psnr(uint8_a, uint8_b, input_range=(0, 255), reduction="mean")  # doctest: +SKIP
    >>> loss = metrics.lpips(decoded, target).mean()  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import _weights
from ._backbones import AlexNetFeatures, FIDInceptionV3, SqueezeNet11Features, TapFeatures, VGG16Features, min_side
from ._weights import InvalidWeightsError, WeightsUnavailableError
from .fid_statistics import read_statistics, write_statistics
from .pixel_metrics import (
    MS_SSIM_MIN_SIDE,
    InputRange,
    check_images,
    check_input_range,
    check_pair,
    check_reduction,
    mae,
    ms_ssim,
    psnr,
    reduce,
    ssim,
    to_signed,
    to_unit,
)
from .pixel_metrics import gaussian_window as _gaussian  # noqa: F401 - the SSIM window, kept where it was

if TYPE_CHECKING:
    import numpy as np
    import torch.distributed

__all__ = [
    "DEFINITIONS",
    "LPIPS",
    "LPIPS_NETS",
    "FrechetInceptionDistance",
    "InputRange",
    "InvalidWeightsError",
    "LpipsNet",
    "MS_SSIM_MIN_SIDE",
    "WeightsUnavailableError",
    "frechet_distance",
    "inception_features",
    "load_networks",
    "lpips_weight_files",
    "lpips",
    "mae",
    "ms_ssim",
    "psnr",
    "read_statistics",
    "ssim",
    "weights_dir",
]

logger = logging.getLogger(__name__)

weights_dir = _weights.weights_dir

#: What each metric is, with the reference it equals.
DEFINITIONS = {
    "psnr": "Peak signal-to-noise ratio in dB on values 0-255 ((x + 1) * 127.5): 10 log10(255^2 / MSE); identical "
    "images give inf. Higher is better.",
    "ssim": "Structural similarity (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range "
    "255, mean over the valid window positions, averaged over R, G and B: skimage.metrics.structural_similarity("
    "gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255). 1 means identical.",
    "ms_ssim": "Multi-scale SSIM (Wang et al. 2003): 5 scales, weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333, the "
    "SSIM window, 2x2 average pooling between scales, as pytorch-msssim 1.0's ms_ssim; images of at least 161x161. "
    "1 means identical.",
    "mae": "Mean absolute error in levels 0-255. Lower is better.",
    "lpips": "Learned perceptual image patch similarity (Zhang et al. 2018), v0.1, as the lpips package 0.1.4 "
    "computes it with lpips=True (AlexNet unless stated: VGG-16 or SqueezeNet 1.1). Lower is better.",
    "fid": "Frechet distance between Gaussians fitted to the 2048-d pool features of Inception-v3 (pytorch-fid's FID "
    "weights, bilinear resize to 299x299) of two image sets, as pytorch-fid 0.3.0 computes it. Biased upward for "
    "fewer than 2,048 images per set: compare only values over the same number of images. Lower is better.",
}

#: Images fewer than this per set give an FID that is biased and not comparable with published values.
FID_MIN_IMAGES = 2048


# --- LPIPS -------------------------------------------------------------------------------------------------

#: The LPIPS networks, as the ``lpips`` package's ``net=`` names them.
LpipsNet = Literal["alex", "vgg", "squeeze"]
LPIPS_NETS: tuple[str, ...] = ("alex", "vgg", "squeeze")

_LPIPS_NETS: dict[str, tuple[type[TapFeatures], _weights.WeightsFile, _weights.WeightsFile, str]] = {
    "alex": (AlexNetFeatures, _weights.ALEXNET, _weights.LPIPS_ALEX, "AlexNet"),
    "vgg": (VGG16Features, _weights.VGG16, _weights.LPIPS_VGG, "VGG-16"),
    "squeeze": (SqueezeNet11Features, _weights.SQUEEZENET1_1, _weights.LPIPS_SQUEEZE, "SqueezeNet 1.1"),
}


def _check_net(net: object) -> None:
    if net not in _LPIPS_NETS:
        raise ValueError(f"net must be 'alex', 'vgg' or 'squeeze' (the lpips package's), got {net!r}")


class _Head(nn.Module):
    """An lpips ``NetLinLayer``: ``model.0`` stands for its dropout (inactive in evaluation), ``model.1`` the
    1x1 convolution without bias, so that the parameter is named ``lin{k}.model.1.weight`` as in lpips' files."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length over channels, as lpips' ``normalize_tensor``: ``x / (sqrt(sum x^2) + eps)``."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018) as the ``lpips`` package 0.1.4 computes it with ``lpips=True``.

    Both images are scaled by lpips' ``ScalingLayer`` (shift ``[-0.030, -0.088, -0.188]``, scale ``[0.458, 0.448,
    0.450]``), passed through the backbone (AlexNet: its five ReLUs; VGG-16: relu1_2, relu2_2, relu3_3, relu4_3,
    relu5_3; SqueezeNet 1.1: its first ReLU and six of its Fire blocks, seven layers), each feature map is
    unit-normalised over channels (eps 1e-10), the squared differences weighted by the linear heads (1x1
    convolutions), averaged over space, and the layers summed. All parameters are frozen; gradients flow to the
    inputs.

    Weights: the backbone from torchvision's file (``alexnet-owt-7be5be79.pth``, ``vgg16-397923af.pth`` or
    ``squeezenet1_1-b8a52dc0.pth``) and the heads from the lpips package's (``lpips-v0.1-alex.pth``,
    ``lpips-v0.1-vgg.pth`` or ``lpips-v0.1-squeeze.pth``), in ``torch.hub.get_dir()/checkpoints``, downloaded there
    when missing (see :mod:`vae_toolkit._weights`). Both files are found before either is read, so a missing one
    fails fast.

    Args:
        net: ``"alex"`` (the default of lpips and torchmetrics), ``"vgg"`` (what latent-diffusion trained with) or
            ``"squeeze"`` (lpips' SqueezeNet 1.1, the smallest).
        input_range: the range of the images :meth:`forward` takes: ``(-1, 1)`` (default, lpips'), ``(0, 1)``
            (lpips' ``normalize=True``) or ``(0, 255)`` (floats or uint8).

    Built outside ``torch.inference_mode()`` even inside it, so that a module made during a validation pass still
    backpropagates to its inputs later (``.to()`` under inference mode, though, makes inference tensors).

    Raises:
        ValueError: an unknown ``net`` or ``input_range``.
        WeightsUnavailableError: a weight file is missing and cannot be downloaded (offline or no network).
        InvalidWeightsError: a weight file is truncated or holds another network.

    Example:
        >>> loss_fn = LPIPS("alex").to(device)  # doctest: +SKIP
        >>> loss = loss_fn(decoded, target).mean()  # doctest: +SKIP
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, net: LpipsNet = "alex", *, input_range: InputRange = (-1, 1)) -> None:
        super().__init__()
        _check_net(net)
        self.input_range = check_input_range(input_range)
        backbone_cls, backbone_file, heads_file, _ = _LPIPS_NETS[net]
        for spec in (backbone_file, heads_file):  # both present (or fetched) before reading either
            _weights.locate(spec)
        with torch.inference_mode(False):  # no inference tensors, which autograd cannot save, whoever builds it
            self.net_name = net
            self.net = backbone_cls()
            for k, channels in enumerate(backbone_cls.channels):  # lin0 ... lin4 (lin6 for squeeze), as lpips
                self.add_module(f"lin{k}", _Head(channels))
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
            self.min_side = min_side(self.net.features)

            backbone = _weights.load_state_dict(
                backbone_file, _shapes(self.net), ignore_prefixes=("classifier.",)
            )  # torchvision's classifier is not used
            heads = _weights.load_state_dict(
                heads_file, {k: v for k, v in _shapes(self).items() if k.startswith("lin")}
            )
            self.net.load_state_dict(backbone)
            self.load_state_dict(heads, strict=False)
            self.requires_grad_(False)
            self.eval()

    @property
    def heads(self) -> tuple[_Head, ...]:
        """The linear heads, ``lin0`` to ``lin4`` (``lin6`` for ``"squeeze"``), one per compared layer."""
        return tuple(cast(_Head, self.get_submodule(f"lin{k}")) for k in range(len(self.net.channels)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS per image ``[N]`` of two batches ``[N, 3, H, W]`` (or ``[N, 1, H, W]``, the channel repeated, as
        lpips' users do) in the module's ``input_range``, in the module's dtype.

        Raises:
            TypeError: not tensors, or not floating point (uint8 with a range other than ``(0, 255)``).
            ValueError: another shape, different shapes or devices, values outside ``input_range``, not on the
                module's device, or a side shorter than the backbone needs (AlexNet: 31 pixels, VGG-16: 16,
                SqueezeNet 1.1: 17).
        """
        name = f"LPIPS ({_LPIPS_NETS[self.net_name][3]})"
        a, b = check_pair(x, y, self.input_range, self.min_side, name)
        param = next(self.parameters())
        if a.device != param.device:
            raise ValueError(
                f"the images are on {a.device} but the LPIPS module on {param.device}; move one with .to()"
            )
        a, b = to_signed(a.to(param.dtype), self.input_range), to_signed(b.to(param.dtype), self.input_range)
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        feats0 = self.net((a - self.shift) / self.scale)
        feats1 = self.net((b - self.shift) / self.scale)
        value: torch.Tensor | int = 0
        for head, f0, f1 in zip(self.heads, feats0, feats1, strict=True):
            value = value + head((_unit(f0) - _unit(f1)) ** 2).mean([2, 3], keepdim=True)
        assert isinstance(value, torch.Tensor)
        return value.flatten()


def _shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


_LPIPS_CACHE: dict[tuple[str, ...], LPIPS] = {}
_CACHE_LOCK = threading.Lock()


def lpips(
    x: torch.Tensor,
    y: torch.Tensor,
    net: LpipsNet = "alex",
    *,
    input_range: InputRange = (-1, 1),
    reduction: Literal["none", "mean", "sum"] = "none",
) -> torch.Tensor:
    """LPIPS per image of two batches ``[N, 3, H, W]`` (or ``[N, 1, H, W]``) in ``input_range`` (see
    :class:`LPIPS`), differentiable; ``reduction="mean"`` or ``"sum"`` reduces over the images.

    The module is built once per ``(net, device)`` and kept for later calls, outside ``torch.inference_mode()``
    even when the first call is inside it, so that the order of calls never matters.

    Raises:
        as :class:`LPIPS` and :meth:`LPIPS.forward`; ValueError for another ``reduction``.

    Example:
        >>> loss = lpips(vae_toolkit.latents.decode(vae, z), target).mean()  # doctest: +SKIP
    """
    r = check_input_range(input_range)
    check_reduction(reduction)
    a = check_images(x, "x", r, (1, 3))
    _check_net(net)
    key = (net, str(a.device), *_file_key(*_LPIPS_NETS[net][1:3]))
    with _CACHE_LOCK:
        module = _LPIPS_CACHE.get(key)
        if module is None:
            with torch.inference_mode(False):  # kept for later calls, which may need gradients
                module = _LPIPS_CACHE[key] = LPIPS(net).to(a.device)
    if r == module.input_range:
        return reduce(module(x, y), reduction)
    a, b = check_pair(x, y, r)  # the cached module takes [-1, 1]
    return reduce(module(to_signed(a, r), to_signed(b, r)), reduction)


# --- FID ---------------------------------------------------------------------------------------------------


def lpips_weight_files(net: LpipsNet) -> tuple[_weights.WeightsFile, _weights.WeightsFile]:
    """The two files LPIPS ``net`` reads: the backbone's (torchvision's) and the linear heads' (lpips')."""
    _check_net(net)
    return _LPIPS_NETS[net][1], _LPIPS_NETS[net][2]


def load_networks(*, lpips: LpipsNet | None = None, fid: bool = False) -> None:
    """Read the weights of the networks named now (LPIPS ``lpips``, FID's Inception), so that a missing,
    truncated or wrong file fails before any other work; FID's network stays cached for the run.

    Raises:
        WeightsUnavailableError: a file is missing and cannot be downloaded.
        InvalidWeightsError: a file is truncated or holds another network; the message names it.
    """
    if lpips is not None:
        LPIPS(lpips)
    if fid:
        _inception(torch.device("cpu"))


_INCEPTION_CACHE: dict[tuple[str, ...], FIDInceptionV3] = {}


def _file_key(*specs: _weights.WeightsFile) -> tuple[str, ...]:
    """Which weight files a cached network was built from (path, size, mtime): another TORCH_HOME, or a file
    replaced meanwhile, builds (and checks) the network again."""
    out = []
    for spec in specs:
        path = _weights.locate(spec)
        st = path.stat()
        out += [str(path), str(st.st_size), str(st.st_mtime_ns)]
    return tuple(out)


def _inception(device: torch.device) -> FIDInceptionV3:
    """pytorch-fid's FID Inception with its weights, built once per device and weights file."""
    key = (str(device), *_file_key(_weights.FID_INCEPTION))
    with _CACHE_LOCK:
        if key not in _INCEPTION_CACHE:
            with torch.inference_mode(False):  # kept for the process: no inference tensors, whoever asks first
                net = FIDInceptionV3()
                expected = _shapes(net)
                counters = [k for k in expected if k.endswith("num_batches_tracked")]  # unused in evaluation
                state = _weights.load_state_dict(
                    _weights.FID_INCEPTION, expected, ignore_prefixes=("fc.",), optional=counters
                )  # the ImageNet classifier is not used
                net.load_state_dict(state, strict=not set(counters) - set(state))
                _INCEPTION_CACHE[key] = net.requires_grad_(False).eval().to(device)
        return _INCEPTION_CACHE[key]


def inception_features(
    images: torch.Tensor, dims: int = 2048, *, input_range: InputRange = (-1, 1), batch_size: int = 32
) -> torch.Tensor:
    """The ``[N, dims]`` float32 Inception features pytorch-fid computes of ``images`` ``[N, 3, H, W]`` (or
    ``[N, 1, H, W]``, the channel repeated, as PIL's ``convert("RGB")``) in ``input_range``.

    Each image is taken to ``[0, 1]`` (``(x + 1) / 2``, ``x`` or ``x / 255``: torchvision's ``ToTensor`` of uint8
    images), resized to 299x299 (bilinear, ``align_corners=False``), scaled to ``[-1, 1]`` and passed through
    pytorch-fid's FID Inception-v3; computed on the images' device, ``batch_size`` at a time, without gradients.

    Raises:
        TypeError, ValueError: as :func:`psnr`; ValueError also for ``dims`` not 64, 192, 768 or 2048.
        WeightsUnavailableError: pytorch-fid's weight file is missing and cannot be downloaded.
    """
    r = check_input_range(input_range)
    _check_dims(dims)
    x = check_images(images, "images", r, (1, 3))
    net = _inception(x.device)
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            part = to_unit(x[start : start + batch_size].to(torch.float32), r)  # pytorch-fid resizes [0, 1] images
            part = part.expand(-1, 3, -1, -1) if part.shape[1] == 1 else part
            part = F.interpolate(part, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net(2 * part - 1, dims))
    return torch.cat(out) if out else torch.zeros(0, dims, device=x.device)


def _check_dims(dims: object) -> None:
    if dims not in FIDInceptionV3.BLOCK_BY_DIMS:
        raise ValueError(f"dims must be one of 64, 192, 768, 2048 (pytorch-fid's), got {dims!r}")


class FrechetInceptionDistance(nn.Module):
    """FID between two image sets, accumulated batch by batch: pytorch-fid 0.3.0's value, in bounded memory.

    Each image goes through :func:`inception_features` (pytorch-fid's resize and FID Inception-v3); of each set
    only the count, the float64 sum of the ``dims``-d features and the float64 sum of their outer products are
    kept (``2 * (dims + dims^2) * 8`` bytes, 64 MiB for 2048: independent of the number of images). The mean
    is ``sum / n`` and the covariance ``(sum_outer - n * mean mean^T) / (n - 1)`` (``np.cov``'s, ddof 1);
    :meth:`compute` takes :func:`frechet_distance` of them.

    An ``nn.Module`` (``.to(device)`` moves the sums, which stay float64; ``fid(images, real)`` is
    :meth:`update`), with torchmetrics' ``update(images, real)`` / ``compute()`` / ``reset()``. A set's
    statistics can be saved and loaded in pytorch-fid's ``.npz`` layout (:meth:`save_statistics`,
    :meth:`load_statistics`), so that a reference set is computed once.

    Accumulators of parts of the data (other processes, ranks) combine by adding their sums
    (:meth:`merge`, :meth:`all_reduce`): the counts exactly, the float64 sums up to the rounding of float64
    additions in another order (relative 1e-16 per addition; products of float32 features are exact in float64),
    which changes the FID by far less than its own numerical precision.

    Images with NaN or inf values are left out (counted in :attr:`num_skipped`, logged).

    Args:
        dims: 2048 (the pool features every paper reports), or 768, 192, 64 as pytorch-fid's ``--dims``.
        device: where the statistics are kept; by default the device of the first images (the CPU for MPS,
            which has no float64).
        batch_size: images per Inception forward pass.
        input_range: the range of the images :meth:`update` takes: ``(-1, 1)`` (default), ``(0, 1)``
            (torchmetrics' ``normalize=True``) or ``(0, 255)`` (floats or uint8: torchmetrics' default).
        reset_real_features: whether :meth:`reset` also forgets the real set (torchmetrics' argument); ``False``
            keeps the reference statistics across evaluations.

    Raises:
        ValueError: ``dims`` not one of 64, 192, 768, 2048; another ``input_range``; a ``batch_size`` below 1.
        WeightsUnavailableError: pytorch-fid's weight file is missing and cannot be downloaded.

    Example:
        >>> fid = FrechetInceptionDistance(input_range=(0, 255))  # doctest: +SKIP
        >>> for originals, reconstructions in batches:  # uint8 [N, 3, H, W]  # doctest: +SKIP
        ...     fid.update(originals, True)
        ...     fid.update(reconstructions, real=False)
        >>> fid.compute(), fid.num_real  # doctest: +SKIP
        >>> fid.save_statistics("reference.npz")  # pytorch-fid reads it: python -m pytorch_fid reference.npz B
    """

    def __init__(
        self,
        dims: int = 2048,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        input_range: InputRange = (-1, 1),
        reset_real_features: bool = True,
    ) -> None:
        super().__init__()
        # nn.Module's set of non-persistent buffer names, frozen empty: the statistics are float64 sums kept by
        # set (dicts below), no buffer is registered, and the accumulator holds no per-image container
        self._non_persistent_buffers_set = frozenset()  # type: ignore[assignment]
        _check_dims(dims)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._low, self._high = check_input_range(input_range)
        _weights.locate(_weights.FID_INCEPTION)  # fail (or fetch) now, before any image is read
        self.dims = dims
        self.batch_size = batch_size
        self.reset_real_features = reset_real_features
        self._device = None if device is None else _stats_device(torch.device(device))
        self._sums: dict[bool, torch.Tensor] = {}
        self._outer: dict[bool, torch.Tensor] = {}
        self._counts = {True: 0, False: 0}
        self._loaded: dict[bool, tuple[np.ndarray, np.ndarray, int | None]] = {}
        self.num_skipped = 0

    @property
    def input_range(self) -> InputRange:
        """The range of the images :meth:`update` takes."""
        return (self._low, self._high)

    # statistics

    @property
    def num_real(self) -> int:
        """Images accumulated as real (originals); for loaded statistics, the count their file states (or 0)."""
        return self._count(True)

    @property
    def num_fake(self) -> int:
        """Images accumulated as generated (reconstructions)."""
        return self._count(False)

    def _count(self, real: bool) -> int:
        if real in self._loaded:
            return self._loaded[real][2] or 0
        return self._counts[real]

    @property
    def nbytes(self) -> int:
        """Bytes held by the running sums (the same for any number of images)."""
        return sum(t.numel() * t.element_size() for t in (*self._sums.values(), *self._outer.values()))

    def _sum_buffers(self, real: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device is None:
            self._device = _stats_device(device)
        if real not in self._sums:
            with torch.inference_mode(False):  # updated in place later, maybe outside inference mode
                self._sums[real] = torch.zeros(self.dims, dtype=torch.float64, device=self._device)
                self._outer[real] = torch.zeros(self.dims, self.dims, dtype=torch.float64, device=self._device)
        return self._sums[real], self._outer[real]

    def _apply(self, fn: Any, recurse: bool = True) -> FrechetInceptionDistance:
        """``.to()``, ``.cuda()``, ``.cpu()``: the sums follow the device and stay float64."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self._device or "cpu")).device
        self._device = _stats_device(device)
        with torch.inference_mode(False):
            for store in (self._sums, self._outer):
                for real, t in store.items():
                    store[real] = t.to(self._device)
        return self

    def reset(self, real: bool | None = None) -> None:
        """Forget the generated set, and the real set unless ``real=False`` (by default as
        ``reset_real_features`` says): torchmetrics' ``reset()``, keeping the reference statistics when asked."""
        forget_real = self.reset_real_features if real is None else real
        for which in (True, False) if forget_real else (False,):
            self._sums.pop(which, None)
            self._outer.pop(which, None)
            self._loaded.pop(which, None)
            self._counts[which] = 0
        self.num_skipped = 0

    # accumulating

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The ``[N, dims]`` float32 Inception features of ``images`` in the module's ``input_range``
        (:func:`inception_features`).

        Useful to compute the originals' features once and add them to several accumulators with
        :meth:`update_features`.
        """
        return inception_features(images, self.dims, input_range=self.input_range, batch_size=self.batch_size)

    def forward(self, images: torch.Tensor, real: bool) -> None:
        """:meth:`update`."""
        self.update(images, real)

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch ``[N, 3, H, W]`` (or ``[N, 1, H, W]``) in the module's ``input_range`` to the real
        (``real=True``) or generated set; ``real`` may be given by position, as torchmetrics' ``update(imgs, real)``.

        Images holding NaN or inf are left out with a log line.

        Raises:
            TypeError, ValueError: as :func:`inception_features`; ValueError also when that set was loaded from a
                statistics file.
        """
        x = check_images(images, "images", self.input_range, (1, 3))
        self._check_not_loaded(real)
        if x.is_floating_point():
            finite = torch.isfinite(x.detach()).flatten(1).all(1)
            if not bool(finite.all()):
                skipped = int((~finite).sum())
                self.num_skipped += skipped
                logger.warning("FID: %d image(s) with NaN or inf values left out of the %s set", skipped, _set(real))
                x = x[finite]
        if len(x):
            self.update_features(self.features(x), real=real)

    def update_real(self, images: torch.Tensor) -> None:
        """:meth:`update` with ``real=True``."""
        self.update(images, real=True)

    def update_fake(self, images: torch.Tensor) -> None:
        """:meth:`update` with ``real=False``."""
        self.update(images, real=False)

    def _check_not_loaded(self, real: bool) -> None:
        if real in self._loaded:
            raise ValueError(
                f"the {_set(real)} set holds statistics loaded from a file, which take no more images; call "
                f"reset(real=True) first, or use another accumulator"
            )

    def update_features(self, features: torch.Tensor, *, real: bool) -> None:
        """Add precomputed :meth:`features` ``[N, dims]`` to one set (rows with NaN or inf are left out)."""
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != self.dims:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a tensor [N, {self.dims}], got {shape}")
        self._check_not_loaded(real)
        finite = torch.isfinite(features).all(1)
        if not bool(finite.all()):
            skipped = int((~finite).sum())
            self.num_skipped += skipped
            logger.warning("FID: %d feature row(s) with NaN or inf left out of the %s set", skipped, _set(real))
            features = features[finite]
        total, outer = self._sum_buffers(real, features.device)
        f = features.detach().to(total.device).to(torch.float64)
        total += f.sum(0)
        outer += f.T @ f
        self._counts[real] += len(f)

    # combining

    def merge(self, other: FrechetInceptionDistance) -> FrechetInceptionDistance:
        """Add ``other``'s images (its sums and counts) to this accumulator; returns ``self``.

        Raises:
            ValueError: the two accumulators have different ``dims``, or a set loaded from a file in one has images
                in the other.
        """
        if other.dims != self.dims:
            raise ValueError(f"cannot merge FID accumulators of {self.dims} and {other.dims} dims")
        for real in (True, False):
            if real in other._loaded or real in self._loaded:
                if self._counts[real] or other._counts[real] or (real in self._loaded and real in other._loaded):
                    raise ValueError(
                        f"cannot merge FID accumulators: the {_set(real)} set was loaded from a statistics file in "
                        "one of them and holds images (or other statistics) in the other"
                    )
                self._loaded.setdefault(real, other._loaded.get(real))  # type: ignore[arg-type]
                continue
            if real in other._sums:
                total, outer = self._sum_buffers(real, other._sums[real].device)
                total += other._sums[real].to(total.device)
                outer += other._outer[real].to(outer.device)
            self._counts[real] += other._counts[real]
        self.num_skipped += other.num_skipped
        return self

    def all_reduce(self, group: torch.distributed.ProcessGroup | None = None) -> FrechetInceptionDistance:
        """A new accumulator holding the images of every rank of ``group`` (a collective: call it on every rank).

        This accumulator is left as it is, so calling it again does not count any image twice. Without an
        initialised process group (one process) it is a copy. The buffers are summed where they are (use a CPU
        accumulator with gloo, a CUDA one with NCCL); see the class docstring for exactness. Statistics loaded
        from a file are kept as they are (every rank is expected to have loaded the same file).
        """
        import torch.distributed as dist

        with torch.inference_mode(False):  # the copy's sums are updated in place later, in any mode
            out = copy.deepcopy(self)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return out
        device = out._device or torch.device("cpu")
        for real in (True, False):
            out._sum_buffers(real, device)
        counts = torch.tensor([out._counts[True], out._counts[False], out.num_skipped], dtype=torch.int64)
        counts = counts.to(out._sums[True].device)
        dist.all_reduce(counts, group=group)
        for real in (True, False):
            dist.all_reduce(out._sums[real], group=group)
            dist.all_reduce(out._outer[real], group=group)
        out._counts = {True: int(counts[0]), False: int(counts[1])}
        out.num_skipped = int(counts[2])
        return out

    # the distance

    def statistics(self, real: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` of one set as float64 numpy arrays: pytorch-fid's ``np.mean(act, axis=0)`` and
        ``np.cov(act, rowvar=False)``, from the running sums (or as loaded by :meth:`load_statistics`).

        Raises:
            ValueError: fewer than 2 images in that set.
        """
        if real in self._loaded:
            mu, sigma, _ = self._loaded[real]
            return mu.copy(), sigma.copy()
        n = self._counts[real]
        if n < 2:
            raise ValueError(f"FID needs at least 2 images in each set, the {_set(real)} set has {n}")
        mu_t = (self._sums[real] / n).cpu()
        outer = self._outer[real].cpu()
        sigma_t = (outer - n * torch.outer(mu_t, mu_t)) / (n - 1)
        sigma_t = (sigma_t + sigma_t.T) / 2  # the sums of products are symmetric up to the matrix product's rounding
        return mu_t.numpy(), sigma_t.numpy()

    def save_statistics(self, path: str | os.PathLike[str], real: bool = True) -> os.PathLike[str]:
        """Write one set's :meth:`statistics` to ``path`` in pytorch-fid's ``.npz`` layout (``mu``, ``sigma``, as its
        ``--save-stats`` writes them; pytorch-fid reads the file back), plus ``num_images``; returns the path.

        The file is written under a temporary name in the same folder, then moved into place.

        Raises:
            ValueError: fewer than 2 images in that set.
            OSError: the file cannot be written.
        """
        mu, sigma = self.statistics(real)
        return write_statistics(path, mu, sigma, self._count(real) or None)

    def load_statistics(self, path: str | os.PathLike[str], real: bool = True) -> None:
        """Take one set's statistics from a ``.npz`` file holding ``mu`` and ``sigma`` (pytorch-fid's
        ``--save-stats`` file, or :meth:`save_statistics`'), replacing that set; it then takes no more images.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not such a file, or statistics of another number of dimensions than ``dims``.
        """
        mu, sigma, n = read_statistics(path)
        if mu.shape != (self.dims,):
            raise ValueError(
                f"{path} holds statistics of {mu.shape[0]}-d features, this accumulator has dims={self.dims}; "
                f"create it with FrechetInceptionDistance(dims={mu.shape[0]})"
            )
        self._sums.pop(real, None)
        self._outer.pop(real, None)
        self._counts[real] = 0
        self._loaded[real] = (mu, sigma, n)

    def compute(self, *, warn: bool = True) -> float:
        """The Fréchet distance between the real and the generated set (:func:`frechet_distance`).

        Logs a warning (unless ``warn=False``, for a caller that says it once itself) when a set has fewer than
        2,048 images: FID is then biased and not comparable with values over other numbers of images (model cards
        use 5,000 or 50,000).

        Raises:
            ValueError: fewer than 2 images in a set; or, as pytorch-fid, an imaginary component above 1e-3.
            ImportError: scipy is not installed (``pip install "vae-toolkit[eval]"``).
        """
        mu1, sigma1 = self.statistics(True)
        mu2, sigma2 = self.statistics(False)
        known = [n for n in (self.num_real, self.num_fake) if n]
        if known and min(known) < FID_MIN_IMAGES and warn:
            logger.warning(
                "FID over %d real and %d generated images: below %d images FID is biased upward and not comparable "
                "with published values (model cards use 5,000 or 50,000)",
                self.num_real,
                self.num_fake,
                FID_MIN_IMAGES,
            )
        return frechet_distance(mu1, sigma1, mu2, sigma2)


def _set(real: bool) -> str:
    return "real" if real else "generated"


def _stats_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """The Fréchet distance ``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``, as pytorch-fid
    0.3.0's ``calculate_frechet_distance``.

    The square root is ``scipy.linalg.sqrtm(sigma1.dot(sigma2))``; when it is not finite, ``eps`` is added to both
    diagonals and it is taken again; an imaginary part (numerical error) is dropped if the diagonal's is within
    1e-3 of 0.

    Raises:
        ValueError: shapes that do not match, or an imaginary component above 1e-3 (pytorch-fid's check).
        ImportError: scipy is not installed.
    """
    import numpy as np

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"the two sets' statistics differ in shape: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and "
            f"{sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logger.warning("FID: the product of the covariances is singular; adding %s to their diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"FID: imaginary component {m} in the square root of the covariances' product")
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm(matrix)``: the value pytorch-fid's ``sqrtm(..., disp=False)[0]`` gives.

    scipy 1.16 deprecated ``disp`` (removed in 1.18) and computes the same square root without it (``disp=False``
    only added an error estimate, one more matrix product); older scipy prints to stdout without ``disp=False``.
    Its warning about a singular or ill-conditioned matrix (expected with fewer images than dimensions) goes
    to the log.
    """
    try:
        import scipy
        from scipy.linalg import sqrtm
    except ImportError as err:
        raise ImportError("FID needs scipy for the matrix square root: pip install 'vae-toolkit[eval]'") from err

    version = tuple(int(p) for p in scipy.__version__.split(".")[:2] if p.isdigit())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sqrtm(matrix) if version >= (1, 16) else sqrtm(matrix, disp=False)[0]
    for warning in caught:
        logger.info("FID: scipy.linalg.sqrtm: %s", warning.message)
    return result
