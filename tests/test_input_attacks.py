"""Inputs that used to cost far more than they should, or be misread: thin images (a 2x3000 strip resized to
512x768,000 before its crop), 0.1.0 code reaching a module through the package, bucket options given without
``--buckets``, and the summary of a ``--size`` run speaking of buckets."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

import vae_toolkit
from vae_toolkit import __main__ as cli
from vae_toolkit import _commands, _pixels
from vae_toolkit.buckets import bucket_sizes, choose_bucket, plan_crop, prepare_image, size_plan
from vae_toolkit.image_utils import ImageProcessor, load_for_encoding, pil_to_tensor

ROOT = Path(__file__).parents[1]
BILINEAR = Image.Resampling.BILINEAR


def _noise(path: Path, w: int, h: int, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth content plus noise: what a camera gives, as far as resampling is concerned."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(x / 13.0) * 70, np.cos(y / 9.0) * 70, np.sin((x + y) / 21.0) * 70], -1) + 128
    return Image.fromarray(np.clip(smooth + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8))


def _levels(x: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in ``[-1, 1]`` (``v / 127.5 - 1``) back to its uint8 levels, ``[H, W, 3]``."""
    return np.rint((x.double().numpy() + 1) * 127.5).astype(np.int64).transpose(1, 2, 0)


def _resize_then_crop(img: Image.Image, resized: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]):
    """The 0.1.0 way (torchvision's Resize + CenterCrop on PIL): the whole resized image, then the crop.
    Sizes are ``(height, width)``, as a ``CropPlan``'s."""
    (rh, rw), (top, left), (th, tw) = resized, crop, target
    return np.asarray(img.resize((rw, rh), BILINEAR).crop((left, top, left + tw, top + th)), dtype=np.int64)


