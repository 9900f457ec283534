"""``vae_toolkit.compare`` and the ``compare`` command: two folders pair by relative name, each row is the metric
functions of :mod:`vae_toolkit.metrics` on its pair, unpaired files are listed, sizes that differ fail unless
``resize``, and the report folder keeps evaluate's guarantees (checked before any image is read, never inside A or
B, never through a link, rows streamed, a partial report on Ctrl-C).

LPIPS and FID run on seeded random weights planted in a temporary ``TORCH_HOME`` (tests/metric_weights.py); FID on
pytorch-fid's 64-d features, as tests/test_evaluate_perceptual.py does.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path

import metric_weights as mw
import numpy as np
import pytest
import torch
from PIL import Image

from vae_toolkit import __main__ as cli
from vae_toolkit import evaluate, metrics
from vae_toolkit.compare import ComparisonResult, compare_folders, pair_files
from vae_toolkit.eval_results import ReportExistsError, ReportInSourceError, ReportLinkError

NO_WEIGHTS = {"lpips": "none", "fid": False, "progress": False}


def photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = (np.sin(xx / (4 + seed)) * 60 + np.cos(yy / 6) * 60 + 128)[..., None] + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def degraded(a: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(100 + seed).normal(0, 3 + seed, a.shape)
    return np.clip(a + noise, 0, 255).astype(np.uint8)


def save(folder: Path, key: str, image: np.ndarray) -> None:
    (folder / key).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / key)


def two_folders(root: Path) -> tuple[Path, Path]:
    """A (originals) and B (outputs): 4 pairs of two sizes (one large enough for MS-SSIM, one in a subfolder),
    a file only in A, one only in B, a pair whose sizes differ, and a pair whose B file is not an image."""
    a, b = root / "A", root / "B"
    for i, key in enumerate(["p0.png", "p1.png", "sub/p2.png"]):
        image = photo(48, 64, seed=i)
        save(a, key, image)
        save(b, key, degraded(image, i))
    large = photo(176, 168, seed=7)
    save(a, "large.png", large)
    save(b, "large.png", degraded(large, 7))
    save(a, "only-a.png", photo(48, 64, seed=8))
    save(b, "only-b.png", photo(48, 64, seed=9))
    save(a, "sizes.png", photo(40, 56, seed=10))
    save(b, "sizes.png", photo(32, 32, seed=11))
    save(a, "broken.png", photo(48, 64, seed=12))
    (b / "broken.png").write_bytes(b"not a png")
    return a, b


PAIRED = ["large.png", "p0.png", "p1.png", "sub/p2.png"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    mw.plant(home / "hub" / "checkpoints", (mw.ALEXNET, mw.LPIPS_ALEX, mw.FID_INCEPTION))
    return home


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return two_folders(tmp_path_factory.mktemp("folders"))


@pytest.fixture(scope="module")
def run(folders, planted, tmp_path_factory):
    """One CLI comparison with LPIPS (AlexNet) and 64-d FID on the planted weights."""
    a, b = folders
    out = tmp_path_factory.mktemp("report") / "report"
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(planted))
    mp.setattr("vae_toolkit.eval_perceptual.FID_DIMS", 64)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = cli.main(["compare", str(a), str(b), "-o", str(out), "--no-progress", "--lpips", "alex", "--fid",
                             "--device", "cpu", "--batch-size", "2"])  # fmt: skip
    finally:
        mp.undo()
    return code, out, stdout.getvalue(), stderr.getvalue()


def pair_tensors(a: Path, b: Path, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.asarray(Image.open(a / key).convert("RGB"))
    y = np.asarray(Image.open(b / key).convert("RGB"))
    return torch.from_numpy(x.copy()).permute(2, 0, 1)[None], torch.from_numpy(y.copy()).permute(2, 0, 1)[None]


# --- rows are the metric functions on each pair -----------------------------------------------------------


def test_each_row_equals_the_metric_functions_on_its_pair(run, folders, planted, monkeypatch):
    code, out, _, _ = run
    a, b = folders
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["image", "model", "width", "height", "psnr", "ssim", "ms_ssim", "mae", "lpips"]
    assert [r["image"] for r in table] == PAIRED and {r["model"] for r in table} == {"B"}
    monkeypatch.setenv("TORCH_HOME", str(planted))
    levels = (0, 255)
    for row in table:
        x, y = pair_tensors(a, b, row["image"])
        assert (int(row["width"]), int(row["height"])) == (x.shape[-1], x.shape[-2])
        assert float(row["psnr"]) == pytest.approx(float(metrics.psnr(x.double(), y.double(), input_range=levels)),
                                                   abs=1e-6)  # fmt: skip
        assert float(row["mae"]) == pytest.approx(float(metrics.mae(x.double(), y.double(), input_range=levels)),
                                                  abs=1e-6)  # fmt: skip
        assert float(row["ssim"]) == pytest.approx(float(metrics.ssim(x, y, input_range=levels)), abs=1e-6)
        assert float(row["lpips"]) == pytest.approx(float(metrics.lpips(x, y, "alex", input_range=levels)), abs=1e-6)
        if row["image"] == "large.png":
            assert float(row["ms_ssim"]) == pytest.approx(float(metrics.ms_ssim(x, y, input_range=levels)), abs=1e-6)
        else:
            assert row["ms_ssim"] == ""  # sides of 160 or less: too small for 5 scales, as evaluate leaves it
        # and the values evaluate gives the same pair (its PSNR and MAE exact, its SSIM by pytorch-msssim)
        pa, pb = x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy()
        assert float(row["psnr"]) == pytest.approx(evaluate.psnr(pa, pb), abs=1e-9)
        assert float(row["mae"]) == pytest.approx(evaluate.mae(pa, pb), abs=1e-9)
        assert float(row["ssim"]) == pytest.approx(evaluate.ssim(pa, pb), abs=1e-5)


def test_fid_is_the_frechet_distance_of_the_pairs(run, folders, planted, monkeypatch):
    _, out, _, _ = run
    a, b = folders
    summary = json.loads((out / "summary.json").read_text())
    monkeypatch.setenv("TORCH_HOME", str(planted))
    fid = metrics.FrechetInceptionDistance(64, input_range=(0, 255))
    for key in PAIRED:
        x, y = pair_tensors(a, b, key)
        fid.update(x, real=True)
        fid.update(y, real=False)
    stats = summary["models"]["B"]
    assert stats["rfid_images"] == len(PAIRED) and stats["rfid"] == pytest.approx(fid.compute(), rel=1e-5)
    assert any("fewer than 2,048 images" in note for note in summary["notes"])  # evaluate's note


# --- unpaired files, failures, exit status ----------------------------------------------------------------


def test_unpaired_files_are_listed_in_the_result_the_report_and_the_output(run):
    code, out, stdout, stderr = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unpaired"] == {"only_in_a": ["only-a.png"], "only_in_b": ["only-b.png"]}
    assert summary["counts"] == {"images": 6, "evaluated": 4, "failed": 2, "not_done": 0, "only_in_a": 1,
                                 "only_in_b": 1}  # fmt: skip
    assert "only in A: only-a.png" in stdout.splitlines() and "only in B: only-b.png" in stdout.splitlines()
    page = (out / "index.html").read_text()
    assert "1 file(s) only in A, not compared: only-a.png" in page and "only-b.png" in page
    assert "paired with the file of B of the same relative path" in page  # the compare's definition of the images


def test_a_failed_pair_names_the_reason_and_the_command_exits_1(run, folders):
    code, out, _, stderr = run
    failures = json.loads((out / "summary.json").read_text())["failures"]
    assert code == 1 and sorted(failures) == ["broken.png", "sizes.png"]
    assert failures["sizes.png"].startswith("the images differ in size: A 56x40, B 32x32; pass --resize")
    assert (
        failures["broken.png"] == f"Failed to load image {folders[1] / 'broken.png'}: not an image PIL can read "
        "(empty, corrupt or unsupported format)"
    )
    assert "error: 2 of 6 pairs failed" in stderr


def test_unpaired_files_alone_exit_0(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    save(a, "x.png", photo(24, 24, 0))
    save(b, "x.png", photo(24, 24, 0))
    save(b, "extra.png", photo(24, 24, 1))
    code = cli.main(["compare", str(a), str(b), "-o", str(tmp_path / "r"), "--no-progress", "--lpips", "none",
                     "--no-fid"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "only in B: extra.png" in out and "0 failed" in out


def test_sizes_that_differ_are_resized_to_a_only_when_asked(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    first, second = photo(40, 56, 1), photo(32, 32, 2)
    save(a, "x.png", first)
    save(b, "x.png", second)
    refused = compare_folders(a, b, **NO_WEIGHTS)
    assert refused.rows == [] and "A 56x40, B 32x32" in refused.failures["x.png"]
    result = compare_folders(a, b, resize=True, **NO_WEIGHTS)
    expected = np.asarray(Image.fromarray(second).resize((56, 40), Image.Resampling.BILINEAR))
    (row,) = result.rows
    assert (row["width"], row["height"]) == (56, 40) and result.resized == ["x.png"] and not result.failures
    assert row["psnr"] == pytest.approx(evaluate.psnr(first, expected), abs=1e-9)
    assert any("resized to A's size for 1 pair(s): x.png" in n for n in result.notes)
    assert result.summary_json()["resized"] == ["x.png"]


def test_pairs_by_name_not_by_position(tmp_path):
    """Pairing the n-th file of A with the n-th of B would compare a.png with b.png here."""
    a, b = tmp_path / "A", tmp_path / "B"
    save(a, "a.png", photo(24, 24, 0))
    save(a, "b.png", photo(24, 24, 1))
    save(b, "b.png", photo(24, 24, 1))  # identical to A's b.png
    save(b, "c.png", photo(24, 24, 2))
    result = compare_folders(a, b, **NO_WEIGHTS)
    assert [(r["image"], r["psnr"]) for r in result.rows] == [("b.png", math.inf)]
    assert (result.only_in_a, result.only_in_b) == (["a.png"], ["c.png"])


def test_match_stem_pairs_a_jpeg_with_its_png(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    image = photo(24, 32, 3)
    save(a, "sub/x.jpg", image)
    save(b, "sub/x.png", image)
    assert compare_folders(a, b, match="stem", **NO_WEIGHTS).rows[0]["image"] == "sub/x.jpg"
    save(b, "sub/x.bmp", image)
    with pytest.raises(ValueError, match=r"B holds sub/x\.bmp and sub/x\.png, which pair by stem"):
        compare_folders(a, b, match="stem", **NO_WEIGHTS)


def test_pair_files():
    assert pair_files(["a.png", "b.png"], ["b.png", "c.png"]) == ([("b.png", "b.png")], ["a.png"], ["c.png"])
    assert pair_files(["a.jpg"], ["a.png"], "stem") == ([("a.jpg", "a.png")], [], [])
    with pytest.raises(ValueError, match="match must be 'name' or 'stem', got 'index'"):
        pair_files(["a.png"], ["a.png"], "index")  # type: ignore[arg-type]


def test_b_inside_a_is_not_taken_for_files_of_a(tmp_path):
    a = tmp_path / "A"
    save(a, "x.png", photo(24, 24, 0))
    save(a / "out", "x.png", photo(24, 24, 1))
    result = compare_folders(a, a / "out", **NO_WEIGHTS)
    assert [r["image"] for r in result.rows] == ["x.png"] and result.only_in_a == [] and result.only_in_b == []


# --- the report folder: evaluate's guarantees --------------------------------------------------------------


@pytest.fixture
def no_reading(monkeypatch):
    """Any image read fails the test: the check must come before it."""
    monkeypatch.setattr("vae_toolkit.compare.open_for_resize", lambda *a, **k: pytest.fail("an image was read"))


@pytest.mark.parametrize("where", ["A", "A/report", "B", "B/sub/report"])
def test_a_report_inside_a_or_b_is_refused_before_any_image_is_read(tmp_path, no_reading, where):
    a, b = two_folders(tmp_path)
    with pytest.raises(ReportInSourceError, match=f"refusing to write the report into {tmp_path / where}: it is in"):
        compare_folders(a, b, tmp_path / where, overwrite=True, **NO_WEIGHTS)
    assert not (tmp_path / "A" / "report").exists() and not (tmp_path / "B" / "sub" / "report").exists()


def test_a_non_empty_report_folder_and_a_link_are_refused_before_any_image_is_read(tmp_path, no_reading):
    a, b = two_folders(tmp_path)
    out = tmp_path / "r"
    out.mkdir()
    (out / "mine.txt").write_text("user")
    with pytest.raises(ReportExistsError, match="exists and is not empty; pass overwrite=True"):
        compare_folders(a, b, out, **NO_WEIGHTS)
    os.symlink(tmp_path / "elsewhere.csv", out / "metrics.csv")
    with pytest.raises(ReportLinkError, match="metrics.csv is a symbolic link"):
        compare_folders(a, b, out, overwrite=True, **NO_WEIGHTS)
    assert not (tmp_path / "elsewhere.csv").exists() and (out / "mine.txt").read_text() == "user"


def test_save_report_refuses_b_as_well_as_a(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    save(a, "x.png", photo(24, 24, 0))
    save(b, "x.png", photo(24, 24, 1))
    result = compare_folders(a, b, **NO_WEIGHTS)
    assert isinstance(result, ComparisonResult)
    for folder in (a / "r", b / "r"):
        with pytest.raises(ReportInSourceError, match="it is inside"):
            result.save_report(folder)
    assert sorted(p.name for p in b.iterdir()) == ["x.png"]


def test_rows_are_streamed_and_ctrl_c_leaves_a_partial_report(tmp_path, monkeypatch):
    a, b = two_folders(tmp_path)
    out = tmp_path / "r"
    real = __import__("vae_toolkit.compare", fromlist=["_measure"])._measure
    calls = []

    def measure(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr("vae_toolkit.compare._measure", measure)
    with pytest.raises(KeyboardInterrupt):
        compare_folders(a, b, out, batch_size=1, workers=1, **NO_WEIGHTS)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 1 and summary["partial"] is True and summary["counts"]["evaluated"] == 1
    assert summary["unpaired"]["only_in_a"] == ["only-a.png"]
    assert json.loads((out / "report-manifest.json").read_text())["partial"] is True


# --- arguments -----------------------------------------------------------------------------------------------


def test_argument_errors(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    save(a, "x.png", photo(24, 24, 0))
    save(b, "y.png", photo(24, 24, 0))
    with pytest.raises(FileNotFoundError, match=f"folder B not found: {tmp_path / 'missing'}"):
        compare_folders(a, tmp_path / "missing", **NO_WEIGHTS)
    with pytest.raises(NotADirectoryError, match=f"A must be a folder of images, got the file {a / 'x.png'}"):
        compare_folders(a / "x.png", b, **NO_WEIGHTS)
    with pytest.raises(TypeError, match="A must be a folder path"):
        compare_folders(None, b, **NO_WEIGHTS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no file of .* has a partner .* \(only in A: x\.png; only in B: y\.png\); "
                                         "to pair a.jpg with a.png, pair by stem"):  # fmt: skip
        compare_folders(a, b, **NO_WEIGHTS)
    save(b, "x.png", photo(24, 24, 0))
    with pytest.raises(TypeError, match="resize must be True or False, got 1"):
        compare_folders(a, b, resize=1, **NO_WEIGHTS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a non-empty string, got ''"):
        compare_folders(a, b, name="", **NO_WEIGHTS)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        compare_folders(a, b, batch_size=0, **NO_WEIGHTS)
    with pytest.raises(ValueError, match="match must be 'name' or 'stem'"):
        compare_folders(a, b, match="index", **NO_WEIGHTS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lpips must be"):
        compare_folders(a, b, lpips="resnet", fid=False, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gpu"):
        compare_folders(a, b, device="gpu", **NO_WEIGHTS)
    assert compare_folders(a, b, name="mine", **NO_WEIGHTS).rows[0]["model"] == "mine"


def test_the_command_says_what_is_wrong_in_one_line(tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    save(a, "x.png", photo(24, 24, 0))
    save(b, "x.png", photo(24, 24, 0))
    code = cli.main(["compare", str(a), str(b), "-o", str(b / "r"), "--lpips", "none", "--no-fid"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "it is inside" in err[0] and "compare --help" in err[0]
    code = cli.main(["compare", str(a), str(tmp_path / "nope"), "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].endswith(f": error: folder B not found: {tmp_path / 'nope'}")
