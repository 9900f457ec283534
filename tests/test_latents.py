"""vae_toolkit.latents: scaling/shift arithmetic, sampling, tiling, dtype/device, fp16 NaN retry, gradients."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import make_tiny_vae

from vae_toolkit import VAEToolkitWarning, latents

SCALE, SHIFT = 0.5, 0.1


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae(scaling_factor=SCALE, shift_factor=SHIFT)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def test_import_does_not_import_diffusers():
    code = "import sys; from vae_toolkit import latents; assert 'diffusers' not in sys.modules, 'diffusers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encode_applies_shift_then_scale(vae, images):
    with torch.no_grad():
        got = latents.encode(vae, images)
        mean = vae.encode(images).latent_dist.mean
    assert got.shape == (2, 4, 16, 16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (mean - SHIFT) * SCALE)


def test_decode_undoes_scale_then_shift(vae):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = latents.decode(vae, z)
        want = vae.decode(z / SCALE + SHIFT).sample
    assert got.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, want)


def test_round_trip_equals_manual_round_trip(vae, images):
    with torch.no_grad():
        got = latents.decode(vae, latents.encode(vae, images))
        want = vae.decode(vae.encode(images).latent_dist.mean).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [None, 0.0])
def test_missing_shift_factor_is_zero(shift, images):
    vae = make_tiny_vae(scaling_factor=0.25, shift_factor=shift)
    assert latents.scaling_factors(vae) == (0.25, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(latents.encode(vae, images), vae.encode(images).latent_dist.mean * 0.25)


def test_single_image_keeps_its_rank(vae, images):
    with torch.no_grad():
        z = latents.encode(vae, images[0])
        x = latents.decode(vae, z)
    assert z.shape == (4, 16, 16)
    assert x.shape == (3, 32, 32)


def test_sample_with_generator_is_reproducible(vae, images):
    with torch.no_grad():
        a = latents.encode(vae, images, sample=True, generator=torch.Generator().manual_seed(7))
        b = latents.encode(vae, images, sample=True, generator=torch.Generator().manual_seed(7))
        c = latents.encode(vae, images, sample=True, generator=torch.Generator().manual_seed(8))
        mean = latents.encode(vae, images)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert not torch.equal(a, mean)


def test_one_generator_per_image_gives_the_latents_of_each_image_alone(vae, images):
    with torch.no_grad():
        batch = latents.encode(vae, images, sample=True, generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
        alone = [
            latents.encode(vae, images[i], sample=True, generator=torch.Generator().manual_seed(s))
            for i, s in enumerate((3, 4))
        ]
    for i in range(2):
        torch.testing.assert_close(batch[i], alone[i], rtol=0, atol=1e-5)


def test_generator_list_must_match_the_batch(vae, images):
    with pytest.raises(ValueError, match="list of 3 generators for 2 image"):
        latents.encode(vae, images, sample=True, generator=[torch.Generator()] * 3)


def test_generator_without_sample_is_an_error(vae, images):
    with pytest.raises(ValueError, match="sample=True"):
        latents.encode(vae, images, generator=torch.Generator())


@pytest.mark.parametrize(
    ("bad", "exc", "match"),
    [
        ([[0.0]], TypeError, "torch.Tensor"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError, "floating-point"),
        (torch.zeros(8, 8), ValueError, r"got shape \(8, 8\)"),
        (torch.zeros(1, 1, 8, 8), ValueError, "3 channels"),
    ],
)
def test_encode_rejects_bad_images(vae, bad, exc, match):
    with pytest.raises(exc, match=match):
        latents.encode(vae, bad)


def test_decode_rejects_wrong_latent_channels(vae):
    with pytest.raises(ValueError, match="4 channels"):
        latents.decode(vae, torch.zeros(1, 16, 8, 8))


def test_bad_tile_value(vae, images):
    with pytest.raises(TypeError, match="tile"):
        latents.encode(vae, images, tile="yes")


# --- tiling ---------------------------------------------------------------------------------------


def _record_tiling(vae, monkeypatch):
    seen: list[bool] = []
    for name in ("encoder", "decoder"):
        module = getattr(vae, name)
        monkeypatch.setattr(module, "forward", _spy(module.forward, vae, seen))
    return seen


def _spy(forward, vae, seen):
    def wrapped(*args, **kwargs):
        seen.append(vae.use_tiling)
        return forward(*args, **kwargs)

    return wrapped


def test_tiling_on_off_gives_the_same_shape(monkeypatch):
    vae = make_tiny_vae(scaling_factor=SCALE, shift_factor=SHIFT)
    seen = _record_tiling(vae, monkeypatch)
    x = torch.rand(1, 3, 64, 48) * 2 - 1  # larger than sample_size 32
    with torch.no_grad():
        z_tiled = latents.encode(vae, x, tile=True)
        z_plain = latents.encode(vae, x, tile=False)
        z_auto = latents.encode(vae, x)
        y_tiled = latents.decode(vae, z_plain, tile=True)
        y_plain = latents.decode(vae, z_plain, tile=False)
        y_auto = latents.decode(vae, z_plain)
    assert z_tiled.shape == z_plain.shape == z_auto.shape == (1, 4, 32, 24)
    assert y_tiled.shape == y_plain.shape == y_auto.shape == (1, 3, 64, 48)
    torch.testing.assert_close(z_auto, z_tiled)
    torch.testing.assert_close(y_auto, y_tiled)
    # several tiles with tiling on, one pass with it off; automatic means on for inputs > sample_size
    assert seen.count(False) == 2
    assert vae.use_tiling is False


def test_small_inputs_are_not_tiled_automatically(monkeypatch, vae, images):
    seen = _record_tiling(vae, monkeypatch)
    with torch.no_grad():
        latents.decode(vae, latents.encode(vae, images))
    assert seen == [False, False]


@pytest.mark.parametrize("enabled", [False, True])
@pytest.mark.parametrize("tile", [None, True, False])
def test_tiling_state_is_restored(enabled, tile):
    vae = make_tiny_vae()
    if enabled:
        vae.enable_tiling()
    x = torch.rand(1, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        z = latents.encode(vae, x, tile=tile)
        assert vae.use_tiling is enabled
        latents.decode(vae, z, tile=tile)
    assert vae.use_tiling is enabled


def test_tiling_state_is_restored_after_an_error(monkeypatch):
    vae = make_tiny_vae()

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(vae.encoder, "forward", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        latents.encode(vae, torch.zeros(1, 3, 48, 48), tile=True)
    assert vae.use_tiling is False


# --- dtype, device, inputs ------------------------------------------------------------------------


def test_runs_in_the_vae_dtype_and_returns_float32(images):
    vae = make_tiny_vae().to(torch.bfloat16)
    seen: list[torch.dtype] = []
    vae.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    vae.encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    x = images.to(torch.float64)
    with torch.no_grad():
        z = latents.encode(vae, x)
        y = latents.decode(vae, z)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert z.dtype == y.dtype == torch.float32
    assert vae.dtype == torch.bfloat16


def test_float64_vae_keeps_float64(images):
    vae = make_tiny_vae().to(torch.float64)
    with torch.no_grad():
        assert latents.encode(vae, images).dtype == torch.float64
        assert latents.decode(vae, torch.zeros(1, 4, 8, 8)).dtype == torch.float64


def test_outputs_are_on_the_vae_device(vae, images):
    with torch.no_grad():
        z = latents.encode(vae, images)
        y = latents.decode(vae, z)
    assert z.device == y.device == vae.device


@pytest.mark.gpu
def test_inputs_are_moved_to_a_cuda_vae(images):
    vae = make_tiny_vae().to("cuda")
    with torch.no_grad():
        z = latents.encode(vae, images)  # images on the CPU
        y = latents.decode(vae, z.cpu())
    assert z.device.type == y.device.type == "cuda"


def test_inputs_are_not_modified(vae, images):
    before = images.clone()
    z = latents.encode(vae, images)
    z_before = z.detach().clone()
    latents.decode(vae, z)
    assert torch.equal(images, before)
    assert torch.equal(z, z_before)
    assert images.dtype == torch.float32 and not images.requires_grad


# --- gradients ------------------------------------------------------------------------------------


def test_gradients_flow_through_decode(vae):
    z = torch.zeros(1, 4, 16, 16, requires_grad=True)
    target = torch.zeros(1, 3, 32, 32)
    loss = (latents.decode(vae, z) - target).pow(2).mean()
    loss.backward()
    assert z.grad is not None
    assert z.grad.abs().sum() > 0


def test_gradients_flow_through_encode(vae, images):
    x = images.clone().requires_grad_(True)
    latents.encode(vae, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- fp16 NaN retry -------------------------------------------------------------------------------


def _nan_in_half(module, args, output):
    """A decoder that overflows in float16/bfloat16, as the original SDXL VAE does."""
    if output.dtype in (torch.float16, torch.bfloat16):
        return torch.full_like(output, float("nan"))
    return output


@pytest.fixture
def overflowing_vae():
    vae = make_tiny_vae(scaling_factor=SCALE, shift_factor=SHIFT)
    reference = make_tiny_vae(scaling_factor=SCALE, shift_factor=SHIFT)
    vae = vae.to(torch.float16)
    vae.decoder.register_forward_hook(_nan_in_half)
    return vae, reference


def test_nan_decode_is_retried_in_float32(overflowing_vae):
    vae, reference = overflowing_vae
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with pytest.warns(VAEToolkitWarning, match=r"float16 VAE produced NaN/inf.*float32.*sdxl-fp16-fix"):
        with torch.no_grad():
            y = latents.decode(vae, z)
    assert torch.isfinite(y).all()
    assert y.dtype == torch.float32
    # the retry ran the same weights in float32 (up to the float16 rounding of the weights)
    with torch.no_grad():
        want = latents.decode(reference.to(torch.float16).to(torch.float32), z)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    # the VAE is left as it was
    assert vae.dtype == torch.float16
    assert vae.encoder is not None and all(p.dtype == torch.float16 for p in vae.parameters())


def test_nan_retry_keeps_gradients(overflowing_vae):
    vae, _ = overflowing_vae
    z = torch.zeros(1, 4, 16, 16, requires_grad=True)
    with pytest.warns(VAEToolkitWarning, match="float32"):
        y = latents.decode(vae, z)
    y.pow(2).mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_nan_retry_with_tiling(overflowing_vae):
    vae, _ = overflowing_vae
    with pytest.warns(VAEToolkitWarning, match="float32"):
        with torch.no_grad():
            y = latents.decode(vae, torch.zeros(1, 4, 24, 24))
    assert y.shape == (1, 3, 48, 48) and torch.isfinite(y).all()
    assert vae.use_tiling is False


def test_nan_latents_are_not_retried(overflowing_vae):
    vae, _ = overflowing_vae
    z = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.warns(VAEToolkitWarning, match="so do the latents"):
        with torch.no_grad():
            y = latents.decode(vae, z)
    assert not torch.isfinite(y).any()


def test_finite_float16_decode_does_not_warn():
    vae = make_tiny_vae().to(torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            y = latents.decode(vae, torch.zeros(1, 4, 8, 8))
    assert torch.isfinite(y).all()
