"""Every supported diffusers autoencoder class loads through ``VAELoader`` (by short name from the hub cache, and by
folder), with the weights check, the cache, dtype, devices and ``weights_fingerprint``; another class is refused by
name before anything loads; the registry names the field's VAEs, and the gated ones say so, also when a load fails.

Each class is a tiny random model saved with ``save_pretrained`` (no network): into the offline hub cache of
``conftest`` (``models--ORG--NAME/snapshots/REV/vae``, ``refs/main``) and into plain folders.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REVISION

from vae_toolkit import VAELoader, add_model_config
from vae_toolkit.latent_formats import SUPPORTED_CLASSES
from vae_toolkit.model_config import ACCEPTED_CONFIG_KEYS, MODEL_CONFIGS, get_model_config
from vae_toolkit.vae_loader import VAELoadError, check_local_model, local_model_config, weights_fingerprint

# The smallest constructor arguments of each class that build a working model (encode/decode run on 16x16).
_KL = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=32,
)
_VIDEO = dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
TINY: dict[str, dict] = {
    "AutoencoderKL": _KL,
    "AutoencoderKLFlux2": _KL,
    "AutoencoderKLQwenImage": dict(_VIDEO, latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
    "AutoencoderKLWan": dict(_VIDEO, latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_spatial=2),
    "AutoencoderDC": dict(
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        scaling_factor=0.41407,
    ),
    "AutoencoderTiny": dict(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ),
    "AutoencoderKLHunyuanImage": dict(  # its GroupNorms have 32 groups: 32 channels at least
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32),
        layers_per_block=1,
        spatial_compression_ratio=2,
        sample_size=16,
        scaling_factor=0.75289,
    ),
}
CLASSES = list(SUPPORTED_CLASSES)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_the_tiny_models_cover_every_supported_class():
    assert set(TINY) == set(SUPPORTED_CLASSES) and len(SUPPORTED_CLASSES) >= 7


def save_tiny(class_name: str, folder: Path) -> Path:
    import diffusers

    torch.manual_seed(0)
    getattr(diffusers, class_name)(**TINY[class_name]).save_pretrained(folder, safe_serialization=True)
    return folder


def save_in_hub_cache(hf_home: Path, repo_id: str, save, subfolder: str | None = "vae") -> Path:
    """``save(folder)`` into the hub-cache layout of ``repo_id`` (snapshot ``REVISION``, ``refs/main``)."""
    org, name = repo_id.split("/")
    repo = hf_home / "hub" / f"models--{org}--{name}"
    snapshot = repo / "snapshots" / REVISION
    save(snapshot / subfolder if subfolder else snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def hub_repo(class_name: str) -> str:
    return f"tiny-vaes/{class_name.lower()}"


@pytest.fixture(scope="module")
def hub(hf_home):
    """Every class in the offline hub cache, as ``tiny-vaes/<class>`` (``vae/`` subfolder)."""
    for name in CLASSES:
        save_in_hub_cache(hf_home, hub_repo(name), lambda folder, name=name: save_tiny(name, folder))
    return hf_home


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Every class saved in a plain folder (``save_pretrained``)."""
    root = tmp_path_factory.mktemp("classes")
    return {name: save_tiny(name, root / name) for name in CLASSES}


def _class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _float_dtypes(vae) -> set[torch.dtype]:
    return {t.dtype for t in vae.state_dict().values() if t.is_floating_point()}


@pytest.mark.parametrize("with_class_name", [True, False], ids=["registered-class", "class-from-config"])
@pytest.mark.parametrize("class_name", CLASSES)
def test_each_class_loads_by_short_name_from_the_hub_cache(hub, registry, loads, class_name, with_class_name):
    entry = {"repo_id": hub_repo(class_name), "subfolder": "vae"}
    add_model_config("tiny", {**entry, "class_name": class_name} if with_class_name else entry)
    loader = VAELoader()
    vae, device = loader.load_sd_vae("tiny", "cpu")
    assert type(vae) is _class(class_name)  # an AutoencoderKL exactly, as in 0.1.0, for the SD VAEs
    assert device == torch.device("cpu") and vae.device == device
    assert _float_dtypes(vae) == {torch.float32}
    again, _ = loader.load_sd_vae("tiny", "cpu")
    assert again is vae  # the cache
    assert loads == [class_name]  # loaded once, as its class from the start
    assert weights_fingerprint("tiny") == {"repo_id": hub_repo(class_name), "revision": REVISION}


