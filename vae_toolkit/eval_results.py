"""What an evaluation measured, and what its numbers mean: :class:`EvaluationResult` and the metrics' definitions.

:func:`vae_toolkit.evaluate.evaluate` computes the rows; this module holds them, their summary statistics,
the images kept for the pictures, and the report folder's checks. Writing the report is
:mod:`vae_toolkit._report`'s, which reads a result's data and imports nothing from here or from ``evaluate``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .report_folder import ReportExistsError, ReportInSourceError, ReportLinkError, check_report_folder

if TYPE_CHECKING:
    pass


__all__ = [
    "DEFINITIONS",
    "HIGHER_IS_BETTER",
    "METRICS",
    "EvaluationResult",
    "Keeper",
    "ReportExistsError",
    "ReportInSourceError",
    "ReportLinkError",
    "Shown",
    "check_report_folder",
    "versions",
]

logger = logging.getLogger(__name__)


#: The metrics every evaluation computes, in the order of the CSV columns (``lpips`` follows when available).
METRICS = ("psnr", "ssim", "ms_ssim", "mae")


#: Whether a larger value means a better reconstruction.
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "ms_ssim": True, "mae": False, "lpips": False, "rfid": False}


#: What each metric is, as the report states it next to the numbers.
DEFINITIONS = {
    "psnr": "Peak signal-to-noise ratio in dB on the uint8 RGB values: 10 log10(255^2 / MSE), the peak being 255; "
    "identical images give inf. Higher is better; each +6 dB halves the RMS error.",
    "ssim": "Structural similarity (Wang et al. 2004) with an 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, "
    "data range 255, the mean over the valid (unpadded) window positions, averaged over R, G and B: the value of "
    "skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, "
    "data_range=255, channel_axis=-1), within 2e-5 (computed by pytorch-msssim in float32, its window normalised in "
    "float64). 1 means identical.",
    "ms_ssim": "Multi-scale SSIM (Wang et al. 2003): 5 scales, weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333, "
    "the same window, 2x2 average pooling between scales (pytorch-msssim's ms_ssim, per channel, then averaged "
    "over R, G and B). Empty for images whose shorter side is 160 pixels or less. 1 means identical.",
    "mae": "Mean absolute error of the uint8 RGB values (0-255). Lower is better.",
    "lpips": "Learned perceptual image patch similarity (Zhang et al. 2018), v0.1, on the uint8 images scaled to "
    "[-1, 1] (u / 127.5 - 1): the value of the lpips package 0.1.4's LPIPS(net=..., lpips=True) with the same "
    "weights (AlexNet unless the settings say vgg or squeeze). Lower is better.",
    "rfid": "Reconstruction FID: the Frechet distance between Inception-v3 pool features (2048-d, pytorch-fid's "
    "FID weights, bilinear resize to 299x299, inputs in [-1, 1]) of the prepared originals and of the model's "
    "reconstructions, float64 mean and covariance, as pytorch-fid 0.3.0 computes it (scipy's sqrtm, its offset "
    "fallback for a singular product), over the images the model reconstructed. Biased upward below 2,048 images. "
    "Lower is better.",
}


def _pick_priority(seed: int, key: str) -> int:
    """The seeded, rank-independent order of the fixed picks: the smallest values are shown."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()[:8], "big")


@dataclass
class Shown:
    """An image kept for the pictures: the prepared original and every model's reconstruction (uint8)."""

    key: str
    original: np.ndarray
    reconstructions: dict[str, np.ndarray]


