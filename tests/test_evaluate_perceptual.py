"""evaluate's LPIPS and rFID: computed through vae_toolkit.metrics, on the images evaluate compares.

The weights are seeded random tensors in the real files' layouts, planted in a temporary TORCH_HOME
(tests/metric_weights.py); nothing is downloaded (HF_HUB_OFFLINE=1). rFID runs here on pytorch-fid's 64-d
features: the matrix square root of the 2048-d covariances takes 10-70 s on 2 cores, once per model; the 2048-d
features and statistics are tested against pytorch-fid in tests/test_metrics.py, and evaluate uses the same
accumulator with ``FID_DIMS`` (2048) otherwise.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import metric_weights as mw
import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

from vae_toolkit import __main__ as cli
from vae_toolkit import metrics
from vae_toolkit.evaluate import evaluate, reconstruct
from vae_toolkit.image_utils import center_crop_to_multiple, open_image, pil_to_tensor

N_IMAGES = 5


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = (np.sin(xx / (4 + seed)) * 60 + np.cos(yy / 6) * 60 + 128)[..., None] + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    mw.plant(home / "hub" / "checkpoints")
    return home


@pytest.fixture(scope="module", autouse=True)
def _fid_dims():
    mp = pytest.MonkeyPatch()
    mp.setattr("vae_toolkit.eval_perceptual.FID_DIMS", 64)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(N_IMAGES):
        Image.fromarray(_photo(72, 64, seed=i)).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_vae().save_pretrained(root / "good", safe_serialization=True)
    bad = make_tiny_vae()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in bad.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    bad.save_pretrained(root / "perturbed", safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def run(planted, source, models, tmp_path_factory):
    """One CLI evaluation of two models with the planted weights (LPIPS AlexNet and rFID by default)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(planted))
    out = tmp_path_factory.mktemp("report") / "report"
    counted: list[int] = []
    real = metrics.FrechetInceptionDistance.features

    def features(self, images):
        counted.append(len(images))
        return real(self, images)

    mp.setattr(metrics.FrechetInceptionDistance, "features", features)
    try:
        # batches of one, as the reconstructions computed here one at a time (a batch of 2 may use other kernels)
        argv = ["evaluate", str(source), "-o", str(out), "--no-progress", "--batch-size", "1"]
        code = cli.main([*argv, "--model", str(models / "good"), "--model", str(models / "perturbed")])
    finally:
        mp.undo()
    return code, out, sum(counted)


def _images(source: Path, models: Path):
    """The prepared originals and each model's reconstructions, computed here one image at a time."""
    from vae_toolkit import VAELoader

    loader = VAELoader()
    vaes = {m: loader.load_sd_vae(str(models / m), "cpu")[0] for m in ("good", "perturbed")}
    originals, recons = {}, {m: {} for m in vaes}
    for path in sorted(source.glob("*.png")):
        original = center_crop_to_multiple(open_image(path), 8)
        originals[path.name] = np.asarray(original)
        for m, vae in vaes.items():
            (rec,) = reconstruct(vae, pil_to_tensor(original).unsqueeze(0), tile=False)  # as evaluate: no tiles
            recons[m][path.name] = np.asarray(rec)
    return originals, recons


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_metrics_csv_has_the_lpips_column_and_each_value_is_metrics_lpips(run, source, models, planted, monkeypatch):
    code, out, _ = run
    assert code == 0
    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["image", "model", "width", "height", "psnr", "ssim", "ms_ssim", "mae", "lpips"]
    monkeypatch.setenv("TORCH_HOME", str(planted))
    originals, recons = _images(source, models)
    loss = metrics.LPIPS("alex")
    for row in table:
        a, b = originals[row["image"]], recons[Path(row["model"]).name][row["image"]]
        expected = float(loss(_tensor([a]), _tensor([b]))[0])
        assert float(row["lpips"]) == pytest.approx(expected, abs=1e-5), row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["lpips"] == "alex" and summary["settings"]["reader"] == "exact"
    assert "lpips package 0.1.4" in summary["metrics"]["lpips"]


def test_rfid_is_the_frechet_distance_of_the_originals_and_the_reconstructions(
    run, source, models, planted, monkeypatch
):
    code, out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    monkeypatch.setenv("TORCH_HOME", str(planted))
    originals, recons = _images(source, models)
    keys = sorted(originals)
    for model in ("good", "perturbed"):
        stats = summary["models"][str(models / model)]
        fid = metrics.FrechetInceptionDistance(64)
        for k in keys:  # one image per Inception call, as the run's batches of one: the same kernels
            fid.update(_tensor([originals[k]]), real=True)
            fid.update(_tensor([recons[model][k]]), real=False)
        assert stats["rfid_images"] == N_IMAGES == stats["count"]
        assert stats["rfid"] == pytest.approx(fid.compute(), rel=1e-6)
    assert "pytorch-fid 0.3.0" in summary["metrics"]["rfid"]
    assert any("fewer than 2,048 images" in note for note in summary["notes"])
    page = (out / "index.html").read_text()
    first = re.search(r'<table id="summary">.*?</table>', page, re.S).group(0)
    assert "LPIPS" in first and f"{summary['models'][str(models / 'good')]['rfid']:.2f}" in first
    assert "fewer than 2,048 images" in page


def test_the_originals_inception_features_are_computed_once_whatever_the_number_of_models(run):
    _, _, images_through_inception = run
    assert images_through_inception == N_IMAGES * (1 + 2)  # the originals once, each model's reconstructions


