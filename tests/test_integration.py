"""End to end, as research code uses the library (SPEC §1): image file -> tensor -> VAE -> image file.

Runs against the tiny offline sd14 from conftest and against a model saved to a local folder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

from vae_toolkit import (
    DeviceManager,
    VAELoader,
    VAEToolkitWarning,
    add_model_config,
    load_and_preprocess_image,
    tensor_to_pil,
)

SIZE = 32  # the tiny model's sample size


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


def test_010_workflow_unchanged(hf_home, cpu_only, image_file, tmp_path):
    with pytest.warns(VAEToolkitWarning, match=r"(?i)cuda.* not available.*cpu"):
        vae, device = VAELoader.load_sd_vae_simple("sd14", "cuda")
    assert device == torch.device("cpu")

    x, original = load_and_preprocess_image(str(image_file), target_size=SIZE)
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert original.size == (SIZE, SIZE) and original.mode == "RGB"
    with torch.no_grad():
        y = vae.decode(vae.encode(x.to(device)).latent_dist.mean).sample
    assert y.shape == x.shape and torch.isfinite(y).all()

    out = tmp_path / "out.png"
    tensor_to_pil(y.squeeze(0)).save(out)
    with Image.open(out) as reloaded:
        assert reloaded.size == (SIZE, SIZE) and reloaded.mode == "RGB"


def test_device_manager_workflow(hf_home, cpu_only, image_file):
    dm = DeviceManager()
    assert dm.device == "cpu"
    assert dm.get_memory_summary() is None
    loader = VAELoader(device_manager=dm)

    vae, device = loader.load_sd_vae("sd14")
    assert device == dm.torch_device
    assert loader.load_sd_vae("sd14")[0] is vae

    x, _ = load_and_preprocess_image(image_file, target_size=SIZE)
    batch = dm.move_batch_to_device([x, x.clone()])
    with torch.no_grad():
        latents = [vae.encode(t).latent_dist.mean for t in batch]
        decoded = vae.decode(torch.cat(latents)).sample
    assert decoded.shape == (2, 3, SIZE, SIZE)
    assert decoded.device == device
    torch.testing.assert_close(decoded[0], decoded[1])  # same input, same output: the model is in eval mode


def test_own_model_in_a_local_folder_reproduces_its_outputs(hf_home, registry, tmp_path, image_file):
    """Save a model, register the folder, load it by name: it computes exactly what the saved model computed."""
    model = make_tiny_vae(scaling_factor=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    model.save_pretrained(tmp_path / "my_vae" / "vae")
    add_model_config(
        "my-vae",
        {
            "repo_id": str(tmp_path / "my_vae"),
            "subfolder": "vae",
            "description": "my fine-tuned VAE",
            "scaling_factor": 0.5,
        },
    )

    vae, device = VAELoader().load_sd_vae("my-vae", "cpu")

    assert vae.config.scaling_factor == 0.5
    x, _ = load_and_preprocess_image(image_file, target_size=SIZE)
    with torch.no_grad():
        expected = model.decode(model.encode(x).latent_dist.mean).sample
        got = vae.decode(vae.encode(x.to(device)).latent_dist.mean).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_half_precision_model_decodes(hf_home, image_file):
    vae, device = VAELoader().load_sd_vae("sd14", "cpu", dtype=torch.float16)
    x, _ = load_and_preprocess_image(image_file, target_size=SIZE)
    with torch.no_grad():
        y = vae.decode(vae.encode(x.to(device, torch.float16)).latent_dist.mean).sample
    assert y.dtype == torch.float16
    image = tensor_to_pil(y.squeeze(0))
    assert image.size == (SIZE, SIZE)
