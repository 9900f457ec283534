"""``--model FOLDER`` and ``load_sd_vae(FOLDER)``: a local folder holding a diffusers AutoencoderKL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_tiny_vae
from PIL import Image

from vae_toolkit import VAELoader
from vae_toolkit import __main__ as cli
from vae_toolkit.dataset import INDEX_NAME
from vae_toolkit.vae_loader import local_model_config


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "my-vae"
    make_tiny_vae().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A whole pipeline's folder: the VAE in vae/."""
    folder = tmp_path_factory.mktemp("models") / "pipeline"
    make_tiny_vae().save_pretrained(folder / "vae", safe_serialization=True)
    return folder


def _image(path, w=24, h=16, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_local_model_config_of_a_folder(vae_folder, pipeline_folder, tmp_path):
    assert local_model_config(vae_folder) == {
        "repo_id": str(vae_folder.resolve()),
        "subfolder": None,
        "description": "local folder",
    }
    assert local_model_config(str(pipeline_folder))["subfolder"] == "vae"
    assert local_model_config(tmp_path) is None  # no config.json
    assert local_model_config(tmp_path / "missing") is None
    assert local_model_config("sd14") is None  # a registered name is not a folder


def test_a_registered_name_wins_over_a_folder_of_that_name(vae_folder, monkeypatch):
    monkeypatch.chdir(vae_folder.parent)
    (vae_folder.parent / "sd14").mkdir(exist_ok=True)
    (vae_folder.parent / "sd14" / "config.json").write_text("{}")
    assert local_model_config("sd14") is None


def test_load_sd_vae_of_a_folder_caches_it_by_resolved_path(vae_folder, monkeypatch):
    loader = VAELoader()
    vae, device = loader.load_sd_vae(str(vae_folder), "cpu")
    assert str(device) == "cpu" and vae.config.latent_channels == 4
    monkeypatch.chdir(vae_folder.parent)
    again, _ = loader.load_sd_vae("./my-vae/", "cpu")
    assert again is vae


def test_roundtrip_with_a_folder(capsys, vae_folder, pipeline_folder, tmp_path):
    src = _image(tmp_path / "in.png")
    for i, folder in enumerate((vae_folder, pipeline_folder)):
        out = tmp_path / f"rec{i}.png"
        assert cli.main(["roundtrip", str(src), "--model", str(folder), "--device", "cpu", "-o", str(out)]) == 0
        assert out.is_file()
        assert f"model {folder} on cpu" in capsys.readouterr().out


def test_encode_records_the_resolved_folder_and_decode_reuses_it(capsys, vae_folder, tmp_path, monkeypatch):
    _image(tmp_path / "src" / "a.png")
    _image(tmp_path / "src" / "b" / "c.png", seed=1)
    monkeypatch.chdir(vae_folder.parent)
    argv = ["encode", str(tmp_path / "src"), "-o", str(tmp_path / "store"), "--model", "my-vae", "--no-progress"]
    assert cli.main(argv) == 0
    metadata = json.loads((tmp_path / "store" / INDEX_NAME).read_text())["metadata"]
    assert metadata["model"] == str(vae_folder.resolve())
    # the same folder written differently resumes the store (nothing refused, nothing encoded again)
    argv[argv.index("my-vae")] = str(vae_folder) + "/"
    assert cli.main(argv) == 0
    assert "0 encoded, 2 already stored" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # decode finds the model by the path the store records
    assert cli.main(["decode", str(tmp_path / "store"), "-o", str(tmp_path / "png"), "--no-progress"]) == 0
    assert sorted(p.relative_to(tmp_path / "png").as_posix() for p in (tmp_path / "png").rglob("*.png")) == [
        "a.png",
        "b/c.png",
    ]


@pytest.mark.parametrize("command", ["roundtrip", "encode", "decode"])
def test_a_folder_without_a_model_is_a_usage_error(capsys, tmp_path, command):
    (tmp_path / "empty").mkdir()
    argv = {
        "roundtrip": ["roundtrip", "x.png"],
        "encode": ["encode", "src", "-o", "out"],
        "decode": ["decode", "out", "-o", "png"],
    }[command]
    assert cli.main([*argv, "--model", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"invalid model '{tmp_path / 'empty'}'" in err and "has no config.json" in err