class Keeper:
    """Keeps the ``worst`` lowest-PSNR images of each model and the ``picks`` seeded picks, nothing more.

    The picks are the images of smallest seeded priority that are not among the worst of any model: enough
    candidates are kept (``picks`` plus every worst slot) that the picks show ``picks`` other images.

    Ties go to the smaller key, so the kept images do not depend on the order they come in (or on the ranks).
    """

    def __init__(self, models: Sequence[str], worst: int, picks: int, seed: int) -> None:
        self.models, self.worst, self.picks, self.seed = list(models), worst, picks, seed
        self.candidates = picks + worst * len(self.models) if picks else 0
        self.lowest: dict[str, list[tuple[float, str]]] = {m: [] for m in self.models}  # (psnr, key), worst first
        self.picked: list[tuple[int, str]] = []  # (priority, key), smallest first
        self.images: dict[str, Shown] = {}

    def offer(self, shown: Shown, scores: Mapping[str, float]) -> None:
        """Keep ``shown`` if it is among the worst of a model (``scores``: model -> PSNR) or a pick."""
        for model in self.models:
            self.lowest[model] = sorted([*self.lowest[model], (scores[model], shown.key)])[: self.worst]
        self.picked = sorted([*self.picked, (_pick_priority(self.seed, shown.key), shown.key)])[: self.candidates]
        wanted = self.wanted()
        if shown.key in wanted:  # own copies: the arrays given may be views of a whole batch
            copies = {m: r.copy() for m, r in shown.reconstructions.items()}
            self.images[shown.key] = Shown(shown.key, shown.original.copy(), copies)
        for key in [k for k in self.images if k not in wanted]:
            del self.images[key]

    def worst_keys(self) -> set[str]:
        return {key for kept in self.lowest.values() for _, key in kept}

    def picks_shown(self) -> list[str]:
        """The picks: the first ``picks`` candidates by priority that are not among the worst images."""
        worst = self.worst_keys()
        return [key for _, key in self.picked if key not in worst][: self.picks]

    def wanted(self) -> set[str]:
        return self.worst_keys() | {key for _, key in self.picked}

    def merge(self, others: Sequence[Keeper]) -> None:
        """Fold the keepers of the other ranks into this one."""
        for other in others:
            for model in self.models:
                self.lowest[model] = sorted(self.lowest[model] + other.lowest[model])[: self.worst]
            self.picked = sorted(self.picked + other.picked)[: self.candidates]
            self.images.update(other.images)
        wanted = self.wanted()
        self.images = {k: v for k, v in sorted(self.images.items()) if k in wanted}


def _percentile(values: np.ndarray, q: float) -> float:
    with np.errstate(invalid="ignore"):
        v = float(np.percentile(values, q))
    return v if not math.isnan(v) else float(np.percentile(values, q, method="lower"))  # between two infs


