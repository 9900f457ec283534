"""Kernel Inception Distance (Bińkowski et al. 2018) as torch-fidelity 0.4 computes it, beside FID.

KID is the unbiased estimate of the squared maximum mean discrepancy between the Inception features of two
image sets, with the polynomial kernel ``k(x, y) = (x·y / d + 1)^3`` (degree 3, gamma ``1/d``, coef 1), averaged
over ``subsets`` random subsets of ``subset_size`` images drawn without replacement from each set; it is reported
as the mean and the standard deviation (``np.std``, ddof 0) over the subsets. Unlike FID it is unbiased for small
sets, which is why small-sample papers report it.

Subsets are drawn as torch-fidelity draws them: one ``np.random.RandomState(seed)`` (default seed 2020), and per
subset ``rng.choice(n1, subset_size, replace=False)`` then ``rng.choice(n2, subset_size, replace=False)``; so
on the same features and settings the values are torch-fidelity's ``kid_features_to_metric``'s (computed here in
float64). Defaults are torch-fidelity's (100 subsets of 1,000 images); torchmetrics' ``KernelInceptionDistance``
uses the same kernel and defaults of its own (``subsets=100, subset_size=1000``), with an unseeded draw. The
features are pytorch-fid's (:func:`vae_toolkit.metrics.inception_features`, 2048-d pool features), as in
:class:`~vae_toolkit.metrics.FrechetInceptionDistance`; torch-fidelity's own Inception resizes differently, so
its KID of the same images differs slightly.

Example:
    >>> kid = KernelInceptionDistance(subset_size=50)  # doctest: +SKIP
    >>> kid.update(originals, True); kid.update(reconstructions, False)  # doctest: +SKIP
    >>> mean, std = kid.compute()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from .metrics import InputRange, inception_features
from .pixel_metrics import check_images, check_input_range

if TYPE_CHECKING:
    import numpy as np
    import torch.distributed

__all__ = [
    "KID_SEED",
    "KID_SUBSETS",
    "KID_SUBSET_SIZE",
    "KernelInceptionDistance",
    "kernel_inception_distance",
    "polynomial_mmd",
]

logger = logging.getLogger(__name__)

#: torch-fidelity's defaults: ``kid_subsets``, ``kid_subset_size`` and ``rng_seed``.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020


def _as_array(features: object, name: str) -> np.ndarray:
    import numpy as np

    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be features [N, d], got shape {arr.shape}")
    return arr


def _check_count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, got {value!r}")
    return value


def polynomial_mmd(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1
) -> float:
    """The unbiased MMD² of two equally large samples ``[m, d]`` with ``k(a, b) = (gamma a·b + coef0)^degree``
    (``gamma`` ``1/d`` by default): the mean of ``k`` over pairs of distinct rows within each sample, minus twice
    its mean over all pairs across them (torch-fidelity's ``mmd2(..., mmd_est="unbiased")``)."""
    import numpy as np

    m = x.shape[0]
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1: torch.Tensor | np.ndarray,
    features2: torch.Tensor | np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> tuple[float, float]:
    """KID ``(mean, std)`` of two feature sets ``[N1, d]`` and ``[N2, d]``, as torch-fidelity computes it.

    Args:
        features1, features2: the Inception features of the two sets (tensors or arrays).
        subsets: how many subsets are drawn.
        subset_size: images per subset, drawn without replacement from each set: at most the smaller set's size.
        seed: the seed of the draw (torch-fidelity's ``rng_seed``).

    Raises:
        ValueError: not ``[N, d]`` features of the same ``d``, counts below 1 (``subset_size`` below 2), or a
            ``subset_size`` above a set's number of images.

    Example:
        >>> kernel_inception_distance(real_features, fake_features, subset_size=100)  # doctest: +SKIP
        (0.0123, 0.0011)
    """
    import numpy as np

    a, b = _as_array(features1, "features1"), _as_array(features2, "features2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sets' features differ in dimension: {a.shape[1]} and {b.shape[1]}")
    _check_count(subsets, "subsets", 1)
    _check_count(subset_size, "subset_size", 2)
    if subset_size > min(len(a), len(b)):
        raise ValueError(
            f"KID subset_size {subset_size} is larger than a set: {len(a)} and {len(b)} images; pass "
            f"subset_size={min(len(a), len(b))} or fewer (torch-fidelity's --kid-subset-size)"
        )
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), subset_size, replace=False)]
        y = b[rng.choice(len(b), subset_size, replace=False)]
        mmds[i] = polynomial_mmd(x, y)
    return float(np.mean(mmds)), float(np.std(mmds))


