"""The evaluation report folder: ``metrics.csv``, ``summary.json``, ``images/*.png`` and ``index.html``.

Drawn with Pillow only (no plotting library); the page is self-contained (inline CSS, no script, no
network) and links only to ``images/``.
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
    from PIL import Image, ImageDraw, ImageFont

TILE = 256  # longest side of a picture's tiles, in pixels
MIN_TILE = 192  # smaller images are enlarged (nearest neighbour, whole pixels) to about this
ERROR_GAIN = 4  # error maps: |difference| x 4, so that 64 levels (of 255) reach the top of the colour scale
ZOOM_TILE = 192
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip
_INFERNO = [(0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)),
            (1.0, (252, 255, 164))]  # fmt: skip


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
    atomic_text(out / "index.html", _html(result, pictures, plots))
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
    x = np.linspace(0, 1, 256)
    stops = [s for s, _ in _INFERNO]
    return np.stack([np.interp(x, stops, [c[i] for _, c in _INFERNO]) for i in range(3)], axis=1).astype(np.uint8)


_LUT = _colormap()


def _error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel mean |a - b| over R, G, B (float32, 0..255)."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=2, dtype=np.float32)


def _error_image(err: np.ndarray) -> np.ndarray:
    return _LUT[np.clip(np.rint(err * ERROR_GAIN), 0, 255).astype(np.uint8)]


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
    file: str
    width: int
    height: int
    caption: str


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "image"


def _write_pictures(result: EvaluationResult, folder: Path, written: list[str]) -> dict[str, _Picture]:
    """One PNG per shown image: original, reconstructions, error maps, and a zoom where the models differ most."""
    values = {(r["image"], r["model"]): r for r in result.rows}
    pictures = {}
    for i, (key, shown) in enumerate(sorted(result.shown_images.items())):
        name = _free_name(folder, f"compare-{i:03d}-{_slug(key.rsplit('.', 1)[0])}.png")
        image = _comparison(key, shown.original, shown.reconstructions, result.models, values)
        _save_png(image, folder / name)
        written.append(f"images/{name}")
        psnrs = ", ".join(f"{m} {_fmt('psnr', values[(key, m)]['psnr'])} dB" for m in result.models)
        pictures[key] = _Picture(key, f"images/{name}", image.width, image.height, f"{key}: PSNR {psnrs}")
    return pictures


def _comparison(
    key: str,
    original: np.ndarray,
    recons: dict[str, np.ndarray],
    models: Sequence[str],
    values: dict[tuple[str, str], dict[str, Any]],
) -> Image.Image:
    from PIL import Image, ImageDraw

    h, w = original.shape[:2]
    tw, th = _display_size(w, h, TILE)
    errors = {m: _error(original, recons[m]) for m in models}
    # where the models differ most: between each other when there are several, from the original when one
    if len(models) > 1:
        maps = [_error(recons[a], recons[b]) for i, a in enumerate(models) for b in models[i + 1 :]]
    else:
        maps = [errors[models[0]]]
    side = max(8, min(h, w) // 4)
    zx, zy = _most_different_window(maps, side)
    cw, ch = min(side, w), min(side, h)
    zw, zh = _display_size(cw, ch, ZOOM_TILE)
    if max(zw, zh) < ZOOM_TILE:  # zoom in: nearest neighbour, whole pixels
        factor = max(1, ZOOM_TILE // max(cw, ch))
        zw, zh = cw * factor, ch * factor

    columns = 1 + 2 * len(models)
    gap, title_h, label_h, bar_h = 10, 30, 34, 34
    col_w = max(tw, zw)
    width = gap + columns * (col_w + gap)
    height = title_h + label_h + th + gap + label_h + zh + gap + bar_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    psnr_text = "   ".join(f"{m}: {_fmt('psnr', values[(key, m)]['psnr'])} dB" for m in models)
    _text(draw, (gap, 8), f"{key}  ({w}x{h})   PSNR  {psnr_text}", 14)

    panels: list[tuple[str, np.ndarray, np.ndarray]] = [("original", original, original)]
    for m in models:
        r = values[(key, m)]
        label = f"{m}\nPSNR {_fmt('psnr', r['psnr'])} dB, SSIM {_fmt('ssim', r['ssim'])}"
        panels.append((label, recons[m], recons[m]))
    for m in models:
        panels.append(
            (f"{m} error (|diff| x{ERROR_GAIN})\nMAE {_fmt('mae', values[(key, m)]['mae'])}", errors[m], errors[m])
        )
    y_full = title_h + label_h
    y_zoom = y_full + th + gap + label_h
    for c, (label, full, _) in enumerate(panels):
        x = gap + c * (col_w + gap)
        _text(draw, (x, title_h), label, 12)
        arr = _error_image(full) if full.ndim == 2 else full
        canvas.paste(_tile(arr, (tw, th)), (x, y_full))
        crop = full[zy : zy + ch, zx : zx + cw]
        zarr = _error_image(crop) if crop.ndim == 2 else crop
        canvas.paste(_tile(np.ascontiguousarray(zarr), (zw, zh)), (x, y_zoom))
    # the zoomed region, marked on the original
    sx, sy = tw / w, th / h
    draw.rectangle(
        (gap + zx * sx, y_full + zy * sy, gap + (zx + cw) * sx - 1, y_full + (zy + ch) * sy - 1),
        outline=(255, 220, 0),
        width=2,
    )
    what = "the models differ most" if len(models) > 1 else "the error is largest"
    _text(draw, (gap, y_zoom - label_h + 4), f"zoom: {cw}x{ch} pixels at ({zx}, {zy}), where {what}", 12)
    _colorbar(
        canvas, draw, gap + (1 + len(models)) * (col_w + gap), height - bar_h + 4, len(models) * (col_w + gap) - gap
    )
    return canvas


def _colorbar(canvas: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int, width: int) -> None:
    from PIL import Image

    width = max(120, min(width, 400))
    ramp = _LUT[np.linspace(0, 255, width).astype(np.uint8)][None].repeat(10, axis=0)
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (x, y))
    top = 255 / ERROR_GAIN
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        tx = x + int(frac * (width - 1))
        draw.line((tx, y + 10, tx, y + 13), fill=(20, 20, 20))
        label = f"{frac * top:.0f}" + ("+" if frac == 1.0 else "")
        _text(draw, (min(tx, x + width - 24), y + 14), label, 11)


# --- distributions --------------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


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
        image = _box_plot(metric, finite, result.models, result.higher_is_better[metric])
        name = _free_name(folder, f"distribution-{metric}.png")
        _save_png(image, folder / name)
        written.append(f"images/{name}")
        note = f"{infinite} identical reconstruction(s) (PSNR inf) are not drawn." if infinite else ""
        plots[metric] = (f"images/{name}", image.width, image.height, note)
    return plots


def _box_plot(metric: str, values: dict[str, np.ndarray], models: Sequence[str], higher: bool) -> Image.Image:
    from PIL import Image, ImageDraw

    label_w, right, top, row_h, axis_h = 150, 30, 40, 44, 44
    width = 760
    plot_w = width - label_w - right
    height = top + row_h * len(models) + axis_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    better = "higher is better" if higher else "lower is better"
    _text(draw, (10, 10), f"{metric}{UNITS[metric]}: per-image values ({better})", 14)
    everything = (
        np.concatenate([v for v in values.values() if len(v)]) if any(len(v) for v in values.values()) else None
    )
    if everything is None:
        return canvas
    lo, hi = float(everything.min()), float(everything.max())
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.01, 1e-3)
    lo, hi = lo - pad, hi + pad

    def px(v: float) -> float:
        return label_w + (v - lo) / (hi - lo) * plot_w

    axis_y = top + row_h * len(models)
    for t in _nice_ticks(lo, hi):
        x = px(t)
        draw.line((x, top - 4, x, axis_y), fill=(225, 225, 225))
        draw.line((x, axis_y, x, axis_y + 4), fill=(60, 60, 60))
        _text(draw, (int(x) - 14, axis_y + 8), f"{t:g}", 11)
    draw.line((label_w, axis_y, label_w + plot_w, axis_y), fill=(60, 60, 60))
    for i, model in enumerate(models):
        color = PALETTE[i % len(PALETTE)]
        light = tuple(int(c + (255 - c) * 0.6) for c in color)
        cy = top + row_h * i + row_h // 2
        _text(draw, (10, cy - 8), model[:20], 13, fill=color)
        v = values[model]
        if not len(v):
            _text(draw, (label_w + 4, cy - 8), "no values", 11)
            continue
        p5, q1, med, q3, p95 = np.percentile(v, [5, 25, 50, 75, 95])
        draw.line((px(p5), cy, px(p95), cy), fill=color, width=2)
        for end in (p5, p95):
            draw.line((px(end), cy - 7, px(end), cy + 7), fill=color, width=2)
        draw.rectangle((px(q1), cy - 12, max(px(q3), px(q1) + 1), cy + 12), fill=light, outline=color, width=2)
        draw.line((px(med), cy - 12, px(med), cy + 12), fill=(20, 20, 20), width=3)
        for extreme in (v.min(), v.max()):
            draw.ellipse((px(extreme) - 3, cy - 3, px(extreme) + 3, cy + 3), outline=color, width=2)
        mx = px(float(v.mean()))
        draw.polygon([(mx, cy - 6), (mx + 6, cy), (mx, cy + 6), (mx - 6, cy)], fill=color)
    _text(
        draw,
        (label_w, height - 18),
        "box: 25th-75th percentile, black bar: median, diamond: mean, whiskers: 5th-95th percentile, circles: min/max",
        10,
    )
    return canvas


# --- the page -------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1a1a1a;
       max-width: 1500px; }
h1 { margin-bottom: 4px; } h2 { margin-top: 32px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; font-size: 14px; }
.scroll { overflow-x: auto; }  /* a wide summary (many models and metrics) scrolls by itself, not the page */
th { background: #f3f3f3; } td.model, th.model { text-align: left; font-weight: 600; }
td.best { background: #e3f4e1; font-weight: 600; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: -1px; }
figure { margin: 12px 0 24px 0; } figcaption { color: #444; font-size: 14px; margin-top: 4px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
dt { font-weight: 600; margin-top: 8px; } dd { margin-left: 16px; color: #333; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
.note { color: #8a5a00; }
"""


