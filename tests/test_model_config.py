"""The model registry: built-in entries, copies that callers may mutate, validation at registration, token lookup."""

from __future__ import annotations

import pytest

import vae_toolkit
from vae_toolkit import (
    VAEToolkitWarning,
    add_model_config,
    get_all_model_configs,
    get_default_token,
    get_model_config,
    list_available_models,
)
from vae_toolkit.model_config import ACCEPTED_CONFIG_KEYS, MODEL_CONFIGS

# name -> (repo_id, subfolder, latent_channels, scaling_factor, shift_factor)
REGISTRY = {
    "sd14": ("CompVis/stable-diffusion-v1-4", "vae", 4, 0.18215, None),
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "vae", 4, 0.18215, None),
    "sd-vae-ft-mse": ("stabilityai/sd-vae-ft-mse", None, 4, 0.18215, None),
    "sd-vae-ft-ema": ("stabilityai/sd-vae-ft-ema", None, 4, 0.18215, None),
    "sdxl": ("stabilityai/sdxl-vae", None, 4, 0.13025, None),
    "sdxl-fp16-fix": ("madebyollin/sdxl-vae-fp16-fix", None, 4, 0.13025, None),
    "flux-schnell": ("black-forest-labs/FLUX.1-schnell", "vae", 16, 0.3611, 0.1159),
}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_registry_entries(name):
    repo_id, subfolder, channels, scaling, shift = REGISTRY[name]
    config = get_model_config(name)
    assert config["repo_id"] == repo_id
    assert config["subfolder"] == subfolder
    assert config["latent_channels"] == channels
    assert config["scaling_factor"] == scaling
    assert config["shift_factor"] == shift
    assert isinstance(config["description"], str) and config["description"]
    assert isinstance(config["notes"], str)
    assert set(config) <= set(ACCEPTED_CONFIG_KEYS)


@pytest.mark.parametrize(
    ("name", "repo_id"),
    [("sd14", "CompVis/stable-diffusion-v1-4"), ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5")],
)
def test_sd1_entries_keep_the_010_keys(name, repo_id):
    config = get_model_config(name)
    assert {k: config[k] for k in ("repo_id", "subfolder", "input_size", "latent_channels")} == {
        "repo_id": repo_id,
        "subfolder": "vae",
        "input_size": (512, 512),
        "latent_channels": 4,
    }
    assert "Stable Diffusion" in config["description"]


def test_notes_say_which_models_are_unsafe_in_float16():
    assert "unsafe in float16" in get_model_config("sdxl")["notes"]
    assert "sdxl-fp16-fix" in get_model_config("sdxl")["notes"]
    assert "safe in float16" in get_model_config("sdxl-fp16-fix")["notes"]
    assert "runwayml" in get_model_config("sd15")["notes"]  # says why the repo differs from 0.1.0


def test_list_available_models():
    names = list_available_models()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert names[:2] == ["sd14", "sd15"]
    assert set(REGISTRY) <= set(names)


def test_get_model_config_returns_a_copy_callers_can_mutate():
    config = get_model_config("sd14")
    config["repo_id"] = "someone/else"
    config["subfolder"] = None
    config.clear()
    assert get_model_config("sd14")["repo_id"] == "CompVis/stable-diffusion-v1-4"
    assert MODEL_CONFIGS["sd14"]["subfolder"] == "vae"


def test_get_all_model_configs_returns_a_deep_copy():
    configs = get_all_model_configs()
    assert set(configs) == set(list_available_models())
    configs["sd14"]["repo_id"] = "someone/else"
    configs.pop("sd15")
    configs["new"] = {"repo_id": "x/y"}
    assert get_model_config("sd14")["repo_id"] == "CompVis/stable-diffusion-v1-4"
    assert "sd15" in list_available_models() and "new" not in list_available_models()


def test_unknown_name_lists_the_known_names():
    with pytest.raises(
        ValueError,
        match=r"^Unknown model: 'sd3'\. Available models: \['sd14', 'sd15', "
        r".*'flux-schnell'.*add_model_config",
    ):
        get_model_config("sd3")


# --- add_model_config -----------------------------------------------------------------------------------


def test_add_model_config_registers_and_replaces(registry):
    add_model_config("mine", {"repo_id": "me/my-vae", "subfolder": "vae", "scaling_factor": 0.5})
    assert "mine" in list_available_models()
    assert get_model_config("mine") == {"repo_id": "me/my-vae", "subfolder": "vae", "scaling_factor": 0.5}

    add_model_config("mine", {"repo_id": "/data/vae"})
    assert get_model_config("mine") == {"repo_id": "/data/vae"}

    add_model_config("sd14", {"repo_id": "me/other", "subfolder": None})  # built-ins can be replaced too
    assert get_model_config("sd14")["repo_id"] == "me/other"


def test_add_model_config_keeps_its_own_copy(registry):
    config = {"repo_id": "me/my-vae", "subfolder": None}
    add_model_config("mine", config)
    config["repo_id"] = "me/changed"
    assert get_model_config("mine")["repo_id"] == "me/my-vae"


ACCEPTED_LISTED = r"Accepted keys: repo_id \(.*\), subfolder \(.*\), revision \(.*\),.* use_safetensors \(.*\)\.$"


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"subfolder": "vae"},
        {"repo_id": None},
        {"repo_id": ""},
        {"repo_id": 3},
        {"repo_id": ["org/name"]},
        {"repo": "org/name"},
    ],
    ids=["empty", "no-repo_id", "None", "empty-string", "int", "list", "misspelt"],
)
def test_add_model_config_needs_a_string_repo_id(registry, config):
    with pytest.raises(
        ValueError, match=r"^Model config for 'mine' needs a non-empty string 'repo_id', got .*\. " + ACCEPTED_LISTED
    ):
        add_model_config("mine", config)
    assert "mine" not in list_available_models()