class KernelInceptionDistance(nn.Module):
    """KID between two image sets, accumulated batch by batch (:func:`kernel_inception_distance` on
    :func:`~vae_toolkit.metrics.inception_features`).

    KID needs the features themselves: each set's are kept on the CPU as float32 (8 KiB per image at 2048-d).

    Args:
        dims: the Inception features (2048, or 768, 192, 64 as pytorch-fid's ``--dims``).
        subsets, subset_size, seed: as :func:`kernel_inception_distance`.
        input_range: the range of the images: ``(-1, 1)`` (default), ``(0, 1)`` or ``(0, 255)`` (floats or uint8).
        batch_size: images per Inception forward pass.
        reset_real_features: whether :meth:`reset` also forgets the real set (torchmetrics' argument).
        group: the process group whose ranks' features :meth:`compute` gathers (when one is initialised).

    Raises:
        ValueError: another ``dims`` or ``input_range``, counts below 1 (``subset_size`` below 2).
        WeightsUnavailableError: pytorch-fid's weight file is missing and cannot be downloaded.
    """

    def __init__(
        self,
        dims: int = 2048,
        *,
        subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE,
        seed: int = KID_SEED,
        input_range: InputRange = (-1, 1),
        batch_size: int = 32,
        reset_real_features: bool = True,
        group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.subsets = _check_count(subsets, "subsets", 1)
        self.subset_size = _check_count(subset_size, "subset_size", 2)
        self.seed = seed
        self._low, self._high = check_input_range(input_range)
        self.batch_size = _check_count(batch_size, "batch_size", 1)
        inception_features(torch.zeros(0, 3, 1, 1), dims)  # dims checked, the weights found (or fetched) now
        self.dims = dims
        self.reset_real_features = reset_real_features
        self.group = group
        self._features: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    @property
    def input_range(self) -> InputRange:
        """The range of the images :meth:`update` takes."""
        return (self._low, self._high)

    @property
    def num_real(self) -> int:
        """Images in the real set (this rank's)."""
        return sum(len(f) for f in self._features[True])

    @property
    def num_fake(self) -> int:
        """Images in the generated set (this rank's)."""
        return sum(len(f) for f in self._features[False])

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch ``[N, 3, H, W]`` (or ``[N, 1, H, W]``) to the real or generated set; images holding NaN or
        inf are left out with a log line.

        Raises:
            TypeError, ValueError: as :func:`~vae_toolkit.metrics.inception_features`.
        """
        x = check_images(images, "images", self.input_range, (1, 3))
        if x.is_floating_point():
            finite = torch.isfinite(x.detach()).flatten(1).all(1)
            if not bool(finite.all()):
                logger.warning("KID: %d image(s) with NaN or inf values left out", int((~finite).sum()))
                x = x[finite]
        if len(x):
            features = inception_features(x, self.dims, input_range=self.input_range, batch_size=self.batch_size)
            self.update_features(features, real=real)

    def forward(self, images: torch.Tensor, real: bool) -> None:
        """:meth:`update`."""
        self.update(images, real)

    def update_features(self, features: torch.Tensor, *, real: bool) -> None:
        """Add precomputed features ``[N, dims]`` to one set.

        Raises:
            ValueError: not ``[N, dims]``.
        """
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != self.dims:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a tensor [N, {self.dims}], got {shape}")
        self._features[real].append(features.detach().to("cpu", torch.float32))

    def reset(self, real: bool | None = None) -> None:
        """Forget the generated set, and the real set unless ``real=False`` (by default as
        ``reset_real_features`` says)."""
        forget_real = self.reset_real_features if real is None else real
        self._features[False] = []
        if forget_real:
            self._features[True] = []

    def gathered(self, real: bool) -> torch.Tensor:
        """One set's features of every rank ``[N, dims]`` (a collective when a process group is initialised)."""
        import torch.distributed as dist

        mine = torch.cat(self._features[real]) if self._features[real] else torch.zeros(0, self.dims)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.group) == 1:
            return mine
        parts: list[torch.Tensor | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, mine, group=self.group)
        return torch.cat([p for p in parts if p is not None])

    def compute(self) -> tuple[float, float]:
        """KID ``(mean, std)`` over the subsets, of every rank's images.

        Raises:
            ValueError: a set has fewer images than ``subset_size`` (the message says how many it has).
        """
        return kernel_inception_distance(
            self.gathered(True),
            self.gathered(False),
            subsets=self.subsets,
            subset_size=self.subset_size,
            seed=self.seed,
        )
