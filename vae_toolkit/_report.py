"""The evaluation report folder: ``metrics.csv``, ``summary.json``, ``images/*.png`` and ``index.html``.

The distributions and the error maps' colour scale are matplotlib figures (the ``eval`` extra); the side-by-side
pictures are assembled with Pillow from the images themselves. The page is ``report_template.html`` filled in
with :class:`string.Template`: self-contained (inline CSS, no script, no network), linking only to
``images/``, ``metrics.csv`` and ``summary.json``. The report reads a result through the
:class:`EvaluationResult` protocol and imports nothing of the code that computed it.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .report_folder import atomic_text, csv_text, write_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image, ImageDraw, ImageFont

TILE = 256  # longest side of a picture's tiles, in pixels
MIN_TILE = 192  # smaller images are enlarged (nearest neighbour, whole pixels) to about this
ERROR_GAIN = 4  # error maps: |difference| x 4, so that 64 levels (of 255) reach the top of the colour scale
ZOOM_TILE = 192
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip
COLORMAP = "inferno"  # matplotlib's: perceptually uniform, readable in grey


class EvaluationResult(Protocol):
    """The data of an evaluation that the report reads (:class:`vae_toolkit.evaluate.EvaluationResult` has it):
    the report needs the numbers and their definitions, not the module that computes them."""

    models: list[str]
    metrics: list[str]
    rows: list[dict[str, Any]]
    failures: dict[str, str]
    settings: dict[str, Any]
    notes: list[str]

    @property
    def summary(self) -> dict[str, dict[str, Any]]: ...
    @property
    def ranking(self) -> list[str]: ...
    @property
    def shown(self) -> dict[str, list[str]]: ...
    @property
    def shown_images(self) -> dict[str, Any]: ...
    @property
    def counts(self) -> dict[str, int]: ...
    @property
    def definitions(self) -> dict[str, str]: ...
    @property
    def higher_is_better(self) -> dict[str, bool]: ...
    def summary_json(self) -> dict[str, Any]: ...


UNITS = {"psnr": " dB", "ssim": "", "ms_ssim": "", "mae": "", "lpips": ""}

#: What the report says of the images (evaluate's); a result with an ``images_definition`` says its own.
IMAGES_DEFINITION = (
    "Each image is prepared as the encode and roundtrip commands prepare it (its own size center-cropped to a "
    "multiple of the largest spatial factor of the models, at least 8, or resized and center-cropped to N x N with "
    "--size N); each model encodes it (the latent distribution's mode, as its pipeline does) and decodes it, and the "
    "reconstruction is the lossless uint8 conversion of the decoded tensor (tensor_to_pil). The metrics compare the "
    "prepared original with that uint8 reconstruction."
)


def write_report(result: EvaluationResult, out: Path, written: list[str]) -> None:
    """Write the report's files into the existing folder ``out``, appending each one's relative path to ``written``
    as soon as it is there. A picture never replaces a file that is already there (see :func:`_free_name`)."""
    images = out / "images"
    try:
        images.mkdir(exist_ok=True)
    except OSError as err:
        raise write_error(images, err) from err
    _write_csv(result, out / "metrics.csv")
    written.append("metrics.csv")
    atomic_text(out / "summary.json", json.dumps(result.summary_json(), indent=2, allow_nan=False) + "\n")
    written.append("summary.json")
    pictures = _write_pictures(result, images, written)
    plots = _write_plots(result, images, written)
    scale = None
    if pictures:
        scale = _free_name(images, "error-scale.png")
        _save_figure(_error_scale(), images / scale)
        written.append(f"images/{scale}")
    atomic_text(out / "index.html", _html(result, pictures, plots, scale))
    written.append("index.html")


def _free_name(folder: Path, name: str) -> str:
    """``name``, or ``stem-2.png``, ``stem-3.png``, ... when a file of that name is there: a file the previous
    report wrote was removed before (its manifest), so one still there is someone else's and is kept."""
    stem, n = name.removesuffix(".png"), 1
    while (folder / name).exists() or (folder / name).is_symlink():
        n += 1
        name = f"{stem}-{n}.png"
    return name


