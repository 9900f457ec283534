"""EXIF orientation: ``load_for_encoding`` (``encode``, ``evaluate``) shows images as viewers do; the store records
it; ``open_image`` and ``load_and_preprocess_image`` keep 0.1.0's pixels as stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image, ImageOps

from vae_toolkit import latents, load_and_preprocess_image, load_for_encoding, open_image, pil_to_tensor, store_files
from vae_toolkit.dataset import INDEX_NAME, LatentStore, StoreMismatchError, encode_dataset
from vae_toolkit.image_utils import center_crop_to_multiple


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, asymmetric picture (a misplaced crop or a wrong turn shows), with some noise."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 7 + y / 11)], axis=-1)
    rgb += np.random.default_rng(seed).normal(0, 4, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def save_with_orientation(img: Image.Image, path, orientation: int, **kwargs):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, **kwargs)
    return path


def shown(path) -> Image.Image:
    """What a viewer shows: PIL's own exif_transpose of the decoded file."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img.convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_load_for_encoding_turns_images_as_viewers_do(tmp_path, orientation, fmt):
    path = save_with_orientation(photo(40, 24), tmp_path / f"p.{fmt}", orientation)
    expected = shown(path)
    assert expected.size == ((24, 40) if orientation >= 5 else (40, 24))
    assert torch.equal(load_for_encoding(path), pil_to_tensor(center_crop_to_multiple(expected, 8)))
    assert torch.equal(load_for_encoding(path, 16, exact=True), pil_to_tensor(expected, target_size=16))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_fast_reader_turns_the_reduced_decode_the_same_way(tmp_path, orientation):
    """A JPEG decoded at 1/4 scale, then turned: the turned output of the same picture stored upright."""
    upright = save_with_orientation(photo(256, 128), tmp_path / "upright.jpg", 1, quality=95)
    with Image.open(upright) as img:
        pixels = img.convert("RGB")
    turned = tmp_path / "turned.jpg"
    # the pixels stored so that the orientation tag turns them back into the upright picture
    inverse = {1: None, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}[orientation]
    from vae_toolkit._orientation import transpose_method

    method = transpose_method(inverse) if inverse else None
    stored = pixels.transpose(method) if method is not None else pixels
    save_with_orientation(stored, turned, orientation, quality=100, subsampling=0)
    fast, exact = load_for_encoding(turned, 32), load_for_encoding(turned, 32, exact=True)
    assert fast.shape == exact.shape == (3, 32, 32)
    assert (fast - exact).abs().mean().item() < 0.02  # the fast reader's usual closeness
    assert (fast - load_for_encoding(upright, 32)).abs().mean().item() < 0.02  # the same picture, the same way up


def test_open_image_and_load_and_preprocess_image_keep_the_stored_pixels(tmp_path):
    path = save_with_orientation(photo(16, 8), tmp_path / "p.png", 6)
    assert open_image(path).size == (16, 8)
    with pytest.raises(Exception, match=r"\(16, 8\)"):
        load_and_preprocess_image(path, 16)
    square = save_with_orientation(photo(16, 16), tmp_path / "s.png", 6)
    x, _ = load_and_preprocess_image(square, 16)
    assert torch.equal(x[0], pil_to_tensor(Image.open(square)))  # as stored, not turned


def test_a_phone_portrait_is_stored_as_shown(tmp_path):
    vae = make_tiny_vae()
    src = tmp_path / "src"
    src.mkdir()
    path = save_with_orientation(photo(64, 40), src / "portrait.jpg", 6)  # stored 64x40, shown 40x64
    Image.new("RGB", (16, 16), "red").save(src / "plain.png")
    out = tmp_path / "out"
    encode_dataset(vae, src, out, progress=False)
    with LatentStore(out) as store:
        assert store.metadata["exif_orientation"] == "applied"
        assert store.entry("portrait.jpg")["size"] == [40, 64]
        with torch.no_grad():
            expected = latents.encode(vae, pil_to_tensor(center_crop_to_multiple(shown(path), 8)), tile=False)
        assert store["portrait.jpg"].shape == expected.shape == (4, 32, 20)
        assert (store["portrait.jpg"] - expected).abs().max().item() <= 1e-5


def test_a_store_written_before_orientation_was_applied_is_not_mixed(tmp_path):
    vae = make_tiny_vae()
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (16, 16), "red").save(src / "a.png")
    out = tmp_path / "out"
    encode_dataset(vae, src, out, progress=False)
    import json

    index = json.loads((out / INDEX_NAME).read_text())
    del index["metadata"]["exif_orientation"]  # as written before: images were encoded as stored
    store_files.write_index(out, index)
    save_with_orientation(photo(24, 16), src / "b.jpg", 6)
    with pytest.raises(StoreMismatchError, match="exif_orientation: stored 'ignored', requested 'applied'"):
        encode_dataset(vae, src, out, progress=False)
    summary = encode_dataset(vae, src, out, overwrite=True, progress=False)
    assert summary.encoded == 2
    with LatentStore(out) as store:
        assert store.metadata["exif_orientation"] == "applied" and store.entry("b.jpg")["size"] == [16, 24]
