"""vae-toolkit 0.2.0 is a drop-in replacement for 0.1.0: names, signatures, values, error types.

Expected values come from ``tests/data/reference_010.npz``, recorded from the published 0.1.0 wheel by
``tests/data/make_reference_010.py``; the expected signatures below are copied from the 0.1.0 source.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vae_toolkit
from vae_toolkit import (
    DEFAULT_PROCESSOR,
    SD_PROCESSOR,
    ImageProcessingError,
    ImageProcessor,
    VAELoader,
    get_default_token,
    get_model_config,
    load_and_preprocess_image,
    pil_to_tensor,
    tensor_to_pil,
)
from vae_toolkit import model_config as model_config_module

PACKAGE_DIR = Path(vae_toolkit.__file__).parent
REFERENCE = Path(__file__).parent / "data" / "reference_010.npz"
EMPTY = inspect.Parameter.empty

NAMES_010 = [
    "__version__",
    "__author__",
    "__email__",
    "load_and_preprocess_image",
    "tensor_to_pil",
    "pil_to_tensor",
    "ImageProcessor",
    "ImageProcessingError",
    "DEFAULT_PROCESSOR",
    "SD_PROCESSOR",
    "VAELoader",
    "get_model_config",
    "get_all_model_configs",
    "list_available_models",
    "add_model_config",
    "get_default_token",
]

# (object, [(name, default), ...]) as in 0.1.0; EMPTY = no default. ``self``/``cls`` are left out.
SIGNATURES_010 = {
    "load_and_preprocess_image": (
        vae_toolkit.load_and_preprocess_image,
        [("image_path", EMPTY), ("target_size", 512)],
    ),
    "tensor_to_pil": (vae_toolkit.tensor_to_pil, [("tensor", EMPTY)]),
    "pil_to_tensor": (
        vae_toolkit.pil_to_tensor,
        [("pil_image", EMPTY), ("target_size", None), ("normalize", True)],
    ),
    "ImageProcessor": (
        ImageProcessor,
        [("target_size", 512), ("normalize_mean", (0.5, 0.5, 0.5)), ("normalize_std", (0.5, 0.5, 0.5))],
    ),
    "ImageProcessor.load_and_preprocess": (ImageProcessor(8).load_and_preprocess, [("image_path", EMPTY)]),
    "ImageProcessor.preprocess_pil": (ImageProcessor(8).preprocess_pil, [("pil_image", EMPTY)]),
    "VAELoader": (VAELoader, []),
    "VAELoader.get_optimal_device": (VAELoader.get_optimal_device, [("preferred_device", "auto")]),
    "VAELoader.load_sd_vae": (
        VAELoader().load_sd_vae,
        [("model_name", "sd14"), ("device", "auto"), ("token", None), ("use_cache", True)],
    ),
    "VAELoader.load_sd_vae_simple": (
        VAELoader.load_sd_vae_simple,
        [("model_name", "sd14"), ("device", "auto"), ("token", None)],
    ),
    "VAELoader.clear_cache": (VAELoader().clear_cache, []),
    "get_model_config": (vae_toolkit.get_model_config, [("model_name", EMPTY)]),
    "get_all_model_configs": (vae_toolkit.get_all_model_configs, []),
    "list_available_models": (vae_toolkit.list_available_models, []),
    "add_model_config": (vae_toolkit.add_model_config, [("model_name", EMPTY), ("config", EMPTY)]),
    "get_default_token": (vae_toolkit.get_default_token, []),
}


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


# --- names and signatures -----------------------------------------------------------------------


def test_all_keeps_every_010_name_and_adds_device_management():
    missing = [n for n in NAMES_010 + ["DeviceManager", "auto_select_device"] if n not in vae_toolkit.__all__]
    assert missing == []
    for name in vae_toolkit.__all__:
        assert hasattr(vae_toolkit, name), name
    assert vae_toolkit.__version__ == "0.2.0"
    assert (vae_toolkit.__author__, vae_toolkit.__email__) == ("Yus314", "shizhaoyoujie@gmail.com")


@pytest.mark.parametrize("name", list(SIGNATURES_010))
def test_signature_matches_010(name):
    obj, expected = SIGNATURES_010[name]
    params = list(inspect.signature(obj).parameters.values())
    head = [(p.name, p.default) for p in params[: len(expected)]]
    assert head == expected
    for p in params[: len(expected)]:
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, p
    # Anything new comes after the 0.1.0 parameters and has a default, so 0.1.0 calls still bind.
    for p in params[len(expected) :]:
        assert p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY), p
        assert p.default is not EMPTY, p


def test_static_and_class_methods_kept():
    assert isinstance(inspect.getattr_static(VAELoader, "get_optimal_device"), staticmethod)
    assert isinstance(inspect.getattr_static(VAELoader, "load_sd_vae_simple"), classmethod)
    assert VAELoader.get_optimal_device("cpu") == torch.device("cpu")


def test_vaeloader_takes_an_optional_device_manager():
    param = inspect.signature(VAELoader).parameters["device_manager"]
    assert param.default is None
    assert VAELoader().device_manager is None
    dm = vae_toolkit.DeviceManager("cpu")
    assert VAELoader(device_manager=dm).device_manager is dm


def test_processors_and_error_class():
    assert issubclass(ImageProcessingError, Exception)
    for proc in (DEFAULT_PROCESSOR, SD_PROCESSOR):
        assert isinstance(proc, ImageProcessor)
        assert proc.target_size == 512
        assert tuple(proc.normalize_mean) == (0.5, 0.5, 0.5)
        assert tuple(proc.normalize_std) == (0.5, 0.5, 0.5)
        assert callable(proc.transform)


# --- tensor values equal 0.1.0 ------------------------------------------------------------------

PIL_CASES = range(7)


def _assert_same(ours: torch.Tensor, expected: np.ndarray):
    """Bit for bit: the promise is "identical to 0.1.0", so a 1-ulp difference is a failure."""
    assert isinstance(ours, torch.Tensor)
    assert ours.dtype == torch.float32 and expected.dtype == np.float32
    assert ours.is_contiguous()
    assert tuple(ours.shape) == expected.shape
    got = ours.numpy()
    differ = int(np.count_nonzero(got.view(np.uint32) != expected.view(np.uint32)))
    assert differ == 0, f"{differ} of {got.size} values differ from 0.1.0 (max |diff| {np.abs(got - expected).max()})"
    assert np.array_equal(got, expected)
    assert torch.equal(ours, torch.from_numpy(expected))


@pytest.mark.parametrize("n", PIL_CASES)
@pytest.mark.parametrize("target", [16, 21, 32])
def test_pil_to_tensor_resized_matches_010(ref, n, target):
    img = Image.fromarray(ref[f"pil{n}_input"])
    out = pil_to_tensor(img, target_size=target)
    _assert_same(out, ref[f"pil{n}_t{target}_norm"])
    assert out.shape == (3, target, target)


@pytest.mark.parametrize("n", PIL_CASES)
def test_pil_to_tensor_unnormalized_and_unresized_match_010(ref, n):
    img = Image.fromarray(ref[f"pil{n}_input"])
    raw = pil_to_tensor(img, target_size=16, normalize=False)
    _assert_same(raw, ref[f"pil{n}_t16_raw"])
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    _assert_same(pil_to_tensor(img), ref[f"pil{n}_none"])


@pytest.mark.parametrize("n", PIL_CASES)
def test_image_processor_matches_010(ref, n):
    img = Image.fromarray(ref[f"pil{n}_input"])
    proc = ImageProcessor(target_size=20, normalize_mean=(0.485, 0.456, 0.406), normalize_std=(0.229, 0.224, 0.225))
    batch = proc.preprocess_pil(img)
    _assert_same(batch, ref[f"pil{n}_proc"])
    assert batch.shape == (1, 3, 20, 20)
    _assert_same(proc.transform(img), ref[f"pil{n}_proc"][0])


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_other_modes_match_010(ref, mode):
    img = Image.fromarray(ref[f"mode_{mode}_input"], mode)
    _assert_same(pil_to_tensor(img, target_size=24), ref[f"mode_{mode}"])


def test_load_and_preprocess_image_matches_010(ref, tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(ref["png_bytes"].tobytes())
    for arg in (path, str(path)):
        result = load_and_preprocess_image(arg, target_size=32)
        assert isinstance(result, tuple) and len(result) == 2
        tensor, image = result
        _assert_same(tensor, ref["png_tensor"])
        assert tensor.shape == (1, 3, 32, 32)
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    tensor, image = ImageProcessor(32).load_and_preprocess(path)
    _assert_same(tensor, ref["png_tensor"])


def test_load_images_matches_010(ref, tmp_path):
    """The batched loader (new in 0.2.0) promises the same values as load_and_preprocess_image: 0.1.0's."""
    from vae_toolkit import load_images

    path = tmp_path / "x.png"
    path.write_bytes(ref["png_bytes"].tobytes())
    for workers in (1, 2):
        batch = load_images([path, str(path), path], target_size=32, num_workers=workers)
        assert batch.shape == (3, 3, 32, 32)
        for item in batch:
            _assert_same(item.unsqueeze(0).contiguous(), ref["png_tensor"])