@pytest.mark.parametrize(
    ("flags", "lpips_column", "rfid"),
    [
        pytest.param(["--lpips", "vgg", "--no-fid"], "vgg", False, id="vgg"),
        pytest.param(["--lpips", "squeeze", "--no-fid"], "squeeze", False, id="squeeze"),
        pytest.param(["--lpips", "none", "--no-fid"], None, False, id="none"),
        pytest.param(["--lpips", "none", "--fid"], None, True, id="fid-only"),
    ],
)
def test_the_lpips_and_fid_options(planted, source, models, tmp_path, monkeypatch, flags, lpips_column, rfid):
    monkeypatch.setenv("TORCH_HOME", str(planted))
    out = tmp_path / "r"
    argv = ["evaluate", str(source), "-o", str(out), "--no-progress", "--model", str(models / "good"), "--limit", "2"]
    assert cli.main([*argv, *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["models"][str(models / "good")]
    assert summary["settings"]["lpips"] == lpips_column
    assert ("lpips" in stats) == (lpips_column is not None)
    assert ("rfid" in stats) == rfid
    with open(out / "metrics.csv", newline="") as f:
        assert ("lpips" in next(csv.reader(f))) == (lpips_column is not None)


@pytest.mark.parametrize(
    ("flags", "file"),
    [
        pytest.param(["--lpips", "alex", "--no-fid"], "alexnet-owt-7be5be79.pth", id="lpips"),
        pytest.param(["--lpips", "none", "--fid"], "pt_inception-2015-12-05-6726825d.pth", id="fid"),
    ],
)
def test_a_metric_asked_for_without_weights_stops_before_any_model_loads(
    source, models, tmp_path, monkeypatch, capsys, flags, file
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("loaded"))
    out = tmp_path / "r"
    code = cli.main(["evaluate", str(source), "-o", str(out), "--model", str(models / "good"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    folder = tmp_path / "empty" / "hub" / "checkpoints"
    assert file in err[0] and "https://" in err[0] and f"put it in {folder}" in err[0]
    assert not (out / "metrics.csv").exists()


def test_metrics_on_by_default_without_weights_are_notes_and_the_report_is_made(source, models, tmp_path, capsys):
    out = tmp_path / "r"  # the suite's TORCH_HOME is empty
    assert cli.main(["evaluate", str(source), "-o", str(out), "--no-progress", "--model", str(models / "good")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [n.split(":")[0] for n in summary["notes"]] == ["LPIPS left out", "rFID left out"]
    assert "lpips" not in summary["models"][str(models / "good")] and (out / "index.html").is_file()
    assert "note: LPIPS left out: alexnet-owt-7be5be79.pth" in capsys.readouterr().err


def test_rfid_of_a_model_that_fails_on_an_image_is_over_the_images_it_reconstructed(planted, source, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted))
    vae = make_tiny_vae()
    real = vae.encode
    first = np.asarray(center_crop_to_multiple(open_image(source / "p0.png"), 8))

    def encode(x, *args, **kwargs):
        target = torch.from_numpy(first.copy()).permute(2, 0, 1).float() / 127.5 - 1
        if any(torch.equal(torch.round((image + 1) * 127.5), torch.round((target + 1) * 127.5)) for image in x):
            raise RuntimeError("cannot encode this one")
        return real(x, *args, **kwargs)

    vae.encode = encode
    result = evaluate({"flaky": vae, "steady": make_tiny_vae()}, source, batch_size=2, progress=False, lpips="none")
    assert list(result.failures) == ["p0.png"]
    assert result.summary["flaky"]["rfid_images"] == result.summary["flaky"]["count"] == N_IMAGES - 1
    assert math.isfinite(result.summary["flaky"]["rfid"])


def test_lpips_of_images_smaller_than_its_receptive_field_is_empty_not_a_crash(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted))
    for i in range(2):
        Image.fromarray(_photo(16, 16, seed=i)).save(tmp_path / f"s{i}.png")
    result = evaluate({"m": make_tiny_vae()}, tmp_path, progress=False, lpips="alex", fid=False)
    assert result.metrics[-1] == "lpips" and [r["lpips"] for r in result.rows] == [None, None]
    assert all(r["psnr"] is not None for r in result.rows)


def test_fast_reader_is_opt_in_and_recorded(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted))
    Image.fromarray(_photo(96, 80, seed=3)).save(tmp_path / "big.jpg", quality=90)
    vaes = {"m": make_tiny_vae()}
    exact = evaluate(vaes, tmp_path, size=16, progress=False, lpips="none", fid=False)
    fast = evaluate(vaes, tmp_path, size=16, progress=False, lpips="none", fid=False, fast_reader=True)
    assert exact.settings["reader"] == "exact" and fast.settings["reader"] == "fast"
    assert exact.rows[0]["psnr"] != fast.rows[0]["psnr"]  # the JPEG really was read the other way


@pytest.mark.parametrize(
    ("damage", "file", "expected"),
    [
        pytest.param("truncate", "alexnet-owt-7be5be79.pth", "probably truncated", id="truncated-alexnet"),
        pytest.param("swap", "pt_inception-2015-12-05-6726825d.pth", "is not pytorch-fid", id="inception-is-vgg"),
    ],
)
def test_a_damaged_weights_file_stops_the_run_before_any_model_loads(
    planted, source, models, tmp_path, monkeypatch, capsys, damage, file, expected
):
    import shutil

    home = tmp_path / "torch"
    shutil.copytree(planted, home)
    target = home / "hub" / "checkpoints" / file
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    else:  # another network's weights under this name
        shutil.copy(home / "hub" / "checkpoints" / "lpips-v0.1-vgg.pth", target)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("loaded"))
    code = cli.main(["evaluate", str(source), "-o", str(tmp_path / "r"), "--model", str(models / "good")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert str(target) in err[0] and expected in err[0]
