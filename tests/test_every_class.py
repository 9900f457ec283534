"""Every command on every supported autoencoder class: roundtrip, encode + LatentStore, decode, evaluate with
five classes in one report, TrainingDataset and the latent-optimisation example; images cropped to the model's
spatial factor (a 100x70 image through a 32x model keeps 96x64)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_latent_formats import TINY, build

from vae_toolkit import __main__ as cli
from vae_toolkit import latents, load_for_encoding
from vae_toolkit.dataset import LatentStore, encode_dataset
from vae_toolkit.evaluate import evaluate
from vae_toolkit.latent_formats import crop_multiple, latent_format
from vae_toolkit.training import TrainingDataset

CLASSES = sorted(TINY)
DC32 = dict(  # a 32x DC-AE (six stages), as SANA's
    TINY["AutoencoderDC"],
    encoder_block_out_channels=(8,) * 6,
    decoder_block_out_channels=(8,) * 6,
    encoder_layers_per_block=(1,) * 6,
    decoder_layers_per_block=(1,) * 6,
    encoder_qkv_multiscales=((),) * 6,
    decoder_qkv_multiscales=((),) * 6,
)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each class saved as a model folder (config.json + safetensors), as ``--model FOLDER`` takes it."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, config in [*TINY.items(), ("dc32", DC32)]:
        vae = build("AutoencoderDC" if name == "dc32" else name, config)
        vae.save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within 1e-5 of the latents' magnitude (FLUX.2's batch-normalised latents reach 10 and more; a batch of
    other images may change the last bits of a convolution)."""
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


def loaded(folder: Path):
    from vae_toolkit import VAELoader

    return VAELoader().load_sd_vae(str(folder), "cpu", dtype=torch.float32)[0]


def photos(folder: Path, sizes=((72, 40), (40, 72), (100, 70))) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        names.append(f"p{i}.png")
    return names


