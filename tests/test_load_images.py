"""load_images: the batch equals the one-by-one load_and_preprocess_image path, in order, with its errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae_toolkit import ImageProcessingError, load_and_preprocess_image, load_images

SIZE = 32


def _write(path: Path, seed: int, mode: str = "RGB", size: int = SIZE) -> Path:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    img.convert(mode).save(path)
    return path


@pytest.fixture
def paths(tmp_path: Path) -> list[Path]:
    """Distinct images in several formats and modes (all converted to RGB on load)."""
    files = [_write(tmp_path / f"img{i}.png", i) for i in range(5)]
    files.append(_write(tmp_path / "photo.jpg", 10))
    files.append(_write(tmp_path / "gray.png", 11, "L"))
    files.append(_write(tmp_path / "alpha.png", 12, "RGBA"))
    files.append(_write(tmp_path / "palette.png", 13, "P"))
    return files


@pytest.mark.parametrize("num_workers", [None, 1, 2, 4, 64])
def test_values_and_order_equal_one_by_one(paths: list[Path], num_workers: int | None) -> None:
    batch = load_images(paths, target_size=SIZE, num_workers=num_workers)
    expected = torch.cat([load_and_preprocess_image(p, target_size=SIZE)[0] for p in paths])
    assert torch.equal(batch, expected)
    for i in range(1, len(paths)):  # the images differ, so equality also checks the order
        assert not torch.equal(batch[i], batch[i - 1])


@pytest.mark.parametrize("num_workers", [1, 2])
def test_shape_dtype_contiguous(paths: list[Path], num_workers: int) -> None:
    batch = load_images(paths, target_size=SIZE, num_workers=num_workers)
    assert batch.shape == (len(paths), 3, SIZE, SIZE)
    assert batch.dtype == torch.float32
    assert batch.is_contiguous()
    assert batch.min() >= -1 and batch.max() <= 1


def test_one_worker_and_many_agree(paths: list[Path]) -> None:
    assert torch.equal(load_images(paths, SIZE, num_workers=1), load_images(paths, SIZE, num_workers=3))


@pytest.mark.parametrize("container", [tuple, iter, lambda ps: [str(p) for p in ps]])
def test_accepts_any_iterable_of_paths(paths: list[Path], container) -> None:
    expected = load_images(paths, SIZE)
    assert torch.equal(load_images(container(paths), SIZE), expected)


@pytest.mark.parametrize("target_size", [SIZE, 512])
def test_empty_list(target_size: int) -> None:
    batch = load_images([], target_size=target_size)
    assert batch.shape == (0, 3, target_size, target_size)
    assert batch.dtype == torch.float32


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "does_not_exist.png"


def _corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image")
    return path


def _truncated(tmp_path: Path) -> Path:
    good = _write(tmp_path / "full.png", 99)
    path = tmp_path / "truncated.png"
    path.write_bytes(good.read_bytes()[:200])
    return path


def _wrong_size(tmp_path: Path) -> Path:
    return _write(tmp_path / "small.png", 98, size=SIZE // 2)


@pytest.mark.parametrize("make_bad", [_missing, _corrupt, _truncated, _wrong_size])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_bad_file_in_the_middle_is_named(paths: list[Path], tmp_path: Path, make_bad, num_workers: int) -> None:
    bad = make_bad(tmp_path)
    mixed = [*paths[:3], bad, *paths[3:]]
    with pytest.raises(ImageProcessingError, match=re.escape(str(bad))):
        load_images(mixed, target_size=SIZE, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [1, 3])
def test_first_failing_path_in_order_is_reported(paths: list[Path], tmp_path: Path, num_workers: int) -> None:
    first, second = _corrupt(tmp_path), _missing(tmp_path)
    with pytest.raises(ImageProcessingError, match=re.escape(str(first))):
        load_images([paths[0], first, paths[1], second], target_size=SIZE, num_workers=num_workers)


def test_wrong_target_size_raises(paths: list[Path]) -> None:
    with pytest.raises(ImageProcessingError, match="does not match required size"):
        load_images(paths, target_size=SIZE * 2)


@pytest.mark.parametrize("num_workers", [0, -1])
def test_num_workers_below_one(paths: list[Path], num_workers: int) -> None:
    with pytest.raises(ValueError, match="num_workers"):
        load_images(paths, target_size=SIZE, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [1.5, "2", True])
def test_num_workers_not_an_int(paths: list[Path], num_workers) -> None:
    with pytest.raises(TypeError, match="num_workers"):
        load_images(paths, target_size=SIZE, num_workers=num_workers)


@pytest.mark.parametrize("as_type", [str, Path])
def test_single_path_is_a_type_error(paths: list[Path], as_type) -> None:
    with pytest.raises(TypeError, match="single path"):
        load_images(as_type(paths[0]), target_size=SIZE)
