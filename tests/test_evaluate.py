"""``vae_toolkit.evaluate`` and the ``evaluate`` command: metric definitions against independent computations,
batching, ranking, failures, the report folder (in a real browser), torchrun, and a light ``import vae_toolkit``."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image
from scipy.ndimage import correlate1d, gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vae_toolkit import VAELoader
from vae_toolkit import __main__ as cli
from vae_toolkit.evaluate import (
    METRICS,
    ReportExistsError,
    compare,
    evaluate,
    mae,
    ms_ssim,
    psnr,
    reconstruct,
    ssim,
)
from vae_toolkit.image_utils import center_crop_to_multiple, open_image, pil_to_tensor

# --- metric definitions (no VAE) ------------------------------------------------------------------


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB image (blurred noise with edges)."""
    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.random((h, w, 3)), (3, 3, 0)) * 700 - 220
    base[h // 3 : h // 2, :] += 60  # an edge
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def jpeg_pair(h: int, w: int, seed: int = 0, quality: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A real image pair: an image and its JPEG-compressed copy."""
    a = photo(h, w, seed)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    with Image.open(buf) as im:
        return a, np.asarray(im.convert("RGB")).copy()


SIZES = [(64, 64), (40, 56), (33, 47), (17, 23), (200, 171)]


def sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        structural_similarity(
            a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
        )
    )


@pytest.mark.parametrize(("h", "w"), SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_ssim_psnr_mae_equal_independent_computations(h, w):
    a, b = jpeg_pair(h, w, seed=h)
    # 1e-4 is the promise; computed in float32 it is within 2e-5 here, and a wrong window, sigma or covariance
    # (sample instead of population) is 1e-3 or more off
    assert abs(ssim(a, b) - sk_ssim(a, b)) < 5e-5
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    assert mae(a, b) == pytest.approx(np.abs(a.astype(float) - b.astype(float)).mean(), abs=1e-12)
    values = compare(Image.fromarray(a), Image.fromarray(b))
    assert list(values) == list(METRICS)
    assert values["ssim"] == pytest.approx(ssim(a, b), abs=1e-12) and values["psnr"] == psnr(a, b)


def test_identical_images():
    a = photo(48, 40)
    assert psnr(a, a) == math.inf and mae(a, a) == 0.0 and ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def _ms_ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2003 in numpy/scipy: per channel, 5 scales, 2x2 means between them, the product of
    cs^w at scales 1-4 and ssim^w at scale 5, then averaged over R, G, B."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(im):
        return correlate1d(correlate1d(im, g, axis=0), g, axis=1)[5:-5, 5:-5]

    out = []
    for c in range(3):
        p, q = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        value = 1.0
        for level, wt in enumerate(weights):
            mp, mq = filt(p), filt(q)
            spp, sqq, spq = filt(p * p) - mp * mp, filt(q * q) - mq * mq, filt(p * q) - mp * mq
            cs = ((2 * spq + c2) / (spp + sqq + c2)).mean()
            if level < 4:
                value *= max(cs, 0) ** wt
                p = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2).mean(axis=(1, 3))
                q = q.reshape(q.shape[0] // 2, 2, q.shape[1] // 2, 2).mean(axis=(1, 3))
            else:
                s = (((2 * mp * mq + c1) / (mp * mp + mq * mq + c1)) * (2 * spq + c2) / (spp + sqq + c2)).mean()
                value *= max(s, 0) ** wt
        out.append(value)
    return float(np.mean(out))


@pytest.mark.parametrize(("h", "w"), [(192, 176), (176, 240)])
def test_ms_ssim_equals_an_independent_computation(h, w):
    a, b = jpeg_pair(h, w, seed=w, quality=25)
    assert ms_ssim(a, b) == pytest.approx(_ms_ssim_reference(a, b), abs=5e-5)


@pytest.mark.parametrize(("h", "w"), [(176, 192), (171, 203), (256, 257)])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_one_pass_ssim_and_ms_ssim_are_pytorch_msssims_values(h, w, layout):
    """SSIM and MS-SSIM in one pass (the first scale's SSIM kept) give the two library calls' values bit for bit."""
    from pytorch_msssim import ms_ssim as lib_ms_ssim
    from pytorch_msssim import ssim as lib_ssim

    from vae_toolkit.evaluate import _fold, _ssim_and_ms_ssim, _window

    pairs = [jpeg_pair(h, w, seed=s, quality=q) for s, q in ((1, 20), (2, 60), (3, 90))]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, y = (
        torch.from_numpy(np.stack([p[i] for p in pairs])).permute(0, 3, 1, 2).float().contiguous(memory_format=fmt)
        for i in (0, 1)
    )
    win = _window(x.device)

    def library(x, y):
        return (
            lib_ssim(x, y, data_range=255, size_average=False, win=win),
            lib_ms_ssim(x, y, data_range=255, size_average=False, win=win),
        )

    got = _ssim_and_ms_ssim(x, y, win)
    assert got is not None and all(map(torch.equal, got, library(x, y)))
    # the images side by side as channels (always channels-last): the library's values on channels-last input
    folded = _ssim_and_ms_ssim(_fold(x), _fold(y), _window(x.device, 3 * len(x)))
    assert folded is not None
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, y)]
    assert all(map(torch.equal, folded, library(*cl)))
    # and within float32 rounding of its values in the other layout
    assert all(torch.allclose(f, e, rtol=0, atol=1e-6) for f, e in zip(folded, library(x, y), strict=True))


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 37, 53, 3), (1, 512, 512, 3), (3, 300, 257, 3)])
@pytest.mark.parametrize("content", ["random", "extreme"])
def test_exact_sums_are_the_integer_sums(shape, content):
    """The sums behind PSNR and MAE equal int64 sums exactly, also where a float32 sum would round (255² * 786k)."""
    from vae_toolkit.evaluate import _exact_sums

    rng = np.random.default_rng(shape[1])
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = (
        rng.integers(0, 256, shape, dtype=np.uint8)
        if content == "random"
        else np.where(a > 127, 0, 255).astype(np.uint8)
    )
    d = a.astype(np.int64) - b.astype(np.int64)
    squares, absolute = _exact_sums(torch.from_numpy(a).float() - torch.from_numpy(b).float())
    assert squares == (d * d).reshape(len(d), -1).sum(1).tolist()
    assert absolute == np.abs(d).reshape(len(d), -1).sum(1).tolist()


@pytest.mark.parametrize("shape", [(2, 3, 256, 256), (2, 3, 255, 255), (1, 3, 171, 203), (3, 6, 128, 65)])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_pool2_is_avg_pool2d(shape, layout):
    from vae_toolkit.evaluate import _pool2

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 255).contiguous(memory_format=fmt)
    padding = (shape[2] % 2, shape[3] % 2)
    assert torch.equal(_pool2(x, padding), torch.nn.functional.avg_pool2d(x, kernel_size=2, padding=padding))


@pytest.mark.parametrize("change", ["no _ssim", "another signature"])
def test_a_pytorch_msssim_without_the_expected_internals_falls_back_to_its_public_calls(change, monkeypatch):
    import pytorch_msssim  # noqa: F401

    lib = sys.modules["pytorch_msssim.ssim"]  # the module (the package's attribute `ssim` is the function)
    a, b = jpeg_pair(176, 192, seed=5, quality=30)
    expected = compare(a, b)
    if change == "no _ssim":
        monkeypatch.setitem(sys.modules, "pytorch_msssim.ssim", None)  # the import of _ssim fails
    else:
        real = lib._ssim

        def changed(*args, **kwargs):  # the library's own calls work; the one-pass call is refused as changed
            if sys._getframe(1).f_globals["__name__"] == "vae_toolkit.evaluate":
                raise TypeError("_ssim() got an unexpected keyword argument 'K'")
            return real(*args, **kwargs)

        monkeypatch.setattr(lib, "_ssim", changed)
    assert compare(a, b) == expected


@pytest.mark.parametrize(("h", "w"), [(160, 400), (64, 64)])
def test_ms_ssim_is_empty_for_images_too_small_for_5_scales(h, w):
    a, b = jpeg_pair(h, w)
    assert ms_ssim(a, b) is None and compare(a, b)["ms_ssim"] is None


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8), "differ in size: 8x8 and 9x8"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), "uint8 array of shape"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), r"shape \(8, 8\)"),
    ],
)
def test_metric_inputs_are_checked(a, b, match):
    with pytest.raises(ValueError, match=match):
        psnr(a, b)


def test_ssim_of_an_image_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11x11 pixels.*got 10x12"):
        ssim(np.zeros((12, 10, 3), np.uint8), np.zeros((12, 10, 3), np.uint8))


# --- one run, many assertions -----------------------------------------------------------------------

# (w, h): odd sizes are center-cropped to a multiple of 8 (29x21 -> 24x16); at most 32 px, the tiny VAE's
# sample_size, so that it does not tile
IMAGE_SIZES = [(32, 24), (29, 21), (16, 32)]
N_IMAGES = 9


def write_source(folder: Path) -> list[str]:
    keys = []
    for i in range(N_IMAGES):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        rel = Path(f"set{i % 2}") / f"p{i}{'.png' if i % 3 else '.jpg'}"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(h, w, seed=i)).save(folder / rel, quality=95)
        keys.append(rel.as_posix())
    (folder / "set1" / "broken.png").write_bytes(b"not an image")
    return sorted(keys)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two local tiny-VAE folders: 'good', and 'perturbed' with noise added to its decoder weights."""
    root = tmp_path_factory.mktemp("models")
    good = make_tiny_vae()
    good.save_pretrained(root / "good", safe_serialization=True)
    bad = make_tiny_vae()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in bad.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    bad.save_pretrained(root / "perturbed", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    return folder, write_source(folder)


@pytest.fixture(scope="module")
def run(models, source, tmp_path_factory):
    """One evaluation with a report, and the same images one by one (batch size 1), without a report."""
    loader = VAELoader()
    vaes = {name: loader.load_sd_vae(str(models / name), "cpu")[0] for name in ("good", "perturbed")}
    out = tmp_path_factory.mktemp("report") / "report"
    result = evaluate(vaes, source[0], out, batch_size=4, worst=2, picks=2, progress=False)
    single = evaluate(vaes, source[0], batch_size=1, worst=2, picks=2, progress=False)
    return vaes, result, single, out


def test_rows_cover_every_image_and_model_once(run, source):
    _, result, _, _ = run
    _, keys = source
    good_keys = [k for k in keys if k != "set1/broken.png"]
    assert [(r["image"], r["model"]) for r in result.rows] == [
        (k, m) for k in good_keys for m in ("good", "perturbed")
    ]
    assert result.metrics == list(METRICS)  # no lpips: its weights are not in the suite's empty TORCH_HOME
    sizes = {r["image"]: (r["width"], r["height"]) for r in result.rows}
    assert sizes["set0/p0.jpg"] == (32, 24) and sizes["set1/p1.png"] == (24, 16)  # 29x21 cropped


def test_a_corrupt_image_is_listed_and_the_other_rows_are_complete(run):
    _, result, _, out = run
    assert list(result.failures) == ["set1/broken.png"]
    assert "not an image PIL can read" in result.failures["set1/broken.png"]
    assert all(r[m] is not None for r in result.rows for m in ("psnr", "ssim", "mae"))
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["failures"]) == ["set1/broken.png"]


def test_rows_equal_independent_computations_one_image_at_a_time(run, source):
    vaes, result, _, _ = run
    folder, _ = source
    rows = {(r["image"], r["model"]): r for r in result.rows}
    for key in ("set0/p0.jpg", "set1/p1.png", "set0/p2.png"):
        original = center_crop_to_multiple(open_image(folder / key), 8)
        for name, vae in vaes.items():
            (recon,) = reconstruct(vae, pil_to_tensor(original).unsqueeze(0))
            a, b = np.asarray(original), np.asarray(recon)
            row = rows[(key, name)]
            assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=0.01)
            assert row["ssim"] == pytest.approx(sk_ssim(a, b), abs=1e-4)
            assert row["mae"] == pytest.approx(np.abs(a.astype(float) - b).mean(), abs=0.01)
            assert row["ms_ssim"] is None  # too small for 5 scales


def assert_rows_match(got, expected):
    """Rows of the same images from runs with other batch shapes: the same pairs and sizes, and metric values
    within a stated tolerance. A convolution over a batch of 3 and over a batch of 1 may use other oneDNN kernels
    (chosen by shape and CPU), so reconstructions may differ by one uint8 level in a few pixels: no bit equality."""
    assert [(r["image"], r["model"]) for r in got] == [(r["image"], r["model"]) for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert (a["width"], a["height"]) == (b["width"], b["height"])
        assert a["psnr"] == pytest.approx(b["psnr"], abs=0.01)
        assert a["ssim"] == pytest.approx(b["ssim"], abs=1e-4)
        assert a["mae"] == pytest.approx(b["mae"], abs=0.01)
        assert (a["ms_ssim"] is None) == (b["ms_ssim"] is None)
        if a["ms_ssim"] is not None:
            assert a["ms_ssim"] == pytest.approx(b["ms_ssim"], abs=1e-4)


def test_batched_rows_equal_one_at_a_time_rows(run):
    _, result, single, _ = run
    assert_rows_match(result.rows, single.rows)


def test_an_image_the_model_fails_on_is_listed_and_its_batch_mates_keep_their_values(tmp_path):
    """A model that raises on one image of a batch: the batch is retried one by one, that image is a failure
    naming the model, and the other images' rows are those of a run without it (originals and reconstructions
    stay paired)."""
    for folder, black in ((tmp_path / "with", True), (tmp_path / "without", False)):
        folder.mkdir()
        for i in range(4):
            if i == 2 and black:
                pixels = np.zeros((48, 40, 3), np.uint8)
            elif i == 2:
                continue
            else:
                pixels = photo(48, 40, seed=10 + i)
            Image.fromarray(pixels).save(folder / f"p{i}.png")
    vae = make_tiny_vae()
    real = vae.encode

    def encode(x, *args, **kwargs):
        if bool((x.flatten(1).amax(1) <= -1).any()):
            raise RuntimeError("cannot encode an all-black image")
        return real(x, *args, **kwargs)

    vae.encode = encode
    got = evaluate({"flaky": vae}, tmp_path / "with", batch_size=4, progress=False)
    assert list(got.failures) == ["p2.png"]
    assert "flaky: RuntimeError: cannot encode an all-black image" in got.failures["p2.png"]
    expected = evaluate({"flaky": vae}, tmp_path / "without", batch_size=4, progress=False)
    assert [r["image"] for r in got.rows] == ["p0.png", "p1.png", "p3.png"]
    assert_rows_match(got.rows, expected.rows)


def test_a_perturbed_decoder_ranks_below_on_every_statistic(run):
    _, result, _, out = run
    assert result.ranking == ["good", "perturbed"]
    good, bad = result.summary["good"], result.summary["perturbed"]
    assert good["count"] == bad["count"] == N_IMAGES
    for metric in ("psnr", "ssim"):
        for stat in ("mean", "median", "p5", "min"):
            assert good[metric][stat] > bad[metric][stat], (metric, stat)
    for stat in ("mean", "median", "p95", "max"):
        assert good["mae"][stat] < bad["mae"][stat], stat
    assert json.loads((out / "summary.json").read_text())["ranking"] == ["good", "perturbed"]


def test_summary_statistics_and_worst_image(run):
    _, result, _, out = run
    psnrs = {r["image"]: r["psnr"] for r in result.rows if r["model"] == "good"}
    s = result.summary["good"]["psnr"]
    values = np.array(list(psnrs.values()))
    assert s["mean"] == pytest.approx(values.mean()) and s["median"] == pytest.approx(np.median(values))
    assert s["p5"] == pytest.approx(np.percentile(values, 5)) and s["min"] == values.min()
    assert s["worst"] == min(psnrs, key=psnrs.get)
    stored = json.loads((out / "summary.json").read_text())
    assert stored["models"]["good"]["psnr"]["worst"] == s["worst"]
    assert stored["models"]["good"]["ms_ssim"] is None
    assert set(stored["metrics"]) == set(METRICS) and "use_sample_covariance=False" in stored["metrics"]["ssim"]
    assert stored["settings"]["versions"]["pytorch-msssim"]
    assert stored["settings"]["reader"] == ("fast" if stored["settings"]["size"] else "exact")
    assert any(note.startswith("LPIPS left out: alexnet-owt-7be5be79.pth") for note in stored["notes"])
    assert any(note.startswith("rFID left out: pt_inception-2015-12-05-6726825d.pth") for note in stored["notes"])


def test_metrics_csv(run):
    _, result, _, out = run
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:8] == ["image", "model", "width", "height", "psnr", "ssim", "ms_ssim", "mae"]
    assert len(table) == 1 + len(result.rows)
    first = dict(zip(table[0], table[1], strict=True))
    assert first["image"] == "set0/p0.jpg" and first["model"] == "good" and first["ms_ssim"] == ""
    assert float(first["psnr"]) == result.rows[0]["psnr"]  # full precision


def test_pictures_keep_only_the_worst_and_the_picks(run):
    _, result, _, out = run
    shown = result.shown
    for model in ("good", "perturbed"):
        psnrs = sorted((r["psnr"], r["image"]) for r in result.rows if r["model"] == model)
        assert shown[f"worst {model}"] == [k for _, k in psnrs[:2]]
    assert len(shown["picks"]) == 2
    worst = set(shown["worst good"]) | set(shown["worst perturbed"])
    assert not set(shown["picks"]) & worst  # the picks show other images than the worst ones
    kept = worst | set(shown["picks"])
    assert set(result.shown_images) == kept
    # never every reconstruction: the worst, and the picks' candidates (picks + every worst slot)
    assert kept <= set(result._shown.images) and len(result._shown.images) <= 2 * 2 + (2 + 2 * 2)
    pictures = sorted(p.name for p in (out / "images").glob("compare-*.png"))
    assert len(pictures) == len(kept)
    page = (out / "index.html").read_text()
    for picture in pictures:
        assert page.count(f'src="images/{picture}"') == 1  # each image shown once; later sections link to it
    assert sorted(p.name for p in (out / "images").glob("distribution-*.png")) == [
        "distribution-mae.png",
        "distribution-psnr.png",
        "distribution-ssim.png",
    ]
    with Image.open(out / "images" / pictures[0]) as im:
        assert im.mode == "RGB" and im.width > 5 * 192  # original, 2 reconstructions, 2 error maps


def test_picks_do_not_depend_on_the_batch_size(run):
    """The seeded picks are the same images whatever the batch size. The worst images are chosen by PSNR, which
    may differ in the last digits between batch shapes (oneDNN kernels): two runs may swap images whose PSNRs tie
    within 0.01 dB, never pick a clearly better one."""
    _, result, single, _ = run
    assert result.shown.keys() == single.shown.keys()
    assert result.shown["picks"] == single.shown["picks"]
    psnr = {(r["image"], r["model"]): r["psnr"] for r in single.rows}
    for section, keys in single.shown.items():
        if section == "picks":
            continue
        model = section.removeprefix("worst ")
        got = [psnr[(k, model)] for k in result.shown[section]]
        assert got == pytest.approx([psnr[(k, model)] for k in keys], abs=0.01)


def test_index_html_is_self_contained(run):
    _, result, _, out = run
    page = (out / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert links and all(not re.match(r"[a-z]+:", link) and not link.startswith("/") for link in links)
    for link in links:
        assert (out / link).is_file(), link
    # no script and no address outside the notes' text (a note may name where to download a weights file)
    outside_notes = re.sub(r'<p class="note">.*?</p>', "", page, flags=re.S)
    assert "<script" not in page and "http://" not in outside_notes and "https://" not in outside_notes
    for text in ("good", "perturbed", "set1/broken.png", "Definitions", "use_sample_covariance=False"):
        assert text in page


def test_a_non_empty_report_folder_is_refused_unless_overwrite(run, source, tmp_path):
    vaes, result, _, _ = run
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ReportExistsError, match=f"report folder {re.escape(str(tmp_path))} exists and is not empty"):
        evaluate(vaes, source[0], tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        result.save_report(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "stale.png").write_bytes(b"")
    result.save_report(tmp_path, overwrite=True)
    # a file no report wrote (not in report-manifest.json) is kept, whatever its name or folder
    assert (tmp_path / "index.html").is_file() and (tmp_path / "images" / "stale.png").exists()
    pictures = sorted(p.name for p in (tmp_path / "images").glob("compare-*.png"))
    (tmp_path / "images" / pictures[-1]).unlink()
    (tmp_path / "images" / pictures[-1]).write_bytes(b"the user's own")  # a picture's name, replaced by the user
    manifest = json.loads((tmp_path / "report-manifest.json").read_text())
    manifest["files"].remove(f"images/{pictures[-1]}")
    (tmp_path / "report-manifest.json").write_text(json.dumps(manifest))
    result.save_report(tmp_path, overwrite=True)
    assert (tmp_path / "images" / pictures[-1]).read_bytes() == b"the user's own"
    assert sorted(p.name for p in (tmp_path / "images").glob("compare-*.png")) == sorted(
        [*pictures, pictures[-1].replace(".png", "-2.png")]
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vaes": {}}, TypeError, "non-empty mapping"),
        ({"size": 30}, ValueError, "multiple of 8, got 30"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
        ({"limit": "3"}, TypeError, "limit must be an int"),
        ({"source": "/nonexistent/folder"}, FileNotFoundError, "image folder not found: /nonexistent/folder"),
    ],
)
def test_bad_arguments(run, source, kwargs, error, match):
    vaes = run[0]
    args = {"vaes": vaes, "source": source[0], **kwargs}
    with pytest.raises(error, match=match):
        evaluate(args.pop("vaes"), args.pop("source"), progress=False, **args)


def test_limit(run, source):
    vaes = {"good": run[0]["good"]}
    result = evaluate(vaes, source[0], limit=2, progress=False)
    assert [r["image"] for r in result.rows] == source[1][:2]


def test_import_vae_toolkit_does_not_import_the_metrics_libraries():
    code = "import sys, vae_toolkit, vae_toolkit.evaluate; print(sorted(m for m in sys.modules if m in {mods}))"
    mods = {"pytorch_msssim", "skimage", "scipy", "lpips", "diffusers"}
    out = subprocess.run([sys.executable, "-c", code.format(mods=mods)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the command --------------------------------------------------------------------------------------


def test_cli_evaluate(run, models, source, tmp_path, capsys):
    argv = ["evaluate", str(source[0]), "-o", str(tmp_path / "r"), "--model", str(models / "perturbed")]
    argv += ["--model", str(models / "good"), "--device", "cpu", "--no-progress", "--batch-size", "3"]
    assert cli.main(argv) == 1  # the corrupt image
    captured = capsys.readouterr()
    assert f"1. {models / 'good'}" in captured.out and f"2. {models / 'perturbed'}" in captured.out
    assert "1 of 10 images failed" in captured.err and "note: LPIPS left out" in captured.err
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * N_IMAGES and rows[0]["model"] == str(models / "perturbed")  # the name as given
    by_key = {(r["image"], r["model"].rsplit("/", 1)[-1]): float(r["psnr"]) for r in rows}
    for row in run[1].rows:  # the same values as the library call
        assert by_key[(row["image"], row["model"])] == pytest.approx(row["psnr"], abs=0.01)


def test_cli_refuses_a_non_empty_report_before_loading(models, source, tmp_path, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("loaded"))
    assert cli.main(["evaluate", str(source[0]), "-o", str(tmp_path), "--model", str(models / "good")]) == 2
    assert "exists and is not empty; pass --overwrite to replace" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["evaluate", "src", "--model", "sd14"], "required: -o/--output"),
        (["evaluate", "src", "-o", "r"], "required: --model"),
        (["evaluate", "src", "-o", "r", "-m", "nope"], "invalid model 'nope'"),
        (["evaluate", "src", "-o", "r", "-m", "sd14", "--size", "30"], "multiple of 8"),
        (["evaluate", "src", "-o", "r", "-m", "sd14", "--limit", "0"], "invalid value 0"),
        (["evaluate", "/nonexistent", "-o", "r", "-m", "sd14"], "/nonexistent does not exist"),
    ],
)
def test_cli_bad_arguments_exit_2(capsys, argv, match):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


# --- in a real browser ------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify(Array.from(document.images).map(
    (img) => [img.getAttribute("src"), img.complete, img.naturalWidth]));
  document.body.appendChild(out);
});
</script>
"""


def test_index_html_in_a_real_browser(run, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium found (apt-get install chromium); .ci/run installs it")
    _, result, _, out = run
    page = (out / "index.html").read_text()
    check = out / "check-in-browser.html"  # beside index.html, so that the relative links resolve the same
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    profile = tempfile.mkdtemp(dir=tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    flags += [f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", check.as_uri()]
    try:
        done = subprocess.run([chromium, *flags], capture_output=True, text=True, timeout=120)
    finally:
        check.unlink()
    dom = done.stdout
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)
    assert found, f"the page did not load in Chromium: {done.stderr[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert {src for src, _, _ in images} == {f"images/{p.name}" for p in (out / "images").glob("*.png")}
    assert all(complete and width > 0 for _, complete, width in images), images
    table = re.search(r'<table id="summary">.*?</table>', dom, re.S).group(0)
    assert re.findall(r'<td class="model">([^<]+)</td>', table) == result.models


# --- torchrun -----------------------------------------------------------------------------------------


def test_torchrun_two_ranks_give_the_rows_of_one_process(run, models, source, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    command += ["vae_toolkit", "evaluate", str(source[0]), "-o", str(tmp_path / "two"), "--batch-size", "2"]
    command += ["--model", str(models / "good"), "--model", str(models / "perturbed"), "--device", "cpu"]
    done = subprocess.run([*command, "--no-progress"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr  # the corrupt image, read by one rank, reaches rank 0's exit status
    assert done.stdout.count(f"evaluate: {N_IMAGES + 1} images: {N_IMAGES} evaluated, 1 failed") == 1, (
        done.stdout
    )  # rank 0 reports once
    with open(tmp_path / "two" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    one = run[1]  # the single-process run (batch size 4) of the same images and models
    assert [(r["image"], r["model"].rsplit("/", 1)[-1]) for r in rows] == [(r["image"], r["model"]) for r in one.rows]
    for a, b in zip(rows, one.rows, strict=True):
        assert float(a["psnr"]) == pytest.approx(b["psnr"], abs=0.01)
        assert float(a["ssim"]) == pytest.approx(b["ssim"], abs=1e-4)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [m.rsplit("/", 1)[-1] for m in two["ranking"]] == one.ranking
    assert list(two["failures"]) == list(one.failures)
    assert two["settings"]["world_size"] == 2


@pytest.mark.gpu
def test_metrics_on_a_cuda_model_equal_the_cpu_ones(tmp_path):
    from vae_toolkit.evaluate import _metrics

    a = np.stack([photo(200, 171, seed=1), photo(200, 171, seed=2)])
    b = np.stack([photo(200, 171, seed=3), a[1]])
    cpu, cuda = _metrics(a, b), _metrics(a, b, torch.device("cuda"))
    for c, g in zip(cpu, cuda, strict=True):
        assert g["psnr"] == c["psnr"] and g["mae"] == c["mae"]
        assert abs(g["ssim"] - c["ssim"]) < 1e-5 and abs(g["ms_ssim"] - c["ms_ssim"]) < 1e-5


# --- the report reads like a model card ------------------------------------------------------------------


def _cells(table: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in rows]


def test_the_first_table_is_the_model_card(run):
    _, result, _, out = run
    page = (out / "index.html").read_text()
    first = re.search(r"<table.*?</table>", page, re.S).group(0)
    assert 'id="summary"' in first
    head = re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", first)
    assert [html.unescape(h) for h in head] == ["model", "rFID ↓", "PSNR dB ↑", "SSIM ↑", "N"]
    rows = [r for r in _cells(first) if r]
    for model, cells in zip(result.models, rows, strict=True):
        s = result.summary[model]
        assert cells[0] == model and cells[1] == "–" and cells[-1] == str(s["count"])
        assert cells[2] == f"{s['psnr']['mean']:.2f} ± {s['psnr']['std']:.2f}"
        assert cells[3] == f"{s['ssim']['mean']:.4f} ± {s['ssim']['std']:.4f}"
    # the distributions come right after it, then the ranking, the statistics and the pictures
    order = [page.index(f"<h2>{h}</h2>") for h in ("Results", "Distributions", "Ranking", "Statistics", "Pictures")]
    assert order == sorted(order)


def test_std_is_the_standard_deviation_over_the_images(run):
    _, result, _, out = run
    stored = json.loads((out / "summary.json").read_text())
    for model in result.models:
        values = np.array([r["psnr"] for r in result.rows if r["model"] == model])
        assert result.summary[model]["psnr"]["std"] == pytest.approx(values.std(ddof=0))
        assert stored["models"][model]["psnr"]["std"] == pytest.approx(values.std(ddof=0))


def test_the_ranking_counts_the_images_each_model_is_best_on(run):
    _, result, _, out = run
    page = (out / "index.html").read_text()
    psnr = {(r["image"], r["model"]): r["psnr"] for r in result.rows}
    images = sorted({r["image"] for r in result.rows})
    for model in result.models:
        others = [m for m in result.models if m != model]
        wins = sum(all(psnr[(i, model)] > psnr[(i, o)] for o in others) for i in images)
        assert f"<b>{model}</b>: mean PSNR" in page
        assert re.search(rf"<b>{model}</b>: mean PSNR [\d.]+ dB; best PSNR on {wins} of {len(images)} images", page)


def test_each_caption_states_the_zoom_and_does_not_repeat_the_section_header(run):
    from vae_toolkit._report import _zoom_window

    _, result, _, out = run
    page = (out / "index.html").read_text()
    captions = [html.unescape(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S)]
    shown = result.shown_images
    pictures = [c for c in captions if "magnified" in c]
    assert len(pictures) == len(shown)
    for key, image in shown.items():
        h, w = image.original.shape[:2]
        cw, ch, factor = _zoom_window(h, w)
        caption = next(c for c in pictures if c.startswith(f"{key} ({w}x{h})"))
        assert f"the {cw}x{ch} pixels at" in caption and caption.endswith(f"magnified x{factor}.")
        assert "Worst images" not in caption and "Fixed picks" not in caption
    assert _zoom_window(600, 800) == (96, 96, 2) and _zoom_window(40, 24) == (8, 8, 24)


def test_the_plots_are_matplotlib_figures(run):
    _, result, _, out = run
    for metric in ("psnr", "ssim", "mae"):
        with Image.open(out / "images" / f"distribution-{metric}.png") as im:
            assert im.format == "PNG" and im.width >= 600
            assert "matplotlib" in im.info.get("Software", "")  # matplotlib stamps the PNGs it writes
    with Image.open(out / "images" / "error-scale.png") as im:
        assert "matplotlib" in im.info.get("Software", "")


def test_a_report_without_matplotlib_is_refused_before_any_model_loads(models, source, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ImportError, match=r'matplotlib: pip install "vae-toolkit\[eval\]"'):
        evaluate({"m": make_tiny_vae()}, source[0], tmp_path / "report", progress=False)
    code = cli.main(["evaluate", str(source[0]), "-o", str(tmp_path / "r2"), "--model", str(models / "good")])
    assert code == 2 and 'pip install "vae-toolkit[eval]"' in capsys.readouterr().err
    assert not (tmp_path / "report").exists() and not (tmp_path / "r2").exists()