def test_every_uint8_level_maps_to_torchvisions_float32_value(tmp_path):
    """Independent of the recorded file: ToTensor (x / 255 in float32) then Normalize(0.5, 0.5), for all 256 levels."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    arr = np.stack([levels, levels.T, 255 - levels], axis=-1)
    x = torch.from_numpy(arr.transpose(2, 0, 1).copy()).to(torch.float32)
    expected = ((x / 255 - 0.5) / 0.5).numpy()
    _assert_same(pil_to_tensor(Image.fromarray(arr)), expected)
    tensor, _ = load_and_preprocess_image(_save(tmp_path, arr), target_size=16)
    _assert_same(tensor, expected[None])


# --- 0.1.0 error types --------------------------------------------------------------------------


def _save(tmp_path, arr, name="img.png"):
    path = tmp_path / name
    Image.fromarray(arr).save(path)
    return path


def test_size_mismatch_is_image_processing_error(tmp_path):
    path = _save(tmp_path, np.zeros((16, 24, 3), np.uint8))
    with pytest.raises(ImageProcessingError, match=r"Image size \(24, 16\) .*does not match required size \(32, 32\)"):
        load_and_preprocess_image(path, target_size=32)
    with pytest.raises(ImageProcessingError, match="does not match required size"):
        ImageProcessor(16).load_and_preprocess(path)


def test_missing_file_is_image_processing_error_naming_the_path(tmp_path):
    path = tmp_path / "nowhere" / "missing.png"
    with pytest.raises(ImageProcessingError, match=f"Image file not found: {path}") as info:
        load_and_preprocess_image(path)
    assert isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 3, 4, 4), r"Batch size must be 1, got 2"),
        ((3, 4), r"Expected tensor dimension 3 or 4, got 2"),
        ((1, 1, 3, 4, 4), r"Expected tensor dimension 3 or 4, got 5"),
        ((4, 4, 4), r"Expected 3 channels, got 4"),
        ((1, 1, 4, 4), r"Expected 3 channels, got 1"),
    ],
)
def test_tensor_to_pil_shape_errors_are_image_processing_error(shape, message):
    with pytest.raises(ImageProcessingError, match=message):
        tensor_to_pil(torch.zeros(shape))


def test_unknown_model_is_value_error_listing_names():
    with pytest.raises(ValueError, match=r"Unknown model: .*nope.*Available models: .*'sd14'.*'sd15'"):
        get_model_config("nope")


def test_get_default_token_reads_environment_at_call_time(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert get_default_token() is None
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_hub_token")
    assert get_default_token() == "hf_hub_token"
    monkeypatch.setenv("HF_TOKEN", "hf_token")
    assert get_default_token() == "hf_token"
    monkeypatch.delenv("HF_TOKEN")
    assert get_default_token() == "hf_hub_token"


# --- model registry -----------------------------------------------------------------------------

CONFIGS_010 = {
    "sd14": {
        "repo_id": "CompVis/stable-diffusion-v1-4",
        "subfolder": "vae",
        "description": "Stable Diffusion v1.4 VAE",
        "input_size": (512, 512),
        "latent_channels": 4,
    },
    "sd15": {
        "repo_id": "runwayml/stable-diffusion-v1-5",
        "subfolder": "vae",
        "description": "Stable Diffusion v1.5 VAE",
        "input_size": (512, 512),
        "latent_channels": 4,
    },
}


@pytest.mark.parametrize("name", ["sd14", "sd15"])
def test_builtin_configs_keep_010_keys_and_values(name):
    config = get_model_config(name)
    expected = dict(CONFIGS_010[name])
    if name == "sd15":  # the one deliberate change: the runwayml repo was removed from the hub
        expected["repo_id"] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {k: config[k] for k in expected} == expected
    assert name in vae_toolkit.list_available_models()
    assert model_config_module.MODEL_CONFIGS[name]["repo_id"] == expected["repo_id"]


# --- lossless round trip (0.1.0 truncated) ------------------------------------------------------


def _noise(rng):
    return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _gradient(rng):
    y, x = np.mgrid[0:48, 0:48]
    return np.stack([x * 255 // 47, y * 255 // 47, (x + y) * 255 // 94], axis=-1).astype(np.uint8)


def _all_levels(rng):
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return np.stack([levels, levels.T, 255 - levels], axis=-1)


@pytest.mark.parametrize("make", [_noise, _gradient, _all_levels], ids=["noise", "gradient", "all_levels"])
def test_round_trip_returns_the_original_pixels(tmp_path, make):
    arr = make(np.random.default_rng(7))
    path = _save(tmp_path, arr)
    tensor, image = load_and_preprocess_image(path, target_size=arr.shape[0])
    back = tensor_to_pil(tensor)
    assert back.mode == "RGB" and back.size == image.size
    np.testing.assert_array_equal(np.asarray(back), arr)
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(tensor[0])), arr)


def _rounded_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest of (x + 1) * 127.5 clamped to [0, 255] (HWC), and where it is not a near-tie."""
    v = np.clip((x.astype(np.float64) + 1.0) * 127.5, 0.0, 255.0)
    expected = np.floor(v + 0.5).astype(np.uint8).transpose(1, 2, 0)
    clear = (np.abs(v - np.floor(v) - 0.5) > 1e-4).transpose(1, 2, 0)
    return expected, clear


