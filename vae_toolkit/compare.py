"""Two folders compared file by file: ``python -m vae_toolkit compare A B -o REPORT`` and :func:`compare_folders`.

``A`` holds the originals (the reference), ``B`` what became of them (a VAE's reconstructions, a latent
optimisation's outputs, a codec's decodes), under the same relative paths. Each pair is measured with the metrics
of :func:`vae_toolkit.evaluate.evaluate` (:data:`~vae_toolkit.eval_results.DEFINITIONS`), computed by
:mod:`vae_toolkit.metrics` on the two uint8 images: PSNR and MAE in float64 (evaluate's values within 1e-9),
SSIM and MS-SSIM in float32 (as evaluate computes them), LPIPS when its weights are there, and the FID of B's
images against A's over the compared pairs (``rfid`` in the summary), with evaluate's notes. The result is an
:class:`~vae_toolkit.eval_results.EvaluationResult` (one "model", named after B) and the report is evaluate's:
``metrics.csv``, ``summary.json``, ``images/`` (the worst pairs and seeded picks, with error maps) and
``index.html``, with the same guarantees (the folder checked before any image is read, never inside A or B,
never written through a link, rows streamed to ``metrics.csv``, a partial report on Ctrl-C or SIGTERM).

Pairing: a file of A and a file of B pair when their paths relative to the folders are equal (``match="name"``)
or equal without the extension (``match="stem"``: ``x/a.jpg`` with ``x/a.png``). Files in one folder only are
listed as unpaired (:attr:`ComparisonResult.only_in_a` / :attr:`~ComparisonResult.only_in_b`), not failures. A
pair whose images differ in size is a failure naming both sizes, unless ``resize=True``, which resizes B's image
to A's width and height (bilinear, antialiased when shrinking, as the library resizes; the aspect ratio is not
kept). Both images are read as ``evaluate`` reads its originals: RGB, turned as their EXIF orientation says,
refused above ``max_pixels`` before they are decoded; a file that cannot be read makes its pair a failure.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import metrics
from ._checks import DEFAULT_MAX_PIXELS, check_int
from ._signals import sigterm_exits
from .batching import Item, default_workers, failure_reason, group_batches, read_ahead
from .device_manager import resolve_device
from .eval_perceptual import FID_MIN_IMAGES, FID_NOTE, LpipsChoice, PerceptualMetrics, plan
from .eval_results import METRICS, EvaluationResult, Keeper, Shown, check_report_folder, versions
from .image_utils import open_for_resize
from .pixel_metrics import MS_SSIM_MIN_SIDE, SSIM_WINDOW
from .report_folder import RowWriter, clear_previous_report, write_manifest
from .sources import scan_source

__all__ = ["ComparisonResult", "compare_folders", "pair_files"]

logger = logging.getLogger(__name__)

Match = Literal["name", "stem"]


class _SizeMismatch(ValueError):
    """The two images of a pair differ in size (and ``resize`` is off): the pair's failure, as its message says."""


