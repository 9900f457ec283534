"""A folder that holds another diffusers model than the supported autoencoders (or no weights) is refused before any
image is read, and ``encode`` never stores a NaN or infinite latent. (That every supported class loads:
test_loader_classes.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image
from test_dataset import write_images

from vae_toolkit import VAELoader
from vae_toolkit import __main__ as cli
from vae_toolkit.dataset import LatentStore, encode_dataset
from vae_toolkit.vae_loader import VAELoadError


def tiny_unet(folder):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        layers_per_block=1,
    ).save_pretrained(folder, safe_serialization=True)


OTHER_MODELS = {"UNet2DModel": tiny_unet}  # an AutoencoderTiny was refused until it became a supported class
REFUSED = "expected one of the diffusers autoencoder classes vae-toolkit loads (AutoencoderKL, AutoencoderKLFlux2, "


@pytest.fixture(scope="module", params=list(OTHER_MODELS))
def other_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / request.param
    OTHER_MODELS[request.param](folder)
    return request.param, folder


def test_another_diffusers_model_is_refused_by_the_loader(other_model):
    name, folder = other_model
    with pytest.raises(VAELoadError, match=rf"holds a diffusers {name} .*{re.escape(REFUSED)}"):
        VAELoader().load_sd_vae(str(folder), "cpu")


@pytest.mark.parametrize("command", ["encode", "evaluate"])
def test_another_diffusers_model_is_a_usage_error_before_any_image_is_read(other_model, command, tmp_path, capsys,
                                                                           monkeypatch):  # fmt: skip
    name, folder = other_model
    src = tmp_path / "src"
    write_images(src, n=2)
    read = []
    monkeypatch.setattr("vae_toolkit.batching.load_for_encoding", lambda *a, **k: read.append(a))
    out = tmp_path / "out"
    code = cli.main([command, str(src), "-o", str(out), "--model", str(folder), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"holds a diffusers {name}" in err and REFUSED in " ".join(err.split())
    assert not read and not out.exists()  # nothing read, nothing stored


def test_an_autoencoder_kl_with_missing_weights_is_refused(tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "vae"
    make_tiny_vae().save_pretrained(folder, safe_serialization=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    tensors["not.a.vae.weight"] = torch.zeros(2)
    save_file(tensors, weights)
    expected = rf"missing 1 weight\(s\) \({dropped}\).*1 unexpected \(not\.a\.vae\.weight\)"
    capfd.readouterr()
    with pytest.raises(VAELoadError, match=expected):
        VAELoader().load_sd_vae(str(folder), "cpu")
    out, err = capfd.readouterr()
    assert out == "" and "Some weights of" not in err  # diffusers' own lines say less than the error


def test_a_pickle_only_folder_prints_no_diffusers_line(tmp_path, capfd, registry):
    from vae_toolkit import add_model_config

    make_tiny_vae().save_pretrained(tmp_path / "vae", safe_serialization=False)
    add_model_config("pickled", {"repo_id": str(tmp_path / "vae"), "subfolder": None})
    capfd.readouterr()
    with pytest.raises(VAELoadError, match="no diffusion_pytorch_model.safetensors found"):
        VAELoader().load_sd_vae("pickled", "cpu")
    out, err = capfd.readouterr()
    assert out == "" and "An error occurred" not in err


def test_a_config_only_folder_is_a_clean_error_with_nothing_on_stdout(tmp_path, capfd):
    folder = tmp_path / "vae"
    make_tiny_vae().save_config(folder)
    capfd.readouterr()
    with pytest.raises(VAELoadError, match="no weights.*diffusion_pytorch_model.safetensors"):
        VAELoader().load_sd_vae(str(folder), "cpu")
    out, err = capfd.readouterr()
    assert out == "" and "An error occurred" not in err


def test_a_config_only_folder_is_a_usage_error_of_the_command(tmp_path, capfd):
    folder = tmp_path / "vae"
    make_tiny_vae().save_config(folder)
    src = tmp_path / "src"
    write_images(src, n=2)
    capfd.readouterr()
    assert cli.main(["encode", str(src), "-o", str(tmp_path / "out"), "--model", str(folder)]) == 2
    out, err = capfd.readouterr()
    assert out == "" and "no weights" in err and "An error occurred" not in err


class _NaNForBlackImages:
    """Wraps ``vae.encode``: the latent of an all-black image becomes NaN (a float16 overflow, say)."""

    def __init__(self, vae, value):
        self.encode_, self.value = vae.encode, value

    def __call__(self, x):
        out = self.encode_(x)
        black = (x == -1).flatten(1).all(dim=1)
        out.latent_dist.mean[black] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_or_infinite_latent_is_a_failure_never_stored(tmp_path, value):
    vae = make_tiny_vae()
    vae.encode = _NaNForBlackImages(vae, value)
    src = tmp_path / "src"
    keys = write_images(src, n=4)
    Image.new("RGB", (16, 16), "black").save(src / "part0" / "black.png")
    out = tmp_path / "out"
    summary = encode_dataset(vae, src, out, batch_size=8, progress=False)
    assert summary.encoded == 4 and list(summary.failed) == ["part0/black.png"]
    reason = summary.failed["part0/black.png"]
    assert "NaN or infinite" in reason and "float32" in reason
    with LatentStore(out) as store:
        assert sorted(store) == keys and "part0/black.png" in store.failures
        assert all(torch.isfinite(store[k]).all() for k in store)
    assert json.loads((out / "latents.safetensors.index.json").read_text())["failures"]["part0/black.png"] == reason


def test_another_diffusers_model_in_the_hub_cache_is_refused_with_its_class(hf_home, registry):
    from conftest import REVISION

    from vae_toolkit import add_model_config
    from vae_toolkit.vae_loader import weights_fingerprint

    repo = hf_home / "hub" / "models--org--unet"
    tiny_unet(repo / "snapshots" / REVISION / "vae")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    add_model_config("unet", {"repo_id": "org/unet", "subfolder": "vae"})
    with pytest.raises(VAELoadError, match=rf"holds a diffusers UNet2DModel .*{re.escape(REFUSED)}"):
        VAELoader().load_sd_vae("unet", "cpu")
    assert weights_fingerprint("unet") == {"repo_id": "org/unet", "revision": REVISION}
    assert weights_fingerprint("not-registered-nor-a-folder") is None