def test_tensor_to_pil_rounds_where_010_truncated(ref):
    x = torch.from_numpy(ref["t2p_input"])
    ours = np.asarray(tensor_to_pil(x)).astype(np.int16)
    old = ref["t2p_output"].astype(np.int16)
    assert np.abs(ours - old).max() <= 1
    assert (ours != old).any()  # 0.1.0 truncated; the difference is the fix
    expected, clear = _rounded_reference(ref["t2p_input"])
    np.testing.assert_array_equal(ours[clear], expected[clear])
    assert np.abs(ours - expected).max() <= 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_tensor_to_pil_other_float_dtypes(tmp_path, dtype):
    arr = _all_levels(None)
    tensor, _ = load_and_preprocess_image(_save(tmp_path, arr), target_size=16)
    if dtype is torch.float64:
        # exact values (v / 255 - 0.5) / 0.5 computed in float64
        tensor64 = torch.from_numpy((arr.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)
        np.testing.assert_array_equal(np.asarray(tensor_to_pil(tensor64)), arr)
    converted = tensor.to(dtype)
    image = tensor_to_pil(converted)
    assert image.mode == "RGB" and image.size == (16, 16)
    # float16 and bfloat16 keep every level within half a step (127.5 * 2**-9 < 0.5): exact.
    np.testing.assert_array_equal(np.asarray(image), arr)
    assert converted.dtype == dtype


# --- import cost and logging hygiene ------------------------------------------------------------


def test_import_does_not_import_diffusers_or_torchvision():
    code = (
        "import sys, vae_toolkit; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'torchvision')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


CLI_MODULES = ("__main__.py", "_commands.py")  # the command line prints its report; the library never does


def _library_modules():
    return sorted(p for p in PACKAGE_DIR.glob("*.py") if p.name not in CLI_MODULES)


@pytest.mark.parametrize("path", _library_modules(), ids=lambda p: p.name)
def test_library_code_has_no_print_and_logs_per_module(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    prints = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert prints == [], f"print() in {path.name} at lines {prints}"
    # Another library's logger may be fetched only to filter it (vae_loader quiets known hub notices).
    filtered = {
        id(node.func.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("addFilter", "removeFilter")
    }
    get_logger_args = [
        ast.unparse(node.args[0]) if node.args else ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "logging.getLogger" and id(node) not in filtered
    ]
    assert all(arg == "__name__" for arg in get_logger_args), get_logger_args
    configures = [
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("basicConfig", "addHandler")
    ]
    assert configures == [], f"{path.name} configures logging: {configures}"
    uses_logger = any(isinstance(node, ast.Name) and node.id == "logger" for node in ast.walk(tree))
    if uses_logger:
        assert get_logger_args == ["__name__"], f"{path.name} uses logger without logging.getLogger(__name__)"
