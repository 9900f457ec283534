"""``python -m vae_toolkit fid A B`` and :func:`vae_toolkit.fid.fid_between`: pytorch-fid's value of two folders,
statistics files, KID and the errors.

Weights are seeded random tensors in a temporary ``TORCH_HOME``. The folders are written by :func:`_write`; on
the same files and weights, pytorch-fid 0.3.0 gave (``calculate_fid_given_paths([A, B], batch_size=50,
device="cpu", dims=d, num_workers=0)`` in an environment with torch 2.13, torchvision 0.28, pytorch-fid 0.3.0,
scipy 1.17, ``TORCH_HOME`` holding ``metric_weights.plant``'s files):
"""

from __future__ import annotations

import json
from pathlib import Path

import metric_weights as mw
import numpy as np
import pytest
import torch
from PIL import Image

from vae_toolkit import fid, kid, metrics
from vae_toolkit.__main__ import main

#: pytorch-fid 0.3.0 on :func:`_write`'s folders (2048-d: 481.9840120393442, needs a slow square root; the
#: library gave 481.9840115340055, relative 1e-9).
PYTORCH_FID_64 = 3.426452957828039


# every test here reads the seeded Inception weights (tests/conftest.py: inception_home)
pytestmark = pytest.mark.usefixtures("inception_torch_home")


def _uint8(seed: int, n: int, shift: float) -> torch.Tensor:
    return ((mw.fid_images(seed, n, size=48, shift=shift) + 1) * 127.5).round().byte()


def _write(folder: Path) -> tuple[Path, Path]:
    """Folders A (6 PNGs) and B (5 PNGs, brighter) of 48x48 images: the reference's files."""
    a, b = folder / "A", folder / "B"
    for path, seed, n, shift in ((a, 41, 6, 0.0), (b, 42, 5, 40.0)):
        path.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(_uint8(seed, n, shift)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path / f"{i:03d}.png")
    return a, b


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("fid_folders"))


def _json(capsys, *args: str) -> dict:
    assert main(["fid", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_fid_of_two_folders_is_pytorch_fids_and_the_librarys_own(folders, capsys):
    a, b = folders
    out = _json(capsys, str(a), str(b), "--dims", "64", "--batch-size", "4")
    assert out["images"] == [6, 5] and out["dims"] == 64 and out["kid_mean"] is None
    assert out["fid"] == pytest.approx(PYTORCH_FID_64, rel=1e-6)
    own = metrics.FrechetInceptionDistance(64, input_range=(0, 255))
    own.update(_uint8(41, 6, 0.0), True)
    own.update(_uint8(42, 5, 40.0), False)
    assert out["fid"] == pytest.approx(own.compute(), rel=1e-6)


def test_saved_statistics_give_the_same_fid_and_load_as_pytorch_fids_layout(folders, tmp_path, capsys):
    a, b = folders
    stats = tmp_path / "a.npz"
    assert main(["fid", str(a), "--dims", "64", "--save-stats", str(stats)]) == 0  # one folder: statistics only
    assert "statistics of" in capsys.readouterr().err
    with np.load(stats) as f:
        assert {"mu", "sigma"} <= set(f.files) and f["mu"].shape == (64,) and int(f["num_images"]) == 6
    from_stats = _json(capsys, str(stats), str(b), "--dims", "64")
    assert from_stats["images"] == [6, 5]
    assert from_stats["fid"] == pytest.approx(PYTORCH_FID_64, rel=1e-6)
    both = fid.fid_between(stats, stats, dims=64)
    assert both.fid == pytest.approx(0.0, abs=1e-6)


def test_kid_between_folders_with_the_subset_size_lowered_and_a_note(folders, capsys):
    a, b = folders
    assert main(["fid", str(a), str(b), "--dims", "64", "--kid", "--kid-subsets", "4", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "note: KID subset size lowered from 1000 to 5" in captured.err and out["kid_subset_size"] == 5
    expected = kid.kernel_inception_distance(
        metrics.inception_features(_uint8(41, 6, 0.0), 64, input_range=(0, 255)),
        metrics.inception_features(_uint8(42, 5, 40.0), 64, input_range=(0, 255)),
        subsets=4,
        subset_size=5,
    )
    assert (out["kid_mean"], out["kid_std"]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_the_text_output_and_mixed_sizes(folders, tmp_path, capsys):
    a, _ = folders
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, size in enumerate((32, 40, 40)):
        Image.new("RGB", (size, size), (i * 60, 90, 200)).save(mixed / f"{i}.jpg")
    Image.new("L", (40, 40), 128).save(mixed / "gray.png")  # read as RGB, as pytorch-fid does
    (mixed / "notes.txt").write_text("not an image")
    (mixed / "nested").mkdir()
    Image.new("RGB", (40, 40)).save(mixed / "nested" / "x.png")  # not searched, as pytorch-fid
    assert [p.name for p in fid.list_images(mixed)] == ["0.jpg", "1.jpg", "2.jpg", "gray.png"]
    assert main(["fid", str(a), str(mixed), "--dims", "64", "--kid", "--kid-subset-size", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FID: ") and float(lines[0][5:]) > 0
    assert lines[1].startswith("KID: ") and "(100 subsets of 3)" in lines[1]


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["{a}", "{a}", "{a}"], 2, "give two paths A B .*got 3"),
        (["{a}"], 2, "give two paths A B"),
        (["{a}", "{missing}"], 1, "missing does not exist"),
        (["{a}", "{empty}"], 1, "holds no image with an extension pytorch-fid reads"),
        (["{a}", "{stats}", "--kid"], 1, r"KID needs the images' features: give two folders"),
        (["{stats}", "{a}", "--save-stats", "{out}"], 1, "is already statistics"),
        (["{a}", "{stats}"], 1, r"holds statistics of 64-d features, not 2048: pass dims=64"),
        (["{a}", "{broken}", "--dims", "64"], 1, r"cannot read .*bad\.png as an image"),
        (["{a}", "{a}", "--kid-subset-size", "1"], 2, "KID subset size"),
    ],
)
def test_errors_name_the_path_and_what_to_do(folders, tmp_path, capsys, args, status, message):
    a, _ = folders
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    stats = tmp_path / "s.npz"
    np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))
    names = {"a": a, "missing": tmp_path / "missing", "empty": tmp_path / "empty", "stats": stats}
    names |= {"broken": tmp_path / "broken", "out": tmp_path / "out.npz"}
    assert main(["fid", *(x.format(**names) for x in args)]) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_fid_between_needs_two_paths_or_somewhere_to_save(folders):
    with pytest.raises(ValueError, match="needs two paths, or one folder and save_stats"):
        fid.fid_between(folders[0], None, dims=64)
    with pytest.raises(NotADirectoryError, match="is not a folder of images"):
        fid.list_images(folders[0] / "000.png")