@pytest.mark.parametrize("name", [*CLASSES, "dc32"])
def test_roundtrip_crops_to_the_spatial_factor(name, folders, tmp_path, capsys):
    photos(tmp_path / "in", sizes=((100, 70),))
    code = cli.main(["roundtrip", str(tmp_path / "in" / "p0.png"), "-o", str(tmp_path / "out.png"),
                     "--model", str(folders[name]), "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    multiple = crop_multiple([loaded(folders[name])])
    with Image.open(tmp_path / "out.png") as img:
        assert img.size == (100 - 100 % multiple, 70 - 70 % multiple)
    if name == "dc32":
        assert multiple == 32 and img.size == (96, 64)


@pytest.mark.parametrize("name", [*CLASSES, "dc32"])
def test_encode_store_decode_every_class(name, folders, tmp_path, capsys):
    keys = photos(tmp_path / "src")
    store_dir = tmp_path / "store"
    code = cli.main(["encode", str(tmp_path / "src"), "-o", str(store_dir), "--model", str(folders[name]),
                     "--device", "cpu", "--no-progress", "--workers", "1"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    vae = loaded(folders[name])
    fmt = latent_format(vae)
    multiple = crop_multiple([vae])
    with LatentStore(store_dir) as store, torch.no_grad():
        assert sorted(store) == keys
        assert store.metadata["class_name"] == fmt.class_name
        assert store.metadata["latent_format"] == json.loads(json.dumps(fmt.to_dict()))
        for key in keys:
            x = load_for_encoding(tmp_path / "src" / key, multiple=multiple)[None]
            want = latents.encode(vae, x, tile=False)[0]
            assert store[key].shape == want.shape and want.shape[0] == fmt.latent_channels
            assert close(store[key], want), key
        assert store.entry("p2.png")["size"] == [100 - 100 % multiple, 70 - 70 % multiple]
    code = cli.main(["decode", str(store_dir), "-o", str(tmp_path / "decoded"), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with Image.open(tmp_path / "decoded" / "p2.png") as img:
        assert img.size == (100 - 100 % multiple, 70 - 70 % multiple)


@pytest.mark.parametrize("name", ["AutoencoderDC", "AutoencoderTiny"])
@pytest.mark.parametrize("option", ["--distribution", "--sample"])
def test_a_latent_distribution_is_refused_without_a_posterior(name, option, folders, tmp_path, capsys):
    photos(tmp_path / "src", sizes=((32, 32),))
    code = cli.main(["encode", str(tmp_path / "src"), "-o", str(tmp_path / "store"), "--model", str(folders[name]),
                     "--device", "cpu", "--no-progress", option])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"{option} (" in err and "no posterior" in err, err
    assert not any((tmp_path / "store").glob("*.safetensors"))


def test_a_size_or_bucket_step_off_the_spatial_factor_is_refused(folders, tmp_path):
    photos(tmp_path / "src", sizes=((64, 64),))
    vae = loaded(folders["dc32"])
    with pytest.raises(ValueError, match="size 48 is not a multiple of 32, the spatial factor of the model"):
        encode_dataset(vae, tmp_path / "src", tmp_path / "a", size=48, progress=False)
    with pytest.raises(ValueError, match="bucket step 16 is not a multiple of 32"):
        encode_dataset(vae, tmp_path / "src", tmp_path / "b", buckets=64, bucket_step=16, progress=False)


@pytest.mark.parametrize("name", ["AutoencoderKLFlux2", "AutoencoderKLWan", "AutoencoderTiny"])
def test_flip_and_training_dataset_every_class(name, folders, tmp_path):
    photos(tmp_path / "src", sizes=((32, 32), (32, 32), (48, 32)))
    vae = loaded(folders[name])
    encode_dataset(vae, tmp_path / "src", tmp_path / "store", flip=True, progress=False, workers=1)
    with LatentStore(tmp_path / "store") as store, torch.no_grad():
        x = load_for_encoding(tmp_path / "src" / "p0.png")[None]
        mirrored = latents.encode(vae, x.flip(-1), tile=False)[0]
        assert close(store.get("p0.png", flipped=True), mirrored)
        item = TrainingDataset(store, flip=False)[0]
        assert item["latent"].shape[0] == latent_format(vae).latent_channels
        decoded = latents.decode(vae, item["latent"][None])
        assert decoded.shape[-2:] == x.shape[-2:]


def test_evaluate_five_classes_in_one_report(folders, tmp_path):
    photos(tmp_path / "src")
    names = ["AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderKLQwenImage", "AutoencoderDC", "AutoencoderTiny"]
    vaes = {name: loaded(folders[name]) for name in names}
    result = evaluate(vaes, tmp_path / "src", tmp_path / "report", progress=False, lpips="none", fid=False)
    assert {row["model"] for row in result.rows} == set(names)
    assert len(result.rows) == 3 * len(names) and not result.failures
    assert all(np.isfinite(row["psnr"]) for row in result.rows)
    assert (tmp_path / "report" / "index.html").is_file() and (tmp_path / "report" / "metrics.csv").is_file()
    multiple = crop_multiple(vaes.values())
    sizes = {(row["width"], row["height"]) for row in result.rows if row["image"] == "p2.png"}
    assert sizes == {(100 - 100 % multiple, 70 - 70 % multiple)}  # every model saw the same pixels
    assert {m: result.settings["models"][m]["class_name"] for m in names} == {m: m for m in names}
    assert result.settings["models"]["AutoencoderKLFlux2"]["latent_channels"] == 16  # 4 channels, patchified 2x2


def test_evaluate_crops_to_the_largest_factor_of_its_models(folders, tmp_path):
    photos(tmp_path / "src", sizes=((100, 70),))
    vaes = {"sd": loaded(folders["AutoencoderKL"]), "dc32": loaded(folders["dc32"])}
    result = evaluate(vaes, tmp_path / "src", progress=False, lpips="none", fid=False)
    assert {(row["width"], row["height"]) for row in result.rows} == {(96, 64)}
    with pytest.raises(ValueError, match="size must be a multiple of 32, got 48"):
        evaluate(vaes, tmp_path / "src", size=48, progress=False, lpips="none", fid=False)


def example():
    spec = importlib.util.spec_from_file_location("latent_optimization", EXAMPLES / "latent_optimization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CLASSES)
def test_latent_optimization_example_every_class(name, folders, capsys):
    code = example().main(["--model", str(folders[name]), "--size", "32", "--steps", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    losses = [float(line.split("loss")[1]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 4 and losses[-1] < losses[0], out


REGISTRY_CONFIGS = {"sd35": "sd35", "flux2-dev": "flux2", "flux2-klein": "flux2", "qwen-image": "qwen-image",
                    "wan21": "wan2.1", "wan22": "wan2.2", "sana-dc-ae": "dc-ae-f32c32-sana", "taesd": "taesd",
                    "taef1": "taef1", "hunyuanimage-2.1": "hunyuanimage-2.1"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REGISTRY_CONFIGS))
def test_the_registry_factors_are_the_published_configs_formats(name):
    """``models`` prints the registry's class, channels and spatial factor: those of the published config's
    latent format (random weights at a small width; the factors and channels are the published ones)."""
    from test_latent_formats import PUBLISHED, published

    from vae_toolkit.model_config import get_model_config

    entry = get_model_config(name)
    fmt = latent_format(published(REGISTRY_CONFIGS[name]))
    assert entry["class_name"] == fmt.class_name == PUBLISHED[REGISTRY_CONFIGS[name]][0]
    assert entry["spatial_factor"] == fmt.spatial_factor
    assert entry["latent_channels"] * (4 if fmt.class_name == "AutoencoderKLFlux2" else 1) == fmt.latent_channels