@pytest.mark.parametrize("class_name", CLASSES)
def test_each_class_loads_from_a_folder_in_the_dtype_asked_for(folders, class_name):
    loader = VAELoader()
    vae, device = loader.load_sd_vae(str(folders[class_name]), "cpu", dtype=torch.float16)
    assert type(vae) is _class(class_name) and vae.device == device == torch.device("cpu")
    assert _float_dtypes(vae) == {torch.float16}
    assert loader.load_sd_vae(str(folders[class_name]), "cpu", dtype=torch.float16)[0] is vae
    assert loader.load_sd_vae(str(folders[class_name]), "cpu")[0] is not vae  # another dtype, another entry
    files = weights_fingerprint(folders[class_name])["files"]
    assert set(files) == {"config.json", WEIGHTS} and all(len(f["sha256"]) == 64 for f in files.values())


@pytest.mark.parametrize("class_name", CLASSES)
def test_a_pipeline_folder_loads_its_vae_subfolder(tmp_path, class_name):
    save_tiny(class_name, tmp_path / "pipeline" / "vae")
    assert local_model_config(tmp_path / "pipeline")["subfolder"] == "vae"
    vae, _ = VAELoader.load_sd_vae_simple(str(tmp_path / "pipeline"), "cpu")
    assert type(vae) is _class(class_name)


@pytest.mark.gpu
@pytest.mark.parametrize("class_name", CLASSES)
def test_each_class_loads_on_the_gpu(folders, class_name):
    vae, device = VAELoader().load_sd_vae(str(folders[class_name]), "cuda:0", dtype=torch.bfloat16)
    assert device == torch.device("cuda:0") and vae.device == device
    assert _float_dtypes(vae) == {torch.bfloat16}


@pytest.mark.parametrize("class_name", CLASSES)
def test_weights_missing_a_tensor_or_holding_another_are_refused_with_their_names(folders, tmp_path, class_name):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / class_name
    shutil.copytree(folders[class_name], folder)
    tensors = load_file(folder / WEIGHTS)
    dropped = sorted(k for k in tensors if k.endswith(".weight"))[0]
    del tensors[dropped]
    tensors["not.a.vae.weight"] = torch.zeros(2)
    save_file(tensors, folder / WEIGHTS)
    expected = (
        rf"weights do not fit a diffusers {class_name} of its config\.json: missing 1 weight\(s\) "
        rf"\({dropped}\); 1 unexpected \(not\.a\.vae\.weight\)"
    )
    with pytest.raises(VAELoadError, match=expected):
        VAELoader().load_sd_vae(str(folder), "cpu")


@pytest.mark.parametrize("class_name", CLASSES)
def test_weights_of_another_shape_are_refused(folders, tmp_path, class_name):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / class_name
    shutil.copytree(folders[class_name], folder)
    tensors = load_file(folder / WEIGHTS)
    reshaped = sorted(k for k in tensors if k.endswith(".bias"))[0]
    tensors[reshaped] = torch.zeros(tensors[reshaped].numel() + 1)
    save_file(tensors, folder / WEIGHTS)
    expected = (
        rf"weights do not fit the model its config\.json describes: 1 of another shape \({re.escape(reshaped)}\)"
    )
    with pytest.raises(VAELoadError, match=expected):
        VAELoader().load_sd_vae(str(folder), "cpu")


# --- another class: refused by name, before anything loads ----------------------------------------------------


def save_unet(folder: Path) -> Path:
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
    return folder


@pytest.fixture
def loads(monkeypatch):
    """The diffusers classes the loader asks for, in order (it still loads them)."""
    from vae_toolkit import vae_loader

    asked: list[str] = []
    real = vae_loader._diffusers_class

    def spy(name):
        asked.append(name)
        return real(name)

    monkeypatch.setattr(vae_loader, "_diffusers_class", spy)
    return asked


def _names_the_supported_classes(message: str) -> bool:
    return all(name in message for name in SUPPORTED_CLASSES)


def test_a_unet_folder_is_refused_by_name_with_the_supported_classes_before_anything_loads(tmp_path, loads):
    folder = save_unet(tmp_path / "unet")
    with pytest.raises(VAELoadError, match=r"holds a diffusers UNet2DModel \(config\.json _class_name\)") as caught:
        VAELoader().load_sd_vae(str(folder), "cpu")
    assert _names_the_supported_classes(str(caught.value))
    assert loads == []
    with pytest.raises(VAELoadError, match="holds a diffusers UNet2DModel") as caught:
        check_local_model(local_model_config(folder))
    assert _names_the_supported_classes(str(caught.value))


