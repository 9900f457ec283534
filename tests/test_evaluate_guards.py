"""``evaluate`` and the command line under attack: a report folder never deletes what it did not write, a run keeps
its rows when interrupted, a pixel limit, a missing metrics library found before any model loads, non-UTF-8 names,
no silent tiling, one model given twice, and ``--help`` without torch."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

from vae_toolkit import __main__ as cli
from vae_toolkit import load_for_encoding
from vae_toolkit.evaluate import ReportExistsError, evaluate
from vae_toolkit.image_utils import ImageProcessingError

ROOT = Path(__file__).parents[1]


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h - 2, 1)], -1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def write_photos(folder: Path, n: int, size: tuple[int, int] = (32, 24)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(photo(size[1], size[0], seed=i)).save(folder / f"p{i:02d}.png")
    return [f"p{i:02d}.png" for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny_vae().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the check must come before it."""
    monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("a model loaded"))


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli_evaluate(capsys, source, output, model, *extra) -> tuple[int, str, str]:
    argv = ["evaluate", str(source), "-o", str(output), "--model", str(model), "--device", "cpu", "--no-progress"]
    code = cli.main([*argv, *extra])
    out, err = capsys.readouterr()
    return code, out, err


# --- 1. --overwrite never deletes what the report did not write -------------------------------------------


def test_a_report_into_its_source_is_refused_and_every_user_file_is_kept(capsys, tmp_path, model, no_loading):
    """The attack: ``evaluate photos -o photos --overwrite`` with the user's own PNGs under photos/images/."""
    photos = tmp_path / "photos"
    write_photos(photos, 2)
    write_photos(photos / "images", 2)  # the user's photos, in a folder named like the report's pictures
    (photos / "metrics.csv").write_text("the user's own table\n")
    before = snapshot(photos)
    for output in (photos, photos / "report", photos / "images"):
        code, out, err = cli_evaluate(capsys, photos, output, model, "--overwrite")
        assert code == 2, err
        assert f"refusing to write the report into {output}: it is inside {photos}" in err
        assert len(err.strip().splitlines()) == 1 and "overwrite" not in err
        assert snapshot(photos) == before
        assert not (photos / "report").exists()


def test_the_python_calls_refuse_a_report_inside_the_source(tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 2)
    before = snapshot(photos)
    vaes = {"tiny": make_tiny_vae()}
    with pytest.raises(ValueError, match="inside"):
        evaluate(vaes, photos, photos, overwrite=True, progress=False)
    result = evaluate(vaes, photos, progress=False)
    with pytest.raises(ValueError, match="inside"):
        result.save_report(photos / "sub", overwrite=True)
    assert snapshot(photos) == before


def test_overwrite_replaces_only_what_the_previous_report_wrote(capsys, tmp_path, model):
    source, report = tmp_path / "src", tmp_path / "report"
    write_photos(source, 6)
    assert cli_evaluate(capsys, source, report, model)[0] == 0
    manifest = json.loads((report / "report-manifest.json").read_text())
    first = set(manifest["files"])
    assert {"metrics.csv", "summary.json", "index.html"} <= first
    assert first == {p for p in snapshot(report) if p != "report-manifest.json"}
    # the user adds files of their own, some named as a report's
    (report / "images" / "mine.png").write_bytes(b"user")
    (report / "notes.txt").write_text("user")
    # a picture's name that the next report (3 images, all shown) writes again, now a file of the user's
    name = "images/compare-000-p00.png"
    (report / name).unlink(missing_ok=True)
    (report / name).write_bytes(b"a user file")
    manifest["files"] = [f for f in manifest["files"] if f != name]
    (report / "report-manifest.json").write_text(json.dumps(manifest))
    for p in source.glob("p0[3-5].png"):
        p.unlink()  # fewer images: fewer pictures in the new report
    code, out, err = cli_evaluate(capsys, source, report, model, "--overwrite")
    assert code == 0, err
    assert (report / "images" / "mine.png").read_bytes() == b"user"
    assert (report / "notes.txt").read_text() == "user"
    assert (report / name).read_bytes() == b"a user file"  # not in the manifest: never replaced
    second = set(json.loads((report / "report-manifest.json").read_text())["files"])
    assert name not in second and "images/compare-000-p00-2.png" in second  # written beside it
    left = set(snapshot(report)) - {"report-manifest.json", "images/mine.png", "notes.txt", name}
    assert left == second  # the first report's other files were removed or replaced
    page = (report / "index.html").read_text()
    for file in second:
        if file.startswith("images/"):
            assert f'"{file}"' in page


