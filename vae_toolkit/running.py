"""Running totals of the image metrics over many batches and ranks: ``update`` / ``compute`` / ``reset``.

Each class is an ``nn.Module`` (``.to(device)`` moves its state) holding float64 sums, never per-image data, and
computes one number over every image it was given, as torchmetrics' metrics do::

    psnr = RunningPSNR().to(device)
    for decoded, target in batches:
        psnr.update(decoded, target)
    psnr.compute()  # tensor(25.79, dtype=torch.float64): the mean of the per-image PSNRs

Which mean: :class:`RunningSSIM`, :class:`RunningMSSSIM`, :class:`RunningMAE`, :class:`RunningLPIPS` and
:class:`RunningPSNR` compute the **mean of the per-image values** (what a model card's "PSNR 25.8 ± 3.1"
reports, and :func:`vae_toolkit.metrics.psnr` ``(..., reduction="mean")`` of all the images at once).
``RunningPSNR(reduction="pooled")`` instead computes the PSNR of the squared error pooled over every pixel of
every image, as torchmetrics' ``PeakSignalNoiseRatio`` does: a lower number when the errors vary between
images (17.41 dB where the mean of per-image values is 25.79), so a result must say which one it is.
:meth:`RunningMetric.std` gives the standard deviation of the per-image values (``np.std``, ddof 0).

Across ranks: :meth:`RunningMetric.compute` sums the state of every rank (``torch.distributed.all_reduce``
on a copy, so a second call counts nothing twice) when a process group is initialised, and is then a
collective that every rank must call; the state is summed where it is (a CPU module with gloo, a CUDA one with
NCCL). Counts are exact, the float64 sums equal one process's up to the order of the additions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .metrics import LPIPS, InputRange, mae, ms_ssim, psnr, ssim
from .pixel_metrics import check_input_range, check_pair, check_reduction

if TYPE_CHECKING:
    import torch.distributed

__all__ = ["RunningLPIPS", "RunningMAE", "RunningMSSSIM", "RunningMetric", "RunningPSNR", "RunningSSIM"]


class RunningMetric(nn.Module):
    """The mean (and standard deviation) of a per-image metric over every image given to :meth:`update`.

    Subclasses set :meth:`values` (per-image values of a batch). The state is three float64 numbers: the sum of
    the values, of their squares, and the number of images.

    Args:
        input_range: the range of the images: ``(-1, 1)`` (default), ``(0, 1)`` or ``(0, 255)`` (floats or uint8).
        sync: whether :meth:`compute` sums the state of every rank when ``torch.distributed`` is initialised.
        group: the process group to sum over (the default group when None).

    Raises:
        ValueError: another ``input_range``.
    """

    state: torch.Tensor
    #: The names of the state's entries, in order.
    fields: tuple[str, ...] = ("sum", "sum_of_squares", "count")

    def __init__(
        self,
        *,
        input_range: InputRange = (-1, 1),
        sync: bool = True,
        group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.input_range = check_input_range(input_range)
        self.sync = sync
        self.group = group
        self.register_buffer("state", torch.zeros(len(self.fields), dtype=torch.float64))

    def _apply(self, fn: Any, recurse: bool = True) -> RunningMetric:
        """``.to()``, ``.cuda()``, ``.half()``: the state follows the device and stays float64."""
        state = self._buffers.pop("state")
        assert state is not None
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=state.device)).device
            self._buffers["state"] = state.to(device)
        return self

    def values(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-image values ``[N]`` of one batch."""
        raise NotImplementedError

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add a batch of pairs; returns their per-image values (without gradients).

        Raises:
            TypeError, ValueError: as the metric's function (:mod:`vae_toolkit.metrics`).
        """
        with torch.no_grad():
            v = self.values(x, y).detach()
            self._add(v)
        return v

    def _add(self, v: torch.Tensor) -> None:
        d = v.to(self.state.device, torch.float64)
        self.state[:3] += torch.stack([d.sum(), d.square().sum(), d.new_tensor(float(len(d)))])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`update`, returning the batch's per-image values (torchmetrics' ``forward``)."""
        return self.update(x, y)

    def reset(self) -> None:
        """Forget every image."""
        self.state.zero_()

    def synced_state(self) -> torch.Tensor:
        """The state summed over every rank (a copy; a collective when a process group is initialised)."""
        import torch.distributed as dist

        state = self.state.clone()
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(state, group=self.group)
        return state

    @property
    def count(self) -> int:
        """Images counted on this rank."""
        return int(self.state[self.fields.index("count")])

    def compute(self) -> torch.Tensor:
        """The mean of the per-image values over every image (of every rank), a 0-d float64 tensor.

        Raises:
            ValueError: no image was given.
        """
        total, _, n = self._totals()
        return total / n

    def std(self) -> torch.Tensor:
        """The standard deviation of the per-image values (ddof 0, as ``np.std``), a 0-d float64 tensor; NaN when
        a value is ``inf`` (the PSNR of identical images).

        Raises:
            ValueError: no image was given.
        """
        total, squares, n = self._totals()
        mean = total / n
        return (squares / n - mean * mean).clamp(min=0).sqrt()

    def _totals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total, squares, n = self.synced_state()[:3]
        if float(n) == 0:
            raise ValueError(f"{type(self).__name__} has no images: call update(x, y) before compute()")
        return total, squares, n