def _save_png(image: Image.Image, path: Path) -> None:
    try:
        with open(path, "xb") as f:  # "x": never over a file that appeared meanwhile
            image.save(f, format="PNG", optimize=True)
    except OSError as err:
        raise write_error(path, err) from err


def _save_figure(fig: Figure, path: Path) -> tuple[int, int]:
    """A matplotlib figure as a PNG (never over a file that is there); its size in pixels."""
    try:
        with open(path, "xb") as f:
            fig.savefig(f, format="png")
    except OSError as err:
        raise write_error(path, err) from err
    width, height = fig.canvas.get_width_height()
    return width, height


def _write_csv(result: EvaluationResult, path: Path) -> None:
    columns = ["image", "model", "width", "height", *result.metrics]
    atomic_text(path, csv_text(columns, result.rows, header=True))


# --- drawing helpers ------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _colormap() -> np.ndarray:
    """matplotlib's ``inferno`` as a [256, 3] uint8 table: the error maps and their colour bar share it."""
    from matplotlib import colormaps

    return np.round(colormaps[COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel mean |a - b| over R, G, B (float32, 0..255)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=2, dtype=np.float32)


def _error_image(err: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return lut[np.clip(np.rint(err * ERROR_GAIN), 0, 255).astype(np.uint8)]


def _display_size(w: int, h: int, longest: int) -> tuple[int, int]:
    side = max(w, h)
    if side > longest:
        return max(1, round(w * longest / side)), max(1, round(h * longest / side))
    factor = max(1, MIN_TILE // side) if side < MIN_TILE else 1
    return w * factor, h * factor


def _tile(arr: np.ndarray, size: tuple[int, int]) -> Image.Image:
    from PIL import Image

    im = Image.fromarray(arr)
    if im.size == size:
        return im
    enlarge = size[0] >= im.size[0]
    return im.resize(size, Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int = 13, fill: Any = (20, 20, 20)) -> None:
    draw.text(xy, text, font=_font(size), fill=fill)


def _most_different_window(maps: Sequence[np.ndarray], side: int) -> tuple[int, int]:
    """Top-left ``(x, y)`` of the ``side x side`` window where ``maps`` (summed) is largest."""
    d = np.sum(maps, axis=0, dtype=np.float64)
    h, w = d.shape
    side_y, side_x = min(side, h), min(side, w)
    s = np.zeros((h + 1, w + 1))
    s[1:, 1:] = d.cumsum(0).cumsum(1)
    sums = s[side_y:, side_x:] - s[:-side_y, side_x:] - s[side_y:, :-side_x] + s[:-side_y, :-side_x]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x), int(y)


def _fmt(metric: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    digits = 2 if metric in ("psnr", "mae") else 4
    return f"{value:.{digits}f}"


# --- comparison pictures --------------------------------------------------------------------------


@dataclass
class _Picture:
    key: str
    anchor: str
    file: str
    width: int
    height: int
    caption: str


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "image"


def _write_pictures(result: EvaluationResult, folder: Path, written: list[str]) -> dict[str, _Picture]:
    """One PNG per shown image: original, reconstructions, error maps, and a zoom where the models differ most."""
    values = {(r["image"], r["model"]): r for r in result.rows}
    lut = _colormap() if result.shown_images else None
    pictures = {}
    for i, (key, shown) in enumerate(sorted(result.shown_images.items())):
        name = _free_name(folder, f"compare-{i:03d}-{_slug(key.rsplit('.', 1)[0])}.png")
        assert lut is not None
        image, zoom = _comparison(shown.original, shown.reconstructions, result.models, values, key, lut)
        _save_png(image, folder / name)
        written.append(f"images/{name}")
        h, w = shown.original.shape[:2]
        scores = "; ".join(
            f"{m}: PSNR {_fmt('psnr', values[(key, m)]['psnr'])} dB, SSIM {_fmt('ssim', values[(key, m)]['ssim'])}"
            for m in result.models
        )
        caption = f"{key} ({w}x{h}). {scores}. {zoom}"
        pictures[key] = _Picture(key, f"img-{i:03d}", f"images/{name}", image.width, image.height, caption)
    return pictures


def _zoom_window(h: int, w: int) -> tuple[int, int, int]:
    """The zoom's square side (pixels of the image, at most the image) and its whole-pixel magnification."""
    side = min(max(8, min(h, w) // 4), ZOOM_TILE // 2, h, w)
    return min(side, w), min(side, h), max(1, ZOOM_TILE // side)


def _comparison(
    original: np.ndarray,
    recons: dict[str, np.ndarray],
    models: Sequence[str],
    values: dict[tuple[str, str], dict[str, Any]],
    key: str,
    lut: np.ndarray,
) -> tuple[Image.Image, str]:
    """The picture of one image, and the sentence that says what its zoom shows."""
    from PIL import Image, ImageDraw

    h, w = original.shape[:2]
    tw, th = _display_size(w, h, TILE)
    errors = {m: _error(original, recons[m]) for m in models}
    # where the models differ most: between each other when there are several, from the original when one
    if len(models) > 1:
        maps = [_error(recons[a], recons[b]) for i, a in enumerate(models) for b in models[i + 1 :]]
    else:
        maps = [errors[models[0]]]
    cw, ch, factor = _zoom_window(h, w)
    zx, zy = _most_different_window(maps, max(cw, ch))
    zw, zh = cw * factor, ch * factor

    columns = 1 + 2 * len(models)
    gap, label_h = 10, 34
    col_w = max(tw, zw)
    width = gap + columns * (col_w + gap)
    height = label_h + th + gap + zh + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    panels: list[tuple[str, np.ndarray]] = [("original", original)]
    for m in models:
        r = values[(key, m)]
        panels.append((f"{m}\nPSNR {_fmt('psnr', r['psnr'])} dB", recons[m]))
    for m in models:
        panels.append((f"{m} error (|diff| x{ERROR_GAIN})\nMAE {_fmt('mae', values[(key, m)]['mae'])}", errors[m]))
    y_full, y_zoom = label_h, label_h + th + gap
    for c, (label, full) in enumerate(panels):
        x = gap + c * (col_w + gap)
        _text(draw, (x, 2), label, 12)
        arr = _error_image(full, lut) if full.ndim == 2 else full
        canvas.paste(_tile(arr, (tw, th)), (x, y_full))
        crop = full[zy : zy + ch, zx : zx + cw]
        zarr = _error_image(crop, lut) if crop.ndim == 2 else crop
        canvas.paste(_tile(np.ascontiguousarray(zarr), (zw, zh)), (x, y_zoom))
    sx, sy = tw / w, th / h  # the zoomed region, framed on the original
    draw.rectangle(
        (gap + zx * sx, y_full + zy * sy, gap + (zx + cw) * sx - 1, y_full + (zy + ch) * sy - 1),
        outline=(255, 220, 0),
        width=2,
    )
    what = "the models differ most" if len(models) > 1 else "the error is largest"
    scale = "full size" if (tw, th) == (w, h) else f"shown at {tw / w:.0%}"
    zoom = f"Top row {scale}; bottom row: the {cw}x{ch} pixels at ({zx}, {zy}) where {what}, magnified x{factor}."
    return canvas, zoom


def _error_scale() -> Figure:
    """The error maps' colour scale: levels of mean absolute difference, as the maps draw them."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 0.9), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    mappable = ScalarMappable(norm=Normalize(0, 255 / ERROR_GAIN), cmap=COLORMAP)
    bar = fig.colorbar(mappable, cax=ax, orientation="horizontal", extend="max")
    bar.set_label(f"error map: mean |difference| over R, G, B, in levels of 255 (x{ERROR_GAIN}: 64+ saturates)")
    return fig


# --- distributions --------------------------------------------------------------------------------


def _write_plots(result: EvaluationResult, folder: Path, written: list[str]) -> dict[str, tuple[str, int, int, str]]:
    """A box plot per metric (one row and colour per model): file, width, height, note."""
    plots = {}
    for metric in result.metrics:
        per_model = {
            m: [r[metric] for r in result.rows if r["model"] == m and r[metric] is not None] for m in result.models
        }
        if not any(per_model.values()):
            continue
        infinite = sum(1 for v in per_model.values() for x in v if math.isinf(x))
        finite = {m: np.asarray([x for x in v if math.isfinite(x)], dtype=np.float64) for m, v in per_model.items()}
        name = _free_name(folder, f"distribution-{metric}.png")
        figure = _box_plot(metric, finite, result.models, result.higher_is_better[metric])
        width, height = _save_figure(figure, folder / name)
        written.append(f"images/{name}")
        note = f"{infinite} identical reconstruction(s) (PSNR inf) are not drawn." if infinite else ""
        plots[metric] = (f"images/{name}", width, height, note)
    return plots


def _box_plot(metric: str, values: dict[str, np.ndarray], models: Sequence[str], higher: bool) -> Figure:
    """matplotlib's box plot of one metric, a row per model (best on top), with the mean as a white dot."""
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(7.2, 1.2 + 0.55 * len(models)), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    order = list(reversed(models))  # matplotlib draws the first row at the bottom
    data = [values[m] if len(values[m]) else np.array([np.nan]) for m in order]
    boxes = ax.boxplot(
        data,
        orientation="horizontal",
        tick_labels=order,
        patch_artist=True,
        showmeans=True,
        meanprops={"marker": "o", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 5},
        medianprops={"color": "black"},
        flierprops={"marker": ".", "markersize": 4},
    )
    for patch, m in zip(boxes["boxes"], order, strict=True):
        r, g, b = PALETTE[models.index(m) % len(PALETTE)]
        patch.set_facecolor((r / 255, g / 255, b / 255, 0.55))
    better = "higher is better" if higher else "lower is better"
    ax.set_xlabel(f"{metric}{UNITS.get(metric, '')} per image ({better})")
    ax.grid(axis="x", alpha=0.3)
    return fig


# --- the page -------------------------------------------------------------------------------------

CARD_METRICS = ("psnr", "ssim", "lpips")  # the model card's columns after rFID, as SD VAE cards report them


def _html(
    result: EvaluationResult,
    pictures: dict[str, _Picture],
    plots: dict[str, tuple[str, int, int, str]],
    scale: str | None = None,
) -> str:
    from importlib.resources import files
    from string import Template

    e = html.escape
    settings = result.settings
    counts = result.counts
    size_text = f" ({settings['size']} px)" if settings.get("size") else ""
    meta = (
        f"{counts['images']} images from <code>{e(str(settings.get('source')))}</code> "
        f"({counts['evaluated']} evaluated, {counts['failed']} failed), "
        f"{e(settings.get('preparation', ''))}{size_text}; "
        f"models: {e(', '.join(result.models))}; "
        f"vae-toolkit {e(str(settings.get('versions', {}).get('vae-toolkit')))}, "
        f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}."
    )
    template = Template(files("vae_toolkit").joinpath("report_template.html").read_text(encoding="utf-8"))
    return template.substitute(
        models=e(", ".join(result.models)),
        meta=meta,
        notes="\n".join(f'<p class="note">{e(n)}</p>' for n in result.notes),
        model_card=_model_card(result),
        distributions=_distributions(plots),
        ranking=_ranking(result),
        statistics=_statistics(result),
        failures=_failures(result),
        pictures=_pictures(result, pictures, scale),
        definitions="\n".join(f"<dt>{e(metric)}</dt><dd>{e(text)}</dd>" for metric, text in result.definitions.items())
        + f"\n<dt>images</dt><dd>{e(getattr(result, 'images_definition', IMAGES_DEFINITION))}</dd>",
        settings=e(json.dumps(settings, indent=2)),
    )


def _mean_std(metric: str, stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    mean, std = stats["mean"], stats.get("std")
    if std is None or not math.isfinite(std):
        return _fmt(metric, mean)
    return f"{_fmt(metric, mean)} ± {_fmt(metric, std)}"


def _model_card(result: EvaluationResult) -> str:
    """The table a model card shows: rFID, then mean ± standard deviation over the images, and N."""
    e = html.escape
    summary = result.summary
    metrics = [m for m in CARD_METRICS if m in result.metrics]
    head = '<tr><th class="model">model</th><th>rFID ↓</th>'
    head += "".join(
        f"<th>{e(m.upper())}{e(UNITS[m])} {'↑' if result.higher_is_better[m] else '↓'}</th>" for m in metrics
    )
    head += "<th>N</th></tr>"
    rows = []
    for m in result.models:
        s = summary[m]
        rfid = s.get("rfid")
        rfid_text = "–" if rfid is None else f"{rfid:.2f}"
        if rfid is not None and s.get("rfid_images") != s["count"]:
            rfid_text += f" ({s.get('rfid_images')} images)"
        cells = "".join(f"<td>{_mean_std(metric, s[metric])}</td>" for metric in metrics)
        rows.append(f'<tr><td class="model">{e(m)}</td><td>{rfid_text}</td>{cells}<td>{s["count"]}</td></tr>')
    missing = [m for m in CARD_METRICS if m not in result.metrics]
    note = (
        "mean ± standard deviation over the images (numpy's std, ddof=0); N: images reconstructed. "
        "rFID: – where it was not computed"
        + (
            f"; {', '.join(x.upper() for x in missing)} not computed in this run (see the notes above)"
            if missing
            else ""
        )
        + ". Definitions at the end of the page."
    )
    return (
        f'<div class="scroll"><table id="summary"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
        f'<p class="meta">{e(note)}</p>'
    )


def _distributions(plots: dict[str, tuple[str, int, int, str]]) -> str:
    e = html.escape
    return "\n".join(
        f'<figure><img src="{e(file)}" width="{w}" height="{h}" alt="{e(metric)} per image">'
        + (f"<figcaption>{e(note)}</figcaption>" if note else "")
        + "</figure>"
        for metric, (file, w, h, note) in plots.items()
    )


def _wins(result: EvaluationResult) -> dict[str, int]:
    """Per model, the images on which its PSNR is strictly the best of all models (ties count for none)."""
    by_image: dict[str, dict[str, float]] = {}
    for r in result.rows:
        if r["psnr"] is not None:
            by_image.setdefault(r["image"], {})[r["model"]] = r["psnr"]
    wins = dict.fromkeys(result.models, 0)
    for scores in by_image.values():
        if len(scores) < len(result.models):
            continue
        best = max(scores.values())
        winners = [m for m, v in scores.items() if v == best]
        if len(winners) == 1:
            wins[winners[0]] += 1
    return wins


def _ranking(result: EvaluationResult) -> str:
    e = html.escape
    summary = result.summary
    wins = _wins(result)
    compared = len({r["image"] for r in result.rows if r["psnr"] is not None})
    items = []
    for m in result.ranking:
        s = summary[m]["psnr"]
        mean = _fmt("psnr", s["mean"]) if s else "–"
        color = PALETTE[result.models.index(m) % len(PALETTE)]
        best = f"; best PSNR on {wins[m]} of {compared} images" if len(result.models) > 1 else ""
        items.append(
            f'<li><span class="swatch" style="background: rgb{color}"></span><b>{e(m)}</b>: '
            f"mean PSNR {mean} dB{best}</li>"
        )
    return f'<ol id="ranking">{"".join(items)}</ol><p class="meta">Ordered by mean PSNR, best first.</p>'


def _statistics(result: EvaluationResult) -> str:
    e = html.escape
    summary, models, higher_is_better = result.summary, result.models, result.higher_is_better
    stats = {True: ("mean", "std", "median", "p5", "min"), False: ("mean", "std", "median", "p95", "max")}
    head1 = '<tr><th class="model" rowspan="2">model</th><th rowspan="2">images</th>'
    head2 = "<tr>"
    for metric in result.metrics:
        cols = stats[higher_is_better[metric]]
        arrow = "↑" if higher_is_better[metric] else "↓"
        head1 += f'<th colspan="{len(cols)}">{e(metric)}{e(UNITS[metric])} ({arrow})</th>'
        head2 += "".join(f"<th>{s}</th>" for s in cols)
    parts = [f'<div class="scroll"><table id="statistics"><thead>{head1}</tr>{head2}</tr></thead><tbody>']
    best: dict[tuple[str, str], float] = {}
    for metric in result.metrics:
        for stat in stats[higher_is_better[metric]]:
            if stat == "std":
                continue
            vals = [summary[m][metric][stat] for m in models if summary[m][metric]]
            if vals:
                best[(metric, stat)] = max(vals) if higher_is_better[metric] else min(vals)
    for m in models:
        row = f'<tr><td class="model">{e(m)}</td><td>{summary[m]["count"]}</td>'
        for metric in result.metrics:
            s = summary[m][metric]
            for stat in stats[higher_is_better[metric]]:
                value = s.get(stat) if s else None
                is_best = value is not None and len(models) > 1 and value == best.get((metric, stat))
                cls = ' class="best"' if is_best else ""
                row += f"<td{cls}>{_fmt(metric, value)}</td>"
        parts.append(row + "</tr>")
    parts.append("</tbody></table></div>")
    parts.append(
        '<p class="meta">std: standard deviation over the images; p5 / p95: 5th / 95th percentile; green: the best '
        'model in that column. Every value per image is in <a href="metrics.csv">metrics.csv</a>, the statistics '
        'in <a href="summary.json">summary.json</a>.</p>'
    )
    parts.append('<table id="worst"><thead><tr><th class="model">model</th>')
    parts += [f"<th>worst {e(metric)}</th>" for metric in result.metrics]
    parts.append("</tr></thead><tbody>")
    for m in models:
        cells = "".join(
            f"<td>{e(summary[m][metric]['worst'])} ({_fmt(metric, summary[m][metric]['worst_value'])})</td>"
            if summary[m][metric]
            else "<td>–</td>"
            for metric in result.metrics
        )
        parts.append(f'<tr><td class="model">{e(m)}</td>{cells}</tr>')
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _failures(result: EvaluationResult) -> str:
    if not result.failures:
        return ""
    e = html.escape
    items = "".join(f"<li><code>{e(k)}</code>: {e(v)}</li>" for k, v in sorted(result.failures.items()))
    return f"<h2>Failures ({len(result.failures)})</h2><ul>{items}</ul>"


def _pictures(result: EvaluationResult, pictures: dict[str, _Picture], scale: str | None) -> str:
    """Each image once: in the first section that lists it; later sections link to it."""
    e = html.escape
    parts = [
        '<p class="meta">Each picture: the prepared original, each model\'s reconstruction and its error map '
        f"(mean absolute difference over R, G, B, amplified x{ERROR_GAIN}, on the colour scale below), then a "
        "zoom on the region (yellow frame) where the models differ most; each caption says the zoom's "
        "magnification.</p>"
    ]
    if scale is not None:
        parts.append(f'<img src="images/{html.escape(scale)}" alt="colour scale of the error maps">')
    placed: set[str] = set()
    for section, keys in result.shown.items():
        keys = [k for k in keys if k in pictures]
        if not keys:
            continue
        if section == "picks":
            title = f"Fixed picks (seed {result.settings.get('seed')}), other than the images above"
        else:
            title = f"Worst images of {section.removeprefix('worst ')} (lowest PSNR first)"
        parts.append(f"<h3>{e(title)}</h3>")
        for key in keys:
            p = pictures[key]
            if key in placed:
                parts.append(f'<figure class="also"><a href="#{p.anchor}">{e(key)}</a>: shown above.</figure>')
                continue
            placed.add(key)
            parts.append(
                f'<figure id="{p.anchor}"><img src="{e(p.file)}" width="{p.width}" height="{p.height}" '
                f'alt="{e(key)}" loading="eager"><figcaption>{e(p.caption)}</figcaption></figure>'
            )
    return "\n".join(parts)