def test_overwrite_never_follows_a_manifest_outside_the_report_names(tmp_path):
    """A manifest that lists a user's file (or a path outside the folder): those files are kept."""
    photos, report = tmp_path / "photos", tmp_path / "report"
    write_photos(photos, 1)
    report.mkdir()
    (tmp_path / "outside.txt").write_text("x")
    (tmp_path / "absolute.txt").write_text("x")  # an absolute path of the test's own: never a system file
    (report / "mine.txt").write_text("x")
    (report / "images").mkdir()
    (report / "images" / "compare-000-p0.jpg").write_text("x")  # a report's name pattern, but not a PNG
    files = ["../outside.txt", "mine.txt", str(tmp_path / "absolute.txt"), "images/../../outside.txt"]
    (report / "report-manifest.json").write_text(json.dumps({"files": [*files, "images/compare-000-p0.jpg"]}))
    evaluate({"tiny": make_tiny_vae()}, photos, report, overwrite=True, progress=False)
    assert (tmp_path / "outside.txt").exists() and (report / "mine.txt").exists()
    assert (tmp_path / "absolute.txt").exists() and (report / "images" / "compare-000-p0.jpg").exists()


# --- 3. the report folder is checked first, rows are written as they come --------------------------------


def test_an_unwritable_report_folder_is_refused_before_loading(capsys, tmp_path, model, no_loading):
    """Real: a report path below a file (ENOTDIR). Simulated: a read-only file system (EROFS), by making the
    probe's file creation fail as it fails there (the tests run as root, for whom chmod cannot refuse a write)."""
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    (tmp_path / "file").write_text("x")
    code, _, err = cli_evaluate(capsys, photos, tmp_path / "file" / "report", model)
    assert code == 2 and f"{tmp_path / 'file'} is a file" in err


def test_a_read_only_report_folder_is_refused_before_loading(capsys, tmp_path, model, no_loading, monkeypatch):
    from vae_toolkit import report_folder

    photos, report = tmp_path / "photos", tmp_path / "report"
    write_photos(photos, 1)
    report.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)).parent == report and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(report_folder.os, "open", read_only)
    code, _, err = cli_evaluate(capsys, photos, report, model)
    assert code == 2, err
    assert f"cannot write {report}: Read-only file system" in err


def test_a_full_disk_names_the_file_that_could_not_be_written(capsys, tmp_path, model, monkeypatch):
    """ENOSPC simulated at the system call: every write to metrics.csv fails as on a full disk."""
    from vae_toolkit import report_folder

    photos, report = tmp_path / "photos", tmp_path / "report"
    write_photos(photos, 3)
    real_write = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.csv"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(report_folder.os, "write", full)
    code, _, err = cli_evaluate(capsys, photos, report, model)
    assert code == 1
    assert f"cannot write {report / 'metrics.csv'}: No space left on device (the disk is full)" in err


DRIVER = textwrap.dedent(
    """
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the test runner ignores
    import diffusers
    real = diffusers.AutoencoderKL.decode
    def slow(self, *args, **kwargs):
        time.sleep(float(sys.argv[1]))
        return real(self, *args, **kwargs)
    diffusers.AutoencoderKL.decode = slow
    from vae_toolkit.__main__ import main
    sys.exit(main(sys.argv[2:]))
    """
)


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_keeps_its_rows_and_a_partial_summary(tmp_path, model, sig, code):
    photos, report = tmp_path / "photos", tmp_path / "report"
    keys = write_photos(photos, 16)
    (tmp_path / "driver.py").write_text(DRIVER)
    argv = ["evaluate", str(photos), "-o", str(report), "-m", str(model), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), "0.4", *argv, "--batch-size", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and len(_rows(report / "metrics.csv")) < 4:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    rows = _rows(report / "metrics.csv")
    assert 4 <= len(rows) < len(keys), "the rows done before the signal, not all"
    assert len({r["image"] for r in rows}) == len(rows) and all(float(r["psnr"]) > 0 for r in rows)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["partial"] is True
    assert summary["counts"] == {"images": len(keys), "evaluated": len(rows), "failed": 0, "not_done": 16 - len(rows)}
    assert summary["models"][str(model)]["count"] == len(rows)
    what = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert f"{what}; partial report: {len(rows)} of {len(keys)} images evaluated" in err
    assert str(report / "metrics.csv") in err


# --- 4. a pixel limit, checked before decoding ------------------------------------------------------------


