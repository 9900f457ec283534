"""encode never tiles unless asked: a stored latent is the whole image's, as training scripts cache them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

from vae_toolkit import latents, load_for_encoding
from vae_toolkit.dataset import LatentStore, StoreMismatchError, encode_dataset


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae(sample_size=32)  # images larger than 32 px were tiled by default


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 64), (48, 80)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.mark.parametrize("tile", [False, True])
def test_a_stored_latent_is_the_untiled_encode_unless_tile_is_asked(vae, photos, tmp_path, tile):
    kwargs = {"tile": True} if tile else {}
    encode_dataset(vae, photos, tmp_path / "s", progress=False, workers=1, **kwargs)
    with LatentStore(tmp_path / "s") as store, torch.no_grad():
        assert store.metadata["tile"] is tile
        for key in store:
            x = load_for_encoding(photos / key).unsqueeze(0)
            want = latents.encode(vae, x, tile=tile)[0]
            other = latents.encode(vae, x, tile=not tile)[0]
            assert (store[key] - want).abs().max().item() <= 1e-5
            assert (store[key] - other).abs().max().item() > 1e-3  # tiling changes the latent here


def test_a_store_of_the_other_tiling_is_refused(vae, photos, tmp_path):
    encode_dataset(vae, photos, tmp_path / "s", progress=False, workers=1)
    with pytest.raises(StoreMismatchError, match="tile: stored False, requested True"):
        encode_dataset(vae, photos, tmp_path / "s", progress=False, workers=1, tile=True)


def test_tile_must_be_a_bool(vae, photos, tmp_path):
    with pytest.raises(TypeError, match="tile must be True or False, got None"):
        encode_dataset(vae, photos, tmp_path / "s", progress=False, tile=None)