def _html(result: EvaluationResult, pictures: dict[str, _Picture], plots: dict[str, tuple[str, int, int, str]]) -> str:
    e = html.escape
    definitions, higher_is_better = result.definitions, result.higher_is_better
    summary = result.summary
    settings = result.settings
    models = result.models
    counts = result.counts
    size_text = f" ({settings['size']} px)" if settings.get("size") else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>VAE evaluation: {e(', '.join(models))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>VAE evaluation</h1>",
        f'<p class="meta">{counts["images"]} images from <code>{e(str(settings.get("source")))}</code> '
        f"({counts['evaluated']} evaluated, {counts['failed']} failed), "
        f"{e(settings.get('preparation', ''))}{size_text}; "
        f"models: {e(', '.join(models))}; "
        f"vae-toolkit {e(str(settings.get('versions', {}).get('vae-toolkit')))}, "
        f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}.</p>",
    ]
    parts += [f'<p class="note">{e(n)}</p>' for n in result.notes]

    parts.append("<h2>Ranking</h2>")
    parts.append('<ol id="ranking">')
    for m in result.ranking:
        s = summary[m]["psnr"]
        mean = _fmt("psnr", s["mean"]) if s else "–"
        color = PALETTE[models.index(m) % len(PALETTE)]
        parts.append(
            f'<li><span class="swatch" style="background: rgb{color}"></span><b>{e(m)}</b>: mean PSNR {mean} dB</li>'
        )
    parts.append('</ol><p class="meta">Ordered by mean PSNR, best first.</p>')

    parts.append("<h2>Summary</h2>")
    stats = {True: ("mean", "median", "p5", "min"), False: ("mean", "median", "p95", "max")}
    head1 = '<tr><th class="model" rowspan="2">model</th><th rowspan="2">images</th>'
    head2 = "<tr>"
    for metric in result.metrics:
        head1 += f'<th colspan="4">{e(metric)}{e(UNITS[metric])} ({"↑" if higher_is_better[metric] else "↓"})</th>'
        head2 += "".join(f"<th>{s}</th>" for s in stats[higher_is_better[metric]])
    parts.append(f'<div class="scroll"><table id="summary"><thead>{head1}</tr>{head2}</tr></thead><tbody>')
    best: dict[tuple[str, str], float] = {}
    for metric in result.metrics:
        for stat in stats[higher_is_better[metric]]:
            vals = [summary[m][metric][stat] for m in models if summary[m][metric]]
            if vals:
                best[(metric, stat)] = max(vals) if higher_is_better[metric] else min(vals)
    for m in models:
        row = f'<tr><td class="model">{e(m)}</td><td>{summary[m]["count"]}</td>'
        for metric in result.metrics:
            s = summary[m][metric]
            for stat in stats[higher_is_better[metric]]:
                value = s[stat] if s else None
                cls = (
                    ' class="best"'
                    if value is not None and len(models) > 1 and value == best.get((metric, stat))
                    else ""
                )
                row += f"<td{cls}>{_fmt(metric, value)}</td>"
        parts.append(row + "</tr>")
    parts.append("</tbody></table></div>")
    parts.append(
        '<p class="meta">p5 / p95: 5th / 95th percentile over the images; green: the best model in that column. '
        'Every value per image is in <a href="metrics.csv">metrics.csv</a>, the statistics in '
        '<a href="summary.json">summary.json</a>.</p>'
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

    if result.failures:
        parts.append(f"<h2>Failures ({len(result.failures)})</h2><ul>")
        parts += [f"<li><code>{e(k)}</code>: {e(v)}</li>" for k, v in sorted(result.failures.items())]
        parts.append("</ul>")

    parts.append("<h2>Pictures</h2>")
    parts.append(
        '<p class="meta">Each picture: the prepared original, each model\'s reconstruction and its error map '
        f"(mean absolute difference over R, G, B, amplified x{ERROR_GAIN}, on the colour scale below it), then a "
        "zoom on the region (yellow frame) where the models differ most.</p>"
    )
    shown = result.shown
    for section, keys in shown.items():
        if not keys:
            continue
        if section == "picks":
            title = f"Fixed picks (seed {settings.get('seed')})"
        else:
            title = f"Worst images of {section.removeprefix('worst ')} (lowest PSNR first)"
        parts.append(f"<h3>{e(title)}</h3>")
        for key in keys:
            p = pictures.get(key)
            if p is None:
                continue
            parts.append(
                f'<figure><img src="{e(p.file)}" width="{p.width}" height="{p.height}" alt="{e(key)}" loading="eager">'
                f"<figcaption>{e(p.caption)}</figcaption></figure>"
            )

    parts.append("<h2>Distributions</h2>")
    for metric, (file, w, h, note) in plots.items():
        parts.append(
            f'<figure><img src="{e(file)}" width="{w}" height="{h}" alt="{e(metric)} per image">'
            f"<figcaption>{e(note)}</figcaption></figure>"
        )

    parts.append("<h2>Definitions</h2><dl>")
    for metric in result.metrics:
        parts.append(f"<dt>{e(metric)}</dt><dd>{e(definitions[metric])}</dd>")
    parts.append(
        "<dt>images</dt><dd>Each image is prepared as the encode and roundtrip commands prepare it (its own size "
        "center-cropped to a multiple of 8, or resized and center-cropped to N x N with --size N); each model "
        "encodes it (the latent distribution's mean) and decodes it, and the reconstruction is the lossless "
        "uint8 conversion of the decoded tensor (tensor_to_pil). The metrics compare the prepared original with "
        "that uint8 reconstruction.</dd></dl>"
    )
    parts.append(f"<h2>Settings</h2><pre>{e(json.dumps(settings, indent=2))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