@dataclass
class ComparisonResult(EvaluationResult):
    """What :func:`compare_folders` measured: an :class:`~vae_toolkit.eval_results.EvaluationResult` whose one
    "model" is B, plus the files that found no partner.

    Attributes:
        only_in_a: Relative paths of A's files with no file of the same name (or stem) in B, sorted.
        only_in_b: The same for B.
        resized: The pairs (A's relative path) whose B image was resized to A's size (``resize=True``).
    """

    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """``images`` (the pairs found), ``evaluated``, ``failed``, ``not_done``, and ``only_in_a`` / ``only_in_b``."""
        return {**super().counts, "only_in_a": len(self.only_in_a), "only_in_b": len(self.only_in_b)}

    @property
    def images_definition(self) -> str:
        """What the report's definitions say of the images compared."""
        how = "same relative path" if self.settings.get("match") == "name" else "same relative path without extension"
        resize = (
            "; where the sizes differ, B's image is resized to A's size (bilinear), as asked"
            if self.settings.get("resize")
            else "; a pair whose sizes differ is a failure"
        )
        return (
            f"Each file of A (the reference) is paired with the file of B of the {how}; both are read as RGB, turned "
            f"as their EXIF orientation says, and compared as they are (no crop){resize}. Files in one folder only "
            "are listed as unpaired in summary.json."
        )

    def summary_json(self) -> dict[str, Any]:
        """The summary of :meth:`EvaluationResult.summary_json`, with ``"unpaired"`` and ``"resized"``."""
        out = super().summary_json()
        out["unpaired"] = {"only_in_a": list(self.only_in_a), "only_in_b": list(self.only_in_b)}
        out["resized"] = list(self.resized)
        return out

    def save_report(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """As :meth:`EvaluationResult.save_report`; a folder inside B is refused as well as one inside A.

        Raises:
            ReportInSourceError: (a ``ValueError``) ``folder`` is A or B or inside one of them.
            ReportExistsError, ReportLinkError, NotADirectoryError, OSError: as evaluate's report.
        """
        check_report_folder(Path(folder).expanduser(), overwrite, source=self.settings.get("b"))
        return super().save_report(folder, overwrite=overwrite)


def pair_files(
    a_keys: Sequence[str], b_keys: Sequence[str], match: Match = "name"
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """``(pairs, only_in_a, only_in_b)`` of two lists of relative paths: ``pairs`` are ``(a_key, b_key)`` sorted by
    ``a_key``; with ``match="stem"`` paths pair when equal without their extension.

    Raises:
        ValueError: ``match`` is another value, or (``"stem"``) two files of one folder share a stem
            (``a.jpg`` and ``a.png``), naming them.
    """
    if match not in ("name", "stem"):
        raise ValueError(f"match must be 'name' or 'stem', got {match!r}")

    def index(keys: Sequence[str], folder: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for key in keys:
            stem = key if match == "name" else os.path.splitext(key)[0]
            if stem in out:
                raise ValueError(
                    f"{folder} holds {out[stem]} and {key}, which pair by stem with the same file; rename one, or "
                    "pair by the whole name (match='name', --match name)"
                )
            out[stem] = key
        return out

    a, b = index(a_keys, "A"), index(b_keys, "B")
    pairs = sorted((a[s], b[s]) for s in a.keys() & b.keys())
    return pairs, sorted(a[s] for s in a.keys() - b.keys()), sorted(b[s] for s in b.keys() - a.keys())


def _folder(path: str | os.PathLike[str], name: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a folder path (str or os.PathLike), got {type(path).__name__}: {path!r}")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"folder {name} not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{name} must be a folder of images, got the file {folder}")
    return folder


def _outside(keys: list[str], root: Path, other: Path) -> list[str]:
    """``keys`` of ``root`` less those under ``other`` when it is a folder below ``root`` (B inside A, or A in B)."""
    try:
        below = other.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return keys
    return keys if below == "." else [k for k in keys if not k.startswith(f"{below}/")]


def _read_pair(key: str, a: Path, b: Path, resize: bool, max_pixels: int | None, resized: list[str]) -> Item:
    """Both images of a pair as one item whose image is the uint8 pair ``[2, H, W, 3]`` (B resized to A's size
    when asked)."""
    from PIL import Image

    first = open_for_resize(a, lambda _: None, max_pixels)[0]
    second = open_for_resize(b, lambda _: None, max_pixels)[0]
    if second.size != first.size:
        if not resize:
            raise _SizeMismatch(
                f"the images differ in size: A {first.width}x{first.height}, B {second.width}x{second.height}; pass "
                "--resize (resize=True in Python) to resize B's image to A's size"
            )
        second = second.resize(first.size, Image.Resampling.BILINEAR)
        resized.append(key)
    pair = np.stack([np.asarray(first), np.asarray(second)])
    return Item(key, (0, 0), torch.from_numpy(pair))


def _measure(a: np.ndarray, b: np.ndarray, device: torch.device) -> list[dict[str, Any]]:
    """evaluate's metrics of the pairs ``[N, H, W, 3]`` uint8 (one size) by :mod:`vae_toolkit.metrics`: PSNR and MAE
    in float64 on the CPU, SSIM and MS-SSIM in float32 on ``device`` (None where an image is too small for them)."""
    levels = (0, 255)
    x = torch.from_numpy(a).permute(0, 3, 1, 2)
    y = torch.from_numpy(b).permute(0, 3, 1, 2)
    n, side = len(a), min(a.shape[1:3])
    with torch.inference_mode():
        psnr = metrics.psnr(x.double(), y.double(), input_range=levels).tolist()
        mae = metrics.mae(x.double(), y.double(), input_range=levels).tolist()
        x, y = x.to(device), y.to(device)
        ssim = metrics.ssim(x, y, input_range=levels).tolist() if side >= SSIM_WINDOW else [None] * n
        ms = metrics.ms_ssim(x, y, input_range=levels).tolist() if side >= MS_SSIM_MIN_SIDE else [None] * n
    return [{"psnr": psnr[i], "ssim": ssim[i], "ms_ssim": ms[i], "mae": mae[i]} for i in range(n)]


def compare_folders(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    match: Match = "name",
    resize: bool = False,
    name: str | None = None,
    lpips: LpipsChoice | bool | None = None,
    fid: bool | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    worst: int = 4,
    picks: int = 4,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ComparisonResult:
    """Compare every file of ``b`` with the file of ``a`` of the same relative path; optionally write the report.

    Args:
        a: The folder of the originals (the reference), searched recursively as ``evaluate`` searches its source.
        b: The folder of what became of them (reconstructions, outputs), searched the same way.
        output: A report folder to write (as :meth:`EvaluationResult.save_report`); checked before any image is read.
        match: ``"name"``: pair equal relative paths; ``"stem"``: equal relative paths without the extension.
        resize: Resize B's image to A's size where they differ (bilinear); by default such a pair is a failure.
        name: The label of B in the rows' ``model`` column and the report (default: B's folder name).
        lpips: As in :func:`vae_toolkit.evaluate.evaluate`: ``None`` (AlexNet when its weights are there or can be
            fetched, else a note), a network's name (``"alex"``, ``"vgg"``, ...) or ``True`` (AlexNet) to require
            it, ``"none"`` or ``False`` to leave it out.
        fid: FID of B's images against A's over the compared pairs (``rfid`` in the summary): ``None`` when the
            Inception weights are there or can be fetched, else a note; ``True`` requires it; ``False``.
        batch_size: Pairs of one size measured together.
        workers: Image decoding threads (default: the CPU count, at most 8).
        device: Where SSIM, MS-SSIM, LPIPS and FID run (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``).
        worst, picks, seed: The report's pictures: the ``worst`` lowest-PSNR pairs and ``picks`` seeded picks.
        overwrite: Replace the report in a non-empty ``output`` (only the files its manifest lists).
        progress: Show a progress bar.
        max_pixels: A file whose header says more pixels fails its pair before it is decoded; ``None``: no limit.

    Returns:
        A :class:`ComparisonResult`: one row per compared pair, the failures (``A's relative path -> reason``),
        and the unpaired files. Rows go to ``output/metrics.csv`` as they come; on Ctrl-C (``KeyboardInterrupt``)
        or SIGTERM (``SystemExit`` 143) ``output`` keeps them and a ``summary.json`` saying ``"partial": true``,
        and the exception is raised again.

    Raises:
        FileNotFoundError: ``a`` or ``b`` does not exist. NotADirectoryError: one is a file.
        TypeError, ValueError: bad arguments; a folder without images; no pair at all; two files of one folder
            with one stem (``match="stem"``).
        ReportExistsError: (a ``FileExistsError``) ``output`` is not empty and not ``overwrite``.
        ReportInSourceError: (a ``ValueError``) ``output`` is ``a`` or ``b`` or inside one of them.
        ReportLinkError: (a ``FileExistsError``) a name the report writes is a symbolic link.
        OSError: ``output`` cannot be written (found before the first image).
        WeightsUnavailableError: (a ``FileNotFoundError``) LPIPS or FID asked for by name without its weights.

    Example:
        >>> result = compare_folders("originals/", "reconstructions/", "report/", lpips="alex")  # doctest: +SKIP
        >>> result.summary["reconstructions"]["psnr"]["mean"], result.only_in_a  # doctest: +SKIP
    """
    start = time.perf_counter()
    root_a, root_b = _folder(a, "A"), _folder(b, "B")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    for flag, value in (("resize", resize), ("overwrite", overwrite), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    check_int("batch_size", batch_size, 1)
    check_int("workers", workers, 1, allow_none=True)
    check_int("worst", worst, 0)
    check_int("picks", picks, 0)
    check_int("seed", seed, 0)
    check_int("max_pixels", max_pixels, 1, allow_none=True)
    where = torch.device(resolve_device(device))
    src_a, src_b = scan_source(root_a), scan_source(root_b)
    pairs, only_a, only_b = pair_files(
        _outside(src_a.keys, root_a, root_b), _outside(src_b.keys, root_b, root_a), match
    )
    if not pairs:
        raise ValueError(
            f"no file of {root_a} has a partner of the same relative path{' without extension' * (match == 'stem')} "
            f"in {root_b} (only in A: {_listed(only_a, 3) or 'none'}; only in B: {_listed(only_b, 3) or 'none'})"
            + ("; to pair a.jpg with a.png, pair by stem (match='stem', --match stem)" if match == "name" else "")
        )
    chosen = plan(lpips, fid)
    label = name or root_b.resolve().name or "B"
    perceptual = PerceptualMetrics(chosen, [label], where)
    metric_names = [*METRICS, *perceptual.metrics]
    bad = (("A", src_a.bad), ("B", src_b.bad))  # names that cannot be keys (not UTF-8)
    failures = {f"{key} (in {side})": reason for side, names in bad for key, reason in names.items()}
    notes = list(chosen.notes)
    settings: dict[str, Any] = {
        "source": str(root_a.absolute()),  # the report's "images from" line, and a report folder refused inside it
        "a": str(root_a.absolute()),
        "b": str(root_b.absolute()),
        "images": len(pairs) + len(failures),
        "match": match,
        "resize": resize,
        "preparation": "pairs compared as they are (EXIF orientation applied)"
        + ("; B resized to A's size where they differ" if resize else ""),
        "exif_orientation": "applied",
        "lpips": chosen.lpips,
        "rfid": {"images": "B's image of each compared pair against A's", "dims": perceptual.fid_dims}
        if chosen.fid
        else None,
        "max_pixels": max_pixels,
        "batch_size": batch_size,
        "device": str(where),
        "worst": worst,
        "picks": picks,
        "seed": seed,
        "versions": versions(chosen.fid),
    }
    rows: list[dict[str, Any]] = []
    resized: list[str] = []
    keeper = Keeper([label], worst, picks, seed)
    out = Path(output).expanduser() if output is not None else None
    writer: RowWriter | None = None

    def result(partial: bool = False, rfid: dict[str, dict[str, Any]] | None = None) -> ComparisonResult:
        done = {r["image"] for r in rows}
        return ComparisonResult(
            [label], metric_names, sorted(rows, key=lambda r: r["image"]), dict(sorted(failures.items())), settings,
            notes, time.perf_counter() - start, _shown=keeper, partial=partial, rfid=rfid or {},
            only_in_a=only_a, only_in_b=only_b, resized=sorted(k for k in set(resized) if k in done),
        )  # fmt: skip

    try:
        if out is not None:  # before the first image: refused, inside A or B, a link, or not writable
            check_report_folder(out, overwrite, source=root_a)
            check_report_folder(out, True, source=root_b)
            check_report_folder(out, True, probe=True)
            if overwrite:
                clear_previous_report(out)
            writer = RowWriter(out / "metrics.csv", ["image", "model", "width", "height", *metric_names])
            write_manifest(out, ["metrics.csv"], partial=True)
        for side, only in (("A", only_a), ("B", only_b)):
            if only:
                notes.append(f"{len(only)} file(s) only in {side}, not compared: {_listed(only)}{_ALL}")
        items = [(ka, (ka, root_a / ka, root_b / kb)) for ka, kb in pairs]
        try:
            with sigterm_exits():
                _run(
                    items,
                    lambda job: _read_pair(*job, resize, max_pixels, resized),
                    lambda pa, pb: _measure(pa, pb, where),
                    workers if workers is not None else default_workers(),
                    batch_size,
                    label,
                    perceptual,
                    keeper,
                    rows,
                    failures,
                    writer.add if writer is not None else None,
                    progress,
                )
        except (KeyboardInterrupt, SystemExit):
            if out is not None and writer is not None:
                partial = result(partial=True)
                partial.save_partial(out, ["metrics.csv"])
                counts = partial.counts
                logger.warning(
                    "stopped: partial report in %s: %d of %d pairs compared (summary.json says partial)",
                    out, counts["evaluated"], counts["images"],
                )  # fmt: skip
            raise
        rfid = perceptual.results(all_reduce=False) if perceptual.fid else {}
        if rfid and rfid[label]["rfid_images"] < FID_MIN_IMAGES:
            notes.append(FID_NOTE)
            logger.info("%s", FID_NOTE)
        if resized:
            kept = sorted(set(resized))
            notes.append(f"B's image resized to A's size for {len(kept)} pair(s): {_listed(kept)}{_ALL}")
        final = result(rfid=rfid)
        if out is not None:
            if writer is not None:
                writer.close()
            final.save_report(out, overwrite=True)  # replaces only what this run wrote (its manifest)
    finally:
        if writer is not None:
            writer.close()
    return final


_ALL = " (summary.json lists them all)"


def _listed(keys: Sequence[str], most: int = 10) -> str:
    """The first ``most`` of ``keys``, and how many more."""
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _run(
    items: Sequence[tuple[str, tuple[str, Path, Path]]],
    read: Callable[[tuple[str, Path, Path]], Item],
    measure: Callable[[np.ndarray, np.ndarray], list[dict[str, Any]]],
    workers: int,
    batch_size: int,
    label: str,
    perceptual: PerceptualMetrics,
    keeper: Keeper,
    rows: list[dict[str, Any]],
    failures: dict[str, str],
    sink: Callable[[list[dict[str, Any]]], None] | None,
    progress: bool,
) -> None:
    """Read the pairs on threads, batch them by size, measure each batch into ``rows`` (and ``sink``), the pairs
    that fail into ``failures``; both are the caller's, kept when the run is interrupted."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="compare", unit="pair", disable=not progress, dynamic_ncols=True)
    try:
        for batch in group_batches(read_ahead(items, read, workers, max(2 * batch_size, 2 * workers)), batch_size):
            if isinstance(batch, tuple):
                key, err = batch
                failures[key] = str(err) if isinstance(err, _SizeMismatch) else failure_reason(err)
                logger.warning("skipped %s: %s", key, failures[key])
                bar.update(1)
                continue
            pairs = np.stack([item.image.numpy() for item in batch])  # [N, 2, H, W, 3]
            originals, outputs = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
            values = measure(originals, outputs)
            if perceptual.lpips is not None:
                for v, d in zip(values, perceptual.lpips_values(originals, outputs), strict=True):
                    v["lpips"] = d
            perceptual.add(originals, {label: outputs})
            h, w = originals.shape[1:3]
            done = [
                {"image": item.key, "model": label, "width": int(w), "height": int(h), **v}
                for item, v in zip(batch, values, strict=True)
            ]
            if sink is not None:
                sink(done)  # a write error stops the run here, naming the file
            rows.extend(done)
            for i, item in enumerate(batch):
                keeper.offer(Shown(item.key, originals[i], {label: outputs[i]}), {label: values[i]["psnr"]})
            bar.update(len(batch))
    finally:
        bar.close()