# --- 7. a thin image is resampled where it is kept, in memory bounded by the output -------------------------


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys
    from PIL import Image
    from vae_toolkit.buckets import bucket_sizes, prepare_image
    from vae_toolkit.image_utils import ImageProcessor, load_for_encoding, pil_to_tensor

    small = sys.argv[1]
    prepare_image(small, buckets=[(64, 64)]); load_for_encoding(small, 64); pil_to_tensor(Image.open(small), 64)

    def peak():  # bytes: the high-water mark of the resident set, which clear_refs "5" resets to the present
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) * 1024

    for path, call in zip(sys.argv[2::2], sys.argv[3::2]):
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = peak()
        out = eval(call)
        print(peak() - before, tuple(out.shape), flush=True)
        del out
    """
)
THIN_CASES = [
    ((2, 3000), "prepare_image(path, buckets=bucket_sizes(1024)).image", (3, 2048, 512)),  # encode --buckets 1024
    ((1, 20000), "prepare_image(path, buckets=bucket_sizes(256)).image", (3, 512, 128)),  # --buckets 256
    ((1, 20000), "prepare_image(path, buckets=bucket_sizes(256), exact=True).image", (3, 512, 128)),
    ((2, 3000), "load_for_encoding(path, 512)", (3, 512, 512)),  # encode --size 512
    ((2, 3000), "load_for_encoding(path, 512, exact=True)", (3, 512, 512)),  # --size 512 --exact-resize
    ((2, 3000), "pil_to_tensor(Image.open(path), target_size=512)", (3, 512, 512)),
    ((3000, 2), "ImageProcessor(512).preprocess_pil(Image.open(path))[0]", (3, 512, 512)),
]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak RSS through Linux's /proc")
def test_a_thin_image_costs_memory_of_its_output_not_of_its_resize(tmp_path):
    """Before: 2x3000 -> bucket 1024 built 512x768,000 (+1.5 GB), 1x20000 -> bucket 256 128x2,560,000 (+1.4 GB).
    One process measures every case, its peak RSS reset before each (one process per case cost 1.3 s each)."""
    args = [str(_noise(tmp_path / "small.png", 64, 64))]
    for i, (size, call, _) in enumerate(THIN_CASES):
        args += [str(_noise(tmp_path / f"thin{i}.png", *size)), call]
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(THIN_CASES), done.stdout
    for (size, call, shape), line in zip(THIN_CASES, lines, strict=True):
        grown, got = line.split(maxsplit=1)
        assert got.strip() == str(shape), call
        mib = int(grown) / 2**20
        assert mib < 200, f"peak RSS grew by {mib:.0f} MiB for {size[0]}x{size[1]}: {call}"


def _pil_bilinear(src: np.ndarray, resized: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]):
    """An independent float64 model of PIL's antialiased bilinear resize (triangle filter widened by the scale when
    shrinking, sample centres at ``(x + 0.5) * in / out``, weights renormalised at the edges), evaluated only at
    the kept pixels. ``src`` is ``[H, W, 3]``; sizes are ``(height, width)``."""

    def taps(n_in: int, n_out: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        scale = n_in / n_out
        support = max(scale, 1.0)
        centre = (np.arange(first, first + count) + 0.5) * scale
        reach = int(np.ceil(support)) + 1
        index = np.floor(centre).astype(np.int64)[:, None] + np.arange(-reach, reach + 1)[None, :]
        w = np.clip(1 - np.abs((index + 0.5 - centre[:, None]) / support), 0, None)
        w[(index < 0) | (index >= n_in)] = 0
        return np.clip(index, 0, n_in - 1), w / w.sum(axis=1, keepdims=True)

    (rh, rw), (top, left), (th, tw) = resized, crop, target
    iy, wy = taps(src.shape[0], rh, top, th)
    ix, wx = taps(src.shape[1], rw, left, tw)
    rows = (wy[:, :, None, None] * src.astype(np.float64)[iy]).sum(axis=1)  # [th, W, 3]
    return (wx[None, :, :, None] * rows[:, ix]).sum(axis=2)  # [th, tw, 3]


@pytest.mark.parametrize(
    "w, h, area",
    [(2, 3000, 1024), (1, 20000, 256), (3000, 2, 1024), (5, 900, 256), (700, 3, 256)],
)
def test_a_thin_image_has_the_pixels_and_the_crop_of_resize_then_crop(tmp_path, w, h, area):
    """Its conditioning (resized size, crop top/left) is the rule's, and its pixels are the resampled image's: within
    one level of an exact float model of PIL's bilinear filter (PIL rounds to uint8 after each of its two passes)."""
    path = _noise(tmp_path / "thin.png", w, h, seed=w + h)
    buckets = bucket_sizes(area)
    got = prepare_image(path, buckets=buckets)
    assert got.plan == plan_crop(w, h, choose_bucket(w, h, buckets))
    if (w, h, area) == (2, 3000, 1024):  # the numbers: 512 x 768,000, cropped at its middle
        assert got.plan.resized == (768000, 512) and got.plan.crop == ((768000 - 2048) // 2, 0)
    src = np.asarray(Image.open(path).convert("RGB"))
    model = _pil_bilinear(src, got.plan.resized, got.plan.crop, got.plan.target)
    assert np.abs(_levels(got.image) - model).max() <= 1.0 + 1e-9


@pytest.mark.parametrize("w, h", [(2, 3000), (3000, 2), (4, 700), (1000, 30)])
@pytest.mark.parametrize("size", [64, 512])
def test_a_thin_image_at_size_n_has_the_pixels_of_resize_then_crop(w, h, size):
    img = _photo(w, h, seed=w)
    plan = size_plan(w, h, size)
    model = _pil_bilinear(np.asarray(img), plan.resized, plan.crop, plan.target)
    for got in (pil_to_tensor(img, target_size=size), ImageProcessor(size).transform(img)):
        assert got.shape == (3, size, size)
        assert np.abs(_levels(got) - model).max() <= 1.0 + 1e-9


ORDINARY = [(640, 480), (480, 640), (1024, 768), (1920, 1080), (1080, 1920), (300, 200), (333, 777), (800, 200),
            (517, 517), (90, 40)]  # fmt: skip


@pytest.mark.parametrize("w, h", ORDINARY)
@pytest.mark.parametrize("size", [64, 256, 512])
def test_ordinary_images_are_resize_then_crop_bit_for_bit(tmp_path, w, h, size):
    """Up to 4:1 (every photo) nothing changed: pil_to_tensor, ImageProcessor and the readers still give PIL's
    resize followed by the crop, bit for bit (0.1.0's values)."""
    img = _photo(w, h, seed=w * h)
    img.save(tmp_path / "a.png")
    plan = size_plan(w, h, size)
    ref = _resize_then_crop(img, plan.resized, plan.crop, plan.target)
    assert np.array_equal(_levels(pil_to_tensor(img, target_size=size)), ref)
    assert np.array_equal(_levels(ImageProcessor(size).preprocess_pil(img)[0]), ref)
    for exact in (False, True):  # a PNG: the fast reader has no draft to take
        assert np.array_equal(_levels(load_for_encoding(tmp_path / "a.png", size, exact=exact)), ref)


@pytest.mark.parametrize("w, h", ORDINARY)
@pytest.mark.parametrize("area", [128, 512])
def test_ordinary_images_in_buckets_are_resize_then_crop_bit_for_bit(tmp_path, w, h, area):
    path = tmp_path / "a.png"
    _photo(w, h, seed=w + h).save(path)
    for exact in (False, True):
        got = prepare_image(path, buckets=bucket_sizes(area, 32), exact=exact)
        ref = _resize_then_crop(Image.open(path).convert("RGB"), got.plan.resized, got.plan.crop, got.plan.target)
        assert np.array_equal(_levels(got.image), ref)


@pytest.mark.parametrize("w, h", ORDINARY)
@pytest.mark.parametrize("size", [64, 512])
def test_resampling_only_the_kept_region_is_within_one_level_of_resize_then_crop(monkeypatch, w, h, size):
    """The tolerance of the kept-region resample, forced on ordinary images (by default they are resized whole):
    every value within one uint8 level of resize-then-crop, and no shift on average (up to about a fifth of the
    values differ by one: PIL may run its two passes in the other order for the smaller box, which rounds to uint8
    in between elsewhere, and its box coordinates are float32)."""
    monkeypatch.setattr(_pixels, "RESIZE_WHOLE_UP_TO", 0)
    img = _photo(w, h, seed=abs(w - h))
    plan = size_plan(w, h, size)
    ref = _resize_then_crop(img, plan.resized, plan.crop, plan.target)
    got = _levels(pil_to_tensor(img, target_size=size))
    diff = np.abs(got - ref)
    assert diff.max() <= 1 and diff.mean() < 0.35, (diff.max(), diff.mean())


@pytest.mark.parametrize("w, h", [(640, 480), (333, 777), (1200, 500)])
def test_buckets_resampling_only_the_kept_region_is_within_one_level(tmp_path, monkeypatch, w, h):
    monkeypatch.setattr(_pixels, "RESIZE_WHOLE_UP_TO", 0)
    path = tmp_path / "a.png"
    _photo(w, h, seed=3).save(path)
    got = prepare_image(path, buckets=bucket_sizes(256, 32))
    ref = _resize_then_crop(Image.open(path).convert("RGB"), got.plan.resized, got.plan.crop, got.plan.target)
    diff = np.abs(_levels(got.image) - ref)
    assert diff.max() <= 1 and diff.mean() < 0.35, (diff.max(), diff.mean())


# --- 13. 0.1.0 code that reaches a module through the package ------------------------------------------------


def _public_modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "vae_toolkit").glob("*.py") if not p.stem.startswith("_"))


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("name", ["image_utils", "model_config", "vae_loader"])
def test_a_010_module_is_an_attribute_of_the_package_in_a_fresh_process(name):
    done = _python(
        f"import sys, vae_toolkit\nm = vae_toolkit.{name}\n"
        f"assert m is sys.modules['vae_toolkit.{name}'], m\nprint('ok')"
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_every_public_module_is_an_attribute_of_the_package():
    """In one fresh process: each module's attribute is dropped before it is asked for, so that every name goes
    through the package's lazy lookup (a module imported by another one would otherwise already be there)."""
    names = _public_modules()
    assert {"image_utils", "model_config", "vae_loader", "latents", "buckets", "dataset"} <= set(names)
    done = _python(
        textwrap.dedent(
            f"""
            import importlib, sys
            import vae_toolkit
            assert 'torch' not in sys.modules, 'import vae_toolkit imported torch'
            listed = dir(vae_toolkit)
            assert 'torch' not in sys.modules, 'dir(vae_toolkit) imported torch'
            missing = [n for n in {names!r} if n not in listed]
            assert not missing, f'dir() does not list {{missing}}'
            for name in {names!r}:
                vars(vae_toolkit).pop(name, None)
                module = getattr(vae_toolkit, name)
                assert module is sys.modules['vae_toolkit.' + name], (name, module)
            print('ok')
            """
        )
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_unknown_and_private_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_module'"):
        vae_toolkit.no_such_module  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute '_nothing'"):
        vae_toolkit._nothing  # noqa: B018


# --- bucket options without --buckets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, flag",
    [
        (["--bucket-step", "32"], "--bucket-step"),
        (["--max-aspect", "2"], "--max-aspect"),
        (["--max-aspect=2"], "--max-aspect"),
        (["--bucket-s", "32"], "--bucket-step"),  # argparse's abbreviation
        (["--bucket-step", "64"], "--bucket-step"),  # the default value, still given for nothing
    ],
)
@pytest.mark.parametrize("shape", [[], ["--size", "64"]])
def test_bucket_options_without_buckets_are_refused(capsys, tmp_path, monkeypatch, option, flag, shape):
    ran = []
    monkeypatch.setattr(_commands, "encode_command", lambda args: ran.append(args) or 0)
    out = tmp_path / "store"
    status = cli.main(["encode", str(tmp_path), "-o", str(out), "--model", "sd14", *shape, *option])
    err = capsys.readouterr().err
    assert status == 2 and not ran and not out.exists()
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(rf"encode: error: {flag} needs --buckets\b", err), err


def test_bucket_options_with_buckets_are_taken(capsys, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(_commands, "encode_command", lambda args: ran.append(args) or 0)
    argv = ["encode", str(tmp_path), "-o", str(tmp_path / "s"), "--model", "sd14", "--buckets", "256"]
    assert cli.main([*argv, "--bucket-step", "32", "--max-aspect", "2"]) == 0
    assert cli.main(argv) == 0
    assert [(a.bucket_step, a.max_aspect) for a in ran] == [(32, 2.0), (64, 4.0)]
    assert capsys.readouterr().err == ""


# --- the summary of a --size run -----------------------------------------------------------------------------


def test_a_size_run_does_not_speak_of_buckets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        _noise(src / f"small{i}.png", 16, 16, seed=i)
    _noise(src / "large.png", 48, 40)
    summary = vae_toolkit.encode_dataset(make_tiny_vae(), src, tmp_path / "out", size=32, progress=False, workers=1)
    text = str(summary)
    assert summary.upscaled == 2
    assert "bucket" not in text and re.search(r"2 smaller than (--)?size 32, scaled up", text), text
