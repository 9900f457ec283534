"""LPIPS per image and rFID per model for :func:`vae_toolkit.evaluate.evaluate`, through :mod:`vae_toolkit.metrics`.

:func:`plan` decides, before any model loads, which of the two run: a metric asked for by name (``lpips="alex"``,
``fid=True``, ``--lpips alex``, ``--fid``) whose weights cannot be found or fetched stops the run with the
weights' one-line message; a metric that is on only by default is left out with that line as a note, and the
rest of the report is made. :class:`PerceptualMetrics` then computes them batch by batch on the uint8 images
that ``evaluate`` compares: LPIPS per (image, model) row, and per model one running
:class:`~vae_toolkit.metrics.FrechetInceptionDistance` whose real set is the originals of the images that model
reconstructed. The Inception features of each original are computed once, whatever the number of models.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .metrics import FID_MIN_IMAGES

if TYPE_CHECKING:
    from .metrics import LPIPS, FrechetInceptionDistance

__all__ = ["FID_DIMS", "FID_MIN_IMAGES", "FID_NOTE", "PerceptualMetrics", "Plan", "plan"]

logger = logging.getLogger(__name__)

LpipsChoice = Literal["alex", "vgg", "squeeze", "none"]

#: The Inception features rFID compares: the 2048-d pool features every paper reports.
FID_DIMS = 2048

#: Said in the report's notes and once in the log when rFID comes from fewer images than a model card's.
FID_NOTE = (
    "rFID from fewer than 2,048 images is biased upward and not comparable with a model card's "
    "(SD VAE cards: 5,000 COCO images); compare only values over the same images."
)


@dataclass
class Plan:
    """What :func:`plan` decided: the LPIPS network (or None), whether rFID runs, and notes for the report."""

    lpips: Literal["alex", "vgg", "squeeze"] | None
    fid: bool
    notes: list[str] = field(default_factory=list)


def plan(lpips: LpipsChoice | bool | None, fid: bool | None) -> Plan:
    """Which perceptual metrics run, checked (and their weights fetched when online) before any model loads.

    Args:
        lpips: ``None`` (default: AlexNet when its weights are there or can be fetched, else left out with a
            note), ``"alex"`` / ``"vgg"`` / ``"squeeze"`` / ``True`` (required: AlexNet for ``True``),
            ``"none"`` / ``False``.
        fid: ``None`` (default: on when the Inception weights are there or can be fetched), ``True``
            (required), ``False``.

    Raises:
        ValueError: an unknown ``lpips`` value.
        WeightsUnavailableError: (a ``FileNotFoundError``) a metric asked for by name cannot get its weights.
        InvalidWeightsError: (a ``ValueError``) a weight file of a metric that would run is truncated or of
            another network (on by default or not: the file is there, and wrong).
    """
    from . import _weights
    from .metrics import load_networks, lpips_weight_files

    if lpips is True:
        lpips = "alex"
    if lpips is False:
        lpips = "none"
    if lpips is not None and lpips not in ("alex", "vgg", "squeeze", "none"):
        raise ValueError(f"lpips must be 'alex', 'vgg', 'squeeze' or 'none' (or None for the default), got {lpips!r}")
    out = Plan(lpips=None, fid=False)
    wanted: list[tuple[str, bool, list[_weights.WeightsFile]]] = []
    if lpips != "none":
        net = lpips or "alex"
        wanted.append((f"lpips:{net}", lpips is not None, list(lpips_weight_files(net))))
    if fid is not False:
        wanted.append(("fid", fid is True, [_weights.FID_INCEPTION]))
    for name, required, files in wanted:
        try:
            for spec in files:
                _weights.locate(spec)
        except _weights.WeightsUnavailableError as err:
            if required:
                raise
            label = "LPIPS" if name.startswith("lpips") else "rFID"
            note = f"{label} left out: {err}"
            out.notes.append(note)
            logger.info("%s", note)  # a note of the result: the CLI prints it, the report shows it
            continue
        if name == "fid":
            out.fid = True
        else:
            out.lpips = "vgg" if name == "lpips:vgg" else "squeeze" if name == "lpips:squeeze" else "alex"
    load_networks(lpips=out.lpips, fid=out.fid)  # a truncated or wrong file stops the run here, whoever asked
    return out


def _as_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float32 in ``[-1, 1]`` (exactly ``u / 127.5 - 1``)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1)


class PerceptualMetrics:
    """LPIPS rows and rFID accumulators of one evaluation (on ``device``, float32)."""

    def __init__(self, chosen: Plan, models: Sequence[str], device: torch.device) -> None:
        from .metrics import LPIPS, FrechetInceptionDistance

        self.device = device if device.type != "mps" else torch.device("cpu")  # FID keeps float64 statistics
        self.models = list(models)
        self.lpips_name = chosen.lpips
        self.fid_dims = FID_DIMS
        self.lpips: LPIPS | None = LPIPS(chosen.lpips).to(self.device) if chosen.lpips else None
        self.fid: dict[str, FrechetInceptionDistance] = (
            {m: FrechetInceptionDistance(self.fid_dims, device=self.device) for m in self.models} if chosen.fid else {}
        )
        self.too_small: set[tuple[int, int]] = set()

    @property
    def metrics(self) -> list[str]:
        """The row columns this adds (``lpips`` when it runs)."""
        return ["lpips"] if self.lpips is not None else []

    def lpips_values(self, originals: np.ndarray, recons: np.ndarray) -> list[float | None]:
        """LPIPS of each pair of ``[N, H, W, 3]`` uint8 images; None (with one log line per size) for images
        smaller than the network's receptive field."""
        assert self.lpips is not None
        h, w = originals.shape[1:3]
        if min(h, w) < self.lpips.min_side:
            if (h, w) not in self.too_small:
                self.too_small.add((h, w))
                logger.warning(
                    "LPIPS left empty for %dx%d images: the %s network needs at least %d pixels a side",
                    w, h, self.lpips_name, self.lpips.min_side,
                )  # fmt: skip
            return [None] * len(originals)
        with torch.inference_mode():
            d = self.lpips(_as_tensor(originals, self.device), _as_tensor(recons, self.device))
        return [float(v) if math.isfinite(v) else math.nan for v in d.double().cpu().tolist()]

    def add(self, originals: np.ndarray, recons: Mapping[str, np.ndarray]) -> None:
        """One batch of rFID: the originals' features once, added to the real set of every model; each model's
        reconstructions to its generated set."""
        if not self.fid:
            return
        first = self.fid[self.models[0]]
        with torch.inference_mode():
            real = first.features(_as_tensor(originals, self.device))
            for name in self.models:
                self.fid[name].update_features(real, real=True)
                self.fid[name].update(_as_tensor(recons[name], self.device), real=False)

    def results(self, all_reduce: bool) -> dict[str, dict[str, Any]]:
        """Per model ``{"rfid": value or None, "rfid_images": n}``, summed over the ranks with ``all_reduce``."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.models:
            acc = self.fid[name].all_reduce() if all_reduce else self.fid[name]
            n = min(acc.num_real, acc.num_fake)
            value = acc.compute(warn=False) if n >= 2 else None  # the caller says once that few images bias it
            out[name] = {"rfid": value, "rfid_images": n}
        return out