@pytest.mark.parametrize("config", ["org/name", None, ["org/name"], ("repo_id", "org/name")])
def test_add_model_config_needs_a_dict(registry, config):
    with pytest.raises(TypeError, match=r"^Model config for 'mine' must be a dict, got .*\. " + ACCEPTED_LISTED):
        add_model_config("mine", config)
    assert "mine" not in list_available_models()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("subfolder", 3, "a string or None"),
        ("revision", 1, "a string or None"),
        ("use_safetensors", "no", "True or False"),
        ("use_safetensors", 0, "True or False"),
    ],
)
def test_add_model_config_checks_the_types_of_loading_keys(registry, key, value, expected):
    with pytest.raises(ValueError, match=rf"^Model config for 'mine': '{key}' must be {expected}, got {value!r}$"):
        add_model_config("mine", {"repo_id": "org/name", key: value})
    assert "mine" not in list_available_models()


@pytest.mark.parametrize(("name", "error"), [("", ValueError), (None, TypeError), (14, TypeError)])
def test_add_model_config_needs_a_name(registry, name, error):
    with pytest.raises(error, match=r"model_name must be a"):
        add_model_config(name, {"repo_id": "org/name"})


def test_add_model_config_warns_about_unknown_keys(registry):
    with pytest.warns(
        VAEToolkitWarning,
        match=r"^Model config for 'mine' has unknown keys \['subfoler'\] \(kept, not used "
        r"for loading\)\. Accepted keys: repo_id, subfolder, revision",
    ):
        add_model_config("mine", {"repo_id": "org/name", "subfoler": "vae"})
    assert get_model_config("mine")["subfoler"] == "vae"


# --- token ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HF_TOKEN": "hf_a"}, "hf_a"),
        ({"HUGGING_FACE_HUB_TOKEN": "hf_b"}, "hf_b"),
        ({"HF_TOKEN": "hf_a", "HUGGING_FACE_HUB_TOKEN": "hf_b"}, "hf_a"),
        ({"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "hf_b"}, "hf_b"),
        ({}, None),
        ({"HF_TOKEN": ""}, None),
    ],
)
def test_get_default_token_reads_the_environment_at_call_time(monkeypatch, env, expected):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert get_default_token() is None
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert get_default_token() == expected
    assert vae_toolkit.get_default_token() == expected