def big_png_header(path: Path, width: int = 10000, height: int = 10000, rows: int = 10) -> Path:
    """A PNG whose header says ``width x height`` (greyscale) and whose data holds only ``rows`` rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + bytes(width) for _ in range(rows))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def test_an_image_above_the_pixel_limit_fails_fast_without_decoding(tmp_path):
    path = big_png_header(tmp_path / "huge.png")
    start = time.perf_counter()
    with pytest.raises(ImageProcessingError) as info:
        load_for_encoding(path, max_pixels=89_478_485)
    assert time.perf_counter() - start < 0.5
    message = str(info.value)
    assert "10000x10000" in message and "100,000,000 pixels" in message and "89,478,485" in message
    assert "--max-pixels N" in message and str(path) in message


def test_evaluate_and_encode_refuse_an_image_above_the_limit_and_say_how_to_raise_it(capsys, tmp_path, model):
    photos = tmp_path / "photos"
    write_photos(photos, 2)
    big_png_header(photos / "huge.png")
    start = time.perf_counter()
    code, out, err = cli_evaluate(capsys, photos, tmp_path / "report", model)
    assert code == 1
    reason = json.loads((tmp_path / "report" / "summary.json").read_text())["failures"]["huge.png"]
    assert "100,000,000 pixels" in reason and "89,478,485" in reason and "--max-pixels N" in reason
    assert "3 images: 2 evaluated, 1 failed" in out
    assert time.perf_counter() - start < 30
    result = evaluate({"tiny": make_tiny_vae()}, photos, progress=False)
    assert "huge.png" in result.failures and result.settings["max_pixels"] == 89_478_485
    # the advice followed: a limit raised past a smaller image lets it through
    small = tmp_path / "small"
    write_photos(small, 1, size=(40, 32))
    code, out, err = cli_evaluate(capsys, small, tmp_path / "r2", model, "--max-pixels", "1000")
    assert code == 1 and "1,280 pixels" in err and "limit of 1,000 pixels" in err
    code, out, err = cli_evaluate(capsys, small, tmp_path / "r3", model, "--max-pixels", "1280")
    assert code == 0, err
    code, out, err = cli_evaluate(capsys, small, tmp_path / "r4", model, "--max-pixels", "0")
    assert code == 0, err
    # encode takes the same option
    argv = ["encode", str(small), "-o", str(tmp_path / "store"), "-m", str(model), "--device", "cpu"]
    assert cli.main([*argv, "--no-progress", "--max-pixels", "1000"]) == 1
    assert "limit of 1,000 pixels" in capsys.readouterr().err
    assert cli.main([*argv, "--no-progress", "--max-pixels", "1280"]) == 0


def test_encode_dataset_takes_max_pixels(tmp_path):
    from vae_toolkit import encode_dataset

    photos = tmp_path / "photos"
    write_photos(photos, 1, size=(40, 32))
    summary = encode_dataset(make_tiny_vae(), photos, tmp_path / "store", max_pixels=1000, progress=False)
    assert "limit of 1,000 pixels" in summary.failed["p00.png"]
    with pytest.raises(ValueError, match="max_pixels"):
        encode_dataset(make_tiny_vae(), photos, tmp_path / "store2", max_pixels=0, progress=False)


# --- 5. a missing metrics library is found before anything loads -------------------------------------------


def test_without_pytorch_msssim_evaluate_fails_before_any_model_loads(
    capsys, tmp_path, model, monkeypatch, no_loading
):
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    monkeypatch.setitem(sys.modules, "pytorch_msssim", None)  # import pytorch_msssim raises ImportError
    monkeypatch.setitem(sys.modules, "pytorch_msssim.ssim", None)
    code, out, err = cli_evaluate(capsys, photos, tmp_path / "report", model)
    assert code == 1
    assert err.strip() == (
        'python -m vae_toolkit: error: evaluate needs pytorch-msssim (SSIM, MS-SSIM): pip install "vae-toolkit[eval]"'
    )
    assert not (tmp_path / "report").exists()
    vae = make_tiny_vae()
    vae.encode = lambda *a, **k: pytest.fail("an image was encoded")
    with pytest.raises(ImportError, match=r'pip install "vae-toolkit\[eval\]"'):
        evaluate({"tiny": vae}, photos, progress=False)


# --- 10. a non-UTF-8 file name is a failure, as in encode ----------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_a_failure(capsys, tmp_path, model):
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    try:
        bad = photos / os.fsdecode(b"bad\xff.png")
        Image.fromarray(photo(24, 32)).save(bad, format="PNG")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses the name")
    code, out, err = cli_evaluate(capsys, photos, tmp_path / "report", model)
    assert code == 1
    assert "2 images: 1 evaluated, 1 failed" in out
    failures = json.loads((tmp_path / "report" / "summary.json").read_text())["failures"]
    assert list(failures) == ["bad\\xff.png"] and "not valid UTF-8" in failures["bad\\xff.png"]
    result = evaluate({"tiny": make_tiny_vae()}, photos, progress=False)
    assert list(result.failures) == ["bad\\xff.png"]


# --- also seen ------------------------------------------------------------------------------------------------


def test_evaluate_does_not_tile_unless_asked(tmp_path):
    """The tiny VAE's sample_size is 32: a 48x40 image would be tiled silently by the latents' default."""
    photos = tmp_path / "photos"
    write_photos(photos, 1, size=(48, 40))
    vae = make_tiny_vae()
    calls = []
    real = vae.enable_tiling
    vae.enable_tiling = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    result = evaluate({"tiny": vae}, photos, progress=False)
    assert calls == [] and result.settings["tile"] is False
    result = evaluate({"tiny": vae}, photos, tile=True, progress=False)
    assert calls and result.settings["tile"] is True


def test_cli_tile_option_is_recorded(capsys, tmp_path, model):
    photos = tmp_path / "photos"
    write_photos(photos, 1, size=(48, 40))
    assert cli_evaluate(capsys, photos, tmp_path / "a", model)[0] == 0
    assert cli_evaluate(capsys, photos, tmp_path / "b", model, "--tile")[0] == 0
    settings = [json.loads((tmp_path / r / "summary.json").read_text())["settings"] for r in "ab"]
    assert settings[0]["tile"] is False and settings[1]["tile"] is True


def test_one_model_given_by_two_spellings_is_evaluated_once(capsys, tmp_path, model, monkeypatch):
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(model.parent)
    spellings = [f"./{model.name}", f"{model.name}/", str(tmp_path / "link")]
    argv = ["evaluate", str(photos), "-o", str(tmp_path / "r"), "--device", "cpu", "--no-progress"]
    for s in spellings:
        argv += ["-m", s]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert f"note: --model {model.name}/ is the same model as ./{model.name}; evaluated once" in err
    assert {r["model"] for r in _rows(tmp_path / "r" / "metrics.csv")} == {f"./{model.name}"}


def test_one_registered_name_given_twice_is_evaluated_once(capsys, tmp_path, hf_home):
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    argv = ["evaluate", str(photos), "-o", str(tmp_path / "r"), "-m", "sd14", "-m", "sd14", "--device", "cpu"]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert "note: --model sd14 is given twice; evaluated once" in capsys.readouterr().err
    assert {r["model"] for r in _rows(tmp_path / "r" / "metrics.csv")} == {"sd14"}


def test_refusals_name_the_option_of_their_interface(capsys, tmp_path, model, no_loading):
    photos, report = tmp_path / "photos", tmp_path / "report"
    write_photos(photos, 1)
    report.mkdir()
    (report / "x.txt").write_text("x")
    code, _, err = cli_evaluate(capsys, photos, report, model)
    assert code == 2 and "pass --overwrite to replace" in err and "overwrite=True" not in err
    with pytest.raises(ReportExistsError) as info:
        evaluate({"tiny": make_tiny_vae()}, photos, report, progress=False)
    assert "overwrite=True" in str(info.value) and "--overwrite" not in str(info.value)


def test_encode_refusal_printed_by_the_cli_names_only_the_option(capsys, tmp_path, model, hf_home):
    photos = tmp_path / "photos"
    write_photos(photos, 1)
    base = ["encode", str(photos), "-o", str(tmp_path / "store"), "--device", "cpu", "--no-progress"]
    assert cli.main([*base, "-m", "sd14"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "-m", str(model)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["evaluate", "--help"], ["encode", "--help"], ["evaluate"], ["evaluate", "x", "-o", "y"]],
)
def test_help_and_argument_errors_do_not_import_torch(argv):
    code = (
        "import sys\n"
        "from vae_toolkit.__main__ import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'diffusers') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr


def test_python_m_help_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vae_toolkit", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    assert "evaluate" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "vae_toolkit" in imported


def test_the_summary_line_says_how_many_were_evaluated(capsys, tmp_path, model):
    photos = tmp_path / "photos"
    write_photos(photos, 3)
    (photos / "z1.png").write_bytes(b"not an image")
    (photos / "z2.png").write_bytes(b"not an image")
    code, out, err = cli_evaluate(capsys, photos, tmp_path / "r", model)
    assert code == 1
    assert "evaluate: 5 images: 3 evaluated, 2 failed" in out
    assert "2 of 5 images failed" in err
    assert "5 images from" in (tmp_path / "r" / "index.html").read_text()
    assert "(3 evaluated, 2 failed)" in (tmp_path / "r" / "index.html").read_text()


def test_the_limit_does_not_change_the_tensor(tmp_path):
    """The reader with a limit the image meets gives the same tensor as without one."""
    path = tmp_path / "p.png"
    Image.fromarray(photo(24, 32)).save(path)
    assert torch.equal(load_for_encoding(path), load_for_encoding(path, max_pixels=32 * 24))