class RunningPSNR(RunningMetric):
    """PSNR in dB (peak 255, :func:`vae_toolkit.metrics.psnr`) over every image.

    Args:
        reduction: ``"mean"`` (default): the mean of the per-image PSNRs, as model cards report it (``inf`` when
            an image pair is identical); ``"pooled"``: ``10 log10(255^2 / MSE)`` of the MSE over every pixel of
            every image, torchmetrics' ``PeakSignalNoiseRatio(data_range=255)`` (``data_range=1.0`` on ``[0, 1]``
            images, ``(0, 1)`` here).
        input_range, sync, group: as :class:`RunningMetric`.

    Raises:
        ValueError: another ``reduction`` or ``input_range``.

    Example:
        >>> psnr = RunningPSNR(input_range=(0, 255), reduction="pooled")  # doctest: +SKIP
        >>> psnr.update(uint8_reconstructions, uint8_originals)  # doctest: +SKIP
        >>> psnr.compute()  # doctest: +SKIP
    """

    fields = ("sum", "sum_of_squares", "count", "squared_error", "pixels")

    def __init__(self, reduction: Literal["mean", "pooled"] = "mean", **kwargs: Any) -> None:
        self.reduction = check_reduction(reduction, ("mean", "pooled"))
        super().__init__(**kwargs)

    def values(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return psnr(x, y, input_range=self.input_range)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            a, b = check_pair(x, y, self.input_range)
            scale = 255.0 / (self.input_range[1] - self.input_range[0])
            mse = ((a - b) * scale).square().flatten(1).mean(1)
            v = 10 * torch.log10(255.0**2 / mse)
            self._add(v)
            pixels = a[0].numel() if len(a) else 0
            self.state[3] += (mse.double() * pixels).sum().to(self.state.device)
            self.state[4] += pixels * len(a)
        return v

    def compute(self) -> torch.Tensor:
        """The mean of the per-image PSNRs, or the PSNR of the pooled MSE (``reduction="pooled"``), 0-d float64.

        Raises:
            ValueError: no image was given.
        """
        if self.reduction == "mean":
            return super().compute()
        state = self.synced_state()
        if float(state[2]) == 0:
            raise ValueError("RunningPSNR has no images: call update(x, y) before compute()")
        return 10 * torch.log10(255.0**2 / (state[3] / state[4]))


class RunningSSIM(RunningMetric):
    """SSIM (:func:`vae_toolkit.metrics.ssim`, scikit-image's definition): the mean of the per-image values."""

    def values(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ssim(x, y, input_range=self.input_range)


class RunningMSSSIM(RunningMetric):
    """MS-SSIM (:func:`vae_toolkit.metrics.ms_ssim`, pytorch-msssim's): the mean of the per-image values."""

    def values(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ms_ssim(x, y, input_range=self.input_range)


class RunningMAE(RunningMetric):
    """MAE in levels 0-255 (:func:`vae_toolkit.metrics.mae`): the mean of the per-image values (equal to the
    error pooled over pixels when every image has the same size)."""

    def values(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mae(x, y, input_range=self.input_range)


class RunningLPIPS(RunningMetric):
    """LPIPS (:class:`vae_toolkit.metrics.LPIPS`): the mean of the per-image values, as torchmetrics'
    ``LearnedPerceptualImagePatchSimilarity(reduction="mean")``.

    Args:
        net: ``"alex"`` (default), ``"vgg"`` or ``"squeeze"``.
        input_range, sync, group: as :class:`RunningMetric`.

    Raises:
        ValueError, WeightsUnavailableError, InvalidWeightsError: as :class:`~vae_toolkit.metrics.LPIPS`.
    """

    def __init__(self, net: Literal["alex", "vgg", "squeeze"] = "alex", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lpips = LPIPS(net, input_range=self.input_range)

    def values(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y)