def test_a_unet_in_the_hub_cache_is_refused_by_name_before_anything_loads(hf_home, registry, loads):
    save_in_hub_cache(hf_home, "tiny-vaes/unet", save_unet)
    add_model_config("unet", {"repo_id": "tiny-vaes/unet", "subfolder": "vae", "class_name": "AutoencoderKL"})
    with pytest.raises(VAELoadError, match="holds a diffusers UNet2DModel") as caught:
        VAELoader().load_sd_vae("unet", "cpu")
    assert _names_the_supported_classes(str(caught.value)) and loads == []


def test_a_hub_model_whose_class_is_known_only_once_downloaded_is_loaded_as_that_class(hub, registry, loads,
                                                                                        monkeypatch):  # fmt: skip
    """A registered repo without ``class_name``, not in the cache before the load (as on a first download): the
    first try guesses AutoencoderKL, the downloaded config.json names the class, the second try loads it."""
    from vae_toolkit import vae_loader

    real, calls = vae_loader._model_config_json, []

    def not_cached_before_the_first_try(*args):
        calls.append(args)
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(vae_loader, "_model_config_json", not_cached_before_the_first_try)
    add_model_config("wan-tiny", {"repo_id": hub_repo("AutoencoderKLWan"), "subfolder": "vae"})
    vae, _ = VAELoader().load_sd_vae("wan-tiny", "cpu")
    assert type(vae) is _class("AutoencoderKLWan")
    assert loads == ["AutoencoderKL", "AutoencoderKLWan"]


def test_the_config_json_class_wins_over_a_wrong_registered_class(hub, registry, loads, caplog):
    add_model_config("mislabelled", {"repo_id": hub_repo("AutoencoderTiny"), "subfolder": "vae",
                                     "class_name": "AutoencoderKL"})  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="vae_toolkit.vae_loader"):
        vae, _ = VAELoader().load_sd_vae("mislabelled", "cpu")
    assert type(vae) is _class("AutoencoderTiny") and loads == ["AutoencoderTiny"]  # no wrong first try
    assert (
        "registered as a diffusers AutoencoderKL" in caplog.text and "holds a diffusers AutoencoderTiny" in caplog.text
    )


def test_an_unsupported_registered_class_is_refused_with_the_supported_ones(hf_home, registry, loads):
    MODEL_CONFIGS["bogus"] = {"repo_id": "tiny-vaes/not-in-the-cache", "subfolder": "vae", "class_name": "VQModel"}
    with pytest.raises(VAELoadError, match=r"names class_name 'VQModel'") as caught:
        VAELoader().load_sd_vae("bogus", "cpu")
    assert _names_the_supported_classes(str(caught.value)) and loads == []


# --- the registry ---------------------------------------------------------------------------------------------

# The latent channels each class's published VAEs have (latent_channels, or z_dim for Wan and Qwen-Image).
CHANNELS = {
    "AutoencoderKL": {4, 16},
    "AutoencoderKLFlux2": {32},
    "AutoencoderKLQwenImage": {16},
    "AutoencoderKLWan": {16, 48},
    "AutoencoderDC": {32},
    "AutoencoderTiny": {4, 16},
    "AutoencoderKLHunyuanImage": {64},
}
# The classes whose pipelines normalise latents otherwise than with one scale (and shift).
NOT_SCALAR = {"AutoencoderKLFlux2", "AutoencoderKLQwenImage", "AutoencoderKLWan"}

# name -> (repo_id, subfolder, class, latent_channels, scaling_factor, shift_factor, gated), as published
# (each repo's vae/config.json, or config.json for the repos that hold only the VAE).
FIELD = {
    "sd35": ("stabilityai/stable-diffusion-3.5-large", "vae", "AutoencoderKL", 16, 1.5305, 0.0609, True),
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "vae", "AutoencoderKL", 16, 0.3611, 0.1159, True),
    "flux2-dev": ("black-forest-labs/FLUX.2-dev", "vae", "AutoencoderKLFlux2", 32, None, None, True),
    "flux2-klein": ("black-forest-labs/FLUX.2-klein-4B", "vae", "AutoencoderKLFlux2", 32, None, None, False),
    "flux2-klein-9b": ("black-forest-labs/FLUX.2-klein-9B", "vae", "AutoencoderKLFlux2", 32, None, None, True),
    "qwen-image": ("Qwen/Qwen-Image", "vae", "AutoencoderKLQwenImage", 16, None, None, False),
    "wan21": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae", "AutoencoderKLWan", 16, None, None, False),
    "wan22": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae", "AutoencoderKLWan", 48, None, None, False),
    "sana-dc-ae": ("mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", None, "AutoencoderDC", 32, 0.41407, None, False),
    "hunyuanimage-2.1": (
        "hunyuanvideo-community/HunyuanImage-2.1-Diffusers",
        "vae",
        "AutoencoderKLHunyuanImage",
        64,
        0.75289,
        None,
        False,
    ),  # fmt: skip
    "taesd": ("madebyollin/taesd", None, "AutoencoderTiny", 4, 1.0, None, False),
    "taesdxl": ("madebyollin/taesdxl", None, "AutoencoderTiny", 4, 1.0, None, False),
    "taesd3": ("madebyollin/taesd3", None, "AutoencoderTiny", 16, 1.0, None, False),
    "taef1": ("madebyollin/taef1", None, "AutoencoderTiny", 16, 1.0, None, False),
}