def _stats(values: Sequence[float], keys: Sequence[str], higher_is_better: bool) -> dict[str, Any]:
    """mean, standard deviation (ddof=0; ``None`` when a value is infinite), median, 5th / 95th percentile,
    min, max and the worst image (ties: the first key)."""
    arr = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mean = float(np.mean(arr))
        std = float(np.std(arr))
    worst = int(np.argmin(arr) if higher_is_better else np.argmax(arr))
    return {
        "count": len(arr),
        "mean": mean if not math.isnan(mean) else math.inf,  # inf + inf, all identical
        "std": std if math.isfinite(std) else None,
        "median": _percentile(arr, 50),
        "p5": _percentile(arr, 5),
        "p95": _percentile(arr, 95),
        "min": float(np.min(arr)),
        "max": float(np.max(arr)),
        "worst": keys[worst],
        "worst_value": float(arr[worst]),
    }


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured: one row per (image, model), the summary, and the pictures' material.

    Attributes:
        models: The model names, in the order given.
        metrics: The metric columns: :data:`METRICS`, plus ``"lpips"`` when it was computed.
        rows: One dict per (image, model), sorted by image then model order: ``image`` (the key, a path relative
            to the source with ``/``), ``model``, ``width``, ``height`` and one value per metric (``None`` where
            a metric does not apply, ``inf`` PSNR for identical images).
        failures: ``key -> reason`` for images that could not be read or reconstructed (no rows for them).
        settings: Size, batch size, dtypes, devices, versions, the definitions of the metrics, ...
        notes: Lines for a person: e.g. why LPIPS was left out and what to install.
        seconds: Wall time of the run.
        rank: The torchrun rank that returned this result (0 in a single process); the content is the same on
            every rank.
        partial: The run was interrupted (Ctrl-C, SIGTERM): the rows are those done before it stopped.
        rfid: Per model ``{"rfid": value, "rfid_images": n}`` when rFID was computed (also in :attr:`summary`).
    """

    models: list[str]
    metrics: list[str]
    rows: list[dict[str, Any]]
    failures: dict[str, str]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rank: int = 0
    _shown: Keeper | None = field(default=None, repr=False)
    partial: bool = False
    rfid: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """``images`` (found), ``evaluated`` (with rows), ``failed``, and ``not_done`` (left by an interrupted run)."""
        evaluated = len({r["image"] for r in self.rows})
        total = int(self.settings.get("images", evaluated + len(self.failures)))
        return {
            "images": total,
            "evaluated": evaluated,
            "failed": len(self.failures),
            "not_done": max(0, total - evaluated - len(self.failures)),
        }

    @property
    def summary(self) -> dict[str, dict[str, Any]]:
        """Per model: ``count`` (images) and per metric its statistics (see :func:`_stats`); metrics without any
        value (MS-SSIM of small images) are ``None``."""
        out: dict[str, dict[str, Any]] = {}
        for model in self.models:
            rows = [r for r in self.rows if r["model"] == model]
            entry: dict[str, Any] = {"count": len(rows)}
            for metric in self.metrics:
                pairs = [(r[metric], r["image"]) for r in rows if r[metric] is not None]
                entry[metric] = (
                    _stats([v for v, _ in pairs], [k for _, k in pairs], HIGHER_IS_BETTER[metric]) if pairs else None
                )
            entry.update(self.rfid.get(model, {}))
            out[model] = entry
        return out

    @property
    def ranking(self) -> list[str]:
        """The model names by mean PSNR, best first (ties keep the given order)."""
        summary = self.summary
        psnr_mean = {m: (summary[m]["psnr"] or {}).get("mean", -math.inf) for m in self.models}
        return sorted(self.models, key=lambda m: -psnr_mean[m])

    @property
    def shown(self) -> dict[str, list[str]]:
        """The images the pictures show: ``{"worst <model>": keys (worst first), ..., "picks": keys}``."""
        if self._shown is None:
            return {}
        out = {f"worst {m}": [k for _, k in self._shown.lowest[m]] for m in self.models}
        out["picks"] = sorted(self._shown.picks_shown())
        return out

    @property
    def shown_images(self) -> dict[str, Shown]:
        """The pictures' material: key -> the prepared original and each model's reconstruction (uint8)."""
        if self._shown is None:
            return {}
        shown = {key for keys in self.shown.values() for key in keys}
        return {k: v for k, v in sorted(self._shown.images.items()) if k in shown}

    @property
    def definitions(self) -> dict[str, str]:
        """The definition of each metric of :attr:`metrics` (reference, parameters), as the report states it."""
        return {m: DEFINITIONS[m] for m in [*self.metrics, *(["rfid"] if self.rfid else [])]}

    @property
    def higher_is_better(self) -> dict[str, bool]:
        """Per metric of :attr:`metrics`: whether a higher value is better."""
        return {m: HIGHER_IS_BETTER[m] for m in [*self.metrics, *(["rfid"] if self.rfid else [])]}

    def summary_json(self) -> dict[str, Any]:
        """``summary.json``'s content (non-finite numbers as the strings ``"inf"`` / ``"-inf"``)."""
        return _json_safe(
            {
                "partial": self.partial,
                "counts": self.counts,
                "models": self.summary,
                "ranking": self.ranking,
                "ranking_by": "mean psnr, best first",
                "failures": dict(sorted(self.failures.items())),
                "metrics": self.definitions,
                "higher_is_better": self.higher_is_better,
                "settings": self.settings,
                "notes": self.notes,
                "shown": self.shown,
                "seconds": self.seconds,
            }
        )

    def save_report(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``metrics.csv``, ``summary.json``, ``images/*.png``, ``index.html`` and ``report-manifest.json``
        (the list of the files written) into ``folder``.

        With ``overwrite``, the files the previous report's manifest lists are replaced; no other file of the
        folder is removed or replaced (a picture whose name a user's file holds is written under another name).

        Raises:
            ReportExistsError: (a ``FileExistsError``) ``folder`` exists and is not empty, and not ``overwrite``.
            ReportInSourceError: (a ``ValueError``) ``folder`` is the evaluated folder or inside it.
            NotADirectoryError: ``folder`` is a file.
            OSError: a file could not be written; the message names it.
        """
        from ._report import write_report
        from .report_folder import clear_previous_report, write_manifest

        out = Path(folder).expanduser()
        check_report_folder(out, overwrite, source=self.settings.get("source"))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the report folder {out}: {err.strerror or err}") from err
        if overwrite:
            clear_previous_report(out)
        written: list[str] = []
        try:
            write_report(self, out, written)
        finally:  # what was written, also when a write failed: the next overwrite replaces it
            write_manifest(out, written, partial=self.partial)
        return out

    def save_partial(self, folder: str | os.PathLike[str], written: Sequence[str]) -> None:
        """After an interruption: ``summary.json`` (``"partial": true``, with the counts) beside the ``metrics.csv``
        written so far, and the manifest; no pictures."""
        import json

        from .report_folder import atomic_text, write_manifest

        out = Path(folder).expanduser()
        atomic_text(out / "summary.json", json.dumps(self.summary_json(), indent=2, allow_nan=False) + "\n")
        write_manifest(out, [*written, "summary.json"], partial=True)


def versions(with_fid: bool) -> dict[str, str | None]:
    """The versions an evaluation records: vae-toolkit and the libraries that computed it."""
    from importlib import metadata

    from ._version import __version__

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    names = ["torch", "diffusers", "pytorch-msssim", "numpy", "Pillow"] + (["scipy"] if with_fid else [])
    return {"vae-toolkit": __version__, **{name: version(name) for name in names}}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