@pytest.mark.parametrize("name", list(FIELD))
def test_the_registry_names_the_fields_vaes_as_published(name):
    repo_id, subfolder, class_name, channels, scaling, shift, gated = FIELD[name]
    config = get_model_config(name)
    assert (config["repo_id"], config["subfolder"], config["class_name"]) == (repo_id, subfolder, class_name)
    assert (config["latent_channels"], config["scaling_factor"], config["shift_factor"]) == (channels, scaling, shift)
    assert config["gated"] is gated
    assert config["description"] and isinstance(config["notes"], str)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_every_entry_has_a_supported_class_and_channels_consistent_with_it(name):
    config = get_model_config(name)
    assert set(config) <= set(ACCEPTED_CONFIG_KEYS)
    assert config["class_name"] in SUPPORTED_CLASSES
    assert config["latent_channels"] in CHANNELS[config["class_name"]]
    assert (config["scaling_factor"] is None) == (config["class_name"] in NOT_SCALAR)
    assert isinstance(config["gated"], bool)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_gated_entries_say_so_in_their_notes(name):
    config = get_model_config(name)
    says = "gated:" in config["notes"] and "HF_TOKEN" in config["notes"]
    assert says is config["gated"], config["notes"]


def test_the_gated_entries_are_the_gated_repos():
    assert {n for n, c in MODEL_CONFIGS.items() if c["gated"]} == {"sd35", "flux-dev", "flux2-dev", "flux2-klein-9b"}


@pytest.mark.parametrize("name", ["flux2-dev", "sd35", "flux-dev"])
def test_a_gated_model_not_in_the_cache_without_a_token_says_it_is_gated_and_what_to_do(hf_home, monkeypatch, name):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    repo_id = MODEL_CONFIGS[name]["repo_id"]
    with pytest.raises(VAELoadError) as caught:
        VAELoader().load_sd_vae(name, "cpu")
    message = str(caught.value)
    assert message.startswith(f"Could not load VAE {name!r} from {repo_id} (subfolder 'vae'): ")
    assert "not in the local cache" in message  # what went wrong first (offline here)
    assert f"{repo_id} is a gated repo: accept its license at https://huggingface.co/{repo_id}" in message
    assert "set HF_TOKEN" in message and message.endswith(".")


def test_with_a_token_or_for_an_open_repo_the_error_does_not_say_gated(hf_home, monkeypatch):
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(VAELoadError) as caught:
        VAELoader().load_sd_vae("flux2-dev", "cpu")
    assert "not in the local cache" in str(caught.value) and "gated" not in str(caught.value)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(VAELoadError) as caught:
        VAELoader().load_sd_vae("flux2-klein", "cpu")
    assert "not in the local cache" in str(caught.value) and "gated" not in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("class_name", "VQModel", r"'class_name' must be one of AutoencoderKL, .*AutoencoderTiny.*, got 'VQModel'"),
        ("class_name", 3, r"'class_name' must be one of .*, got 3"),
        ("gated", "yes", r"'gated' must be True or False, got 'yes'"),
    ],
)
def test_add_model_config_checks_class_name_and_gated(registry, key, value, match):
    with pytest.raises(ValueError, match=match):
        add_model_config("mine", {"repo_id": "me/my-vae", key: value})
    assert "mine" not in MODEL_CONFIGS


def test_add_model_config_accepts_every_supported_class(registry, recwarn):
    for name in SUPPORTED_CLASSES:
        add_model_config(name.lower(), {"repo_id": "me/my-vae", "class_name": name, "gated": True})
        assert MODEL_CONFIGS[name.lower()]["class_name"] == name
    assert not recwarn.list  # known keys: no "unknown keys" warning
