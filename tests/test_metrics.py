"""vae_toolkit.metrics: the definitions against their references, gradients, FID accumulation, weight files.

Every test runs with ``TORCH_HOME`` pointed at a temporary folder holding seeded random weights in the real
files' layout (``tests/metric_weights.py``) and with ``HF_HUB_OFFLINE=1`` (conftest): nothing is downloaded.
LPIPS and FID are compared with the values the reference packages computed on the same weights
(``tests/data/metric_references.npz``, made by ``tests/data/make_metric_references.py``) and, where lpips,
torchvision and pytorch-fid import, with those packages live.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import urllib.error
from dataclasses import replace
from pathlib import Path

import metric_weights as mw
import numpy as np
import pytest
import torch
from PIL import Image

from vae_toolkit import _weights, evaluate, metrics, pil_to_tensor

ROOT = Path(__file__).resolve().parent.parent
REFERENCES = np.load(Path(__file__).parent / "data" / "metric_references.npz")


@pytest.fixture(scope="session")
def planted_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub/checkpoints holds every weight file as seeded random tensors."""
    home = tmp_path_factory.mktemp("torch_home")
    mw.plant(home / "hub" / "checkpoints")
    return home


@pytest.fixture(autouse=True)
def _torch_home(planted_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME without weight files (and no module built from another one)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(metrics, "_LPIPS_CACHE", {})
    monkeypatch.setattr(metrics, "_INCEPTION_CACHE", {})
    return tmp_path / "torch" / "hub" / "checkpoints"


def _reference_script():
    spec = importlib.util.spec_from_file_location(
        "make_metric_references", ROOT / "tests/data/make_metric_references.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _importable(*names: str) -> bool:
    try:
        for name in names:
            __import__(name)
    except Exception:  # torchvision may fail to import against a CPU torch build
        return False
    return True


def _uint8_pair(seed: int, h: int, w: int, flat: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A random uint8 image and a noisy copy; ``flat``: a bright, nearly flat one (where SSIM is most sensitive
    to its window's normalisation)."""
    rng = np.random.default_rng(seed)
    if flat:
        a = np.clip(rng.integers(200, 250, (1, 1, 3)) + rng.integers(-2, 3, (h, w, 3)), 0, 255).astype(np.uint8)
        noise = rng.integers(-2, 3, (h, w, 3))
    else:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        noise = rng.integers(-25, 26, (h, w, 3))
    return a, np.clip(a.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    return pil_to_tensor(Image.fromarray(arr)).unsqueeze(0)


# --- PSNR, SSIM, MS-SSIM, MAE -------------------------------------------------------------------------


@pytest.mark.parametrize("flat", [False, True], ids=["noisy", "flat"])
@pytest.mark.parametrize(
    "name, size, tol",
    [("psnr", (40, 48), 1e-4), ("ssim", (40, 48), 1e-6), ("mae", (40, 48), 1e-4), ("ms_ssim", (161, 163), 1e-6)],
)
def test_whole_level_images_give_evaluates_values(name, size, tol, flat):
    pairs = [_uint8_pair(seed, *size, flat=flat) for seed in range(2)]
    x = torch.cat([_tensor(a) for a, _ in pairs])
    y = torch.cat([_tensor(b) for _, b in pairs])
    got = getattr(metrics, name)(x, y)
    expected = [getattr(evaluate, name)(a, b) for a, b in pairs]
    assert got.shape == (2,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=tol)


def test_ssim_is_scikit_images_and_ms_ssim_pytorch_msssims():
    from pytorch_msssim import ms_ssim
    from skimage.metrics import structural_similarity

    a, b = _uint8_pair(5, 161, 165)
    x, y = _tensor(a), _tensor(b)
    reference = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1
    )
    assert abs(float(metrics.ssim(x, y)) - reference) < 2e-5
    window = metrics._gaussian(3, torch.device("cpu"), torch.float32)
    levels = [torch.from_numpy(v).permute(2, 0, 1)[None].float() for v in (a, b)]
    reference_ms = ms_ssim(*levels, data_range=255, size_average=False, win=window)
    assert abs(float(metrics.ms_ssim(x, y)) - float(reference_ms)) < 1e-6


def test_psnr_of_a_known_error_and_of_identical_images():
    x = torch.zeros(2, 3, 16, 16)
    y = x.clone()
    y[0] += 10 / 127.5  # every value 10 levels off: MSE 100
    got = metrics.psnr(x, y)
    assert abs(float(got[0]) - 10 * np.log10(255**2 / 100)) < 1e-4
    assert got[1] == float("inf")
    assert abs(float(metrics.mae(x, y)[0]) - 10) < 1e-4


@pytest.mark.parametrize("name", ["psnr", "ssim", "mae", "lpips"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(name, dtype):
    x, y = mw.lpips_images(1, n=2)
    x, y = x.to(dtype), y.to(dtype)
    got = getattr(metrics, name)(x, y)
    assert got.dtype == torch.float32
    expected = getattr(metrics, name)(x.float(), y.float())  # the same values, exactly representable in float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_float64_inputs_stay_float64():
    x, y = mw.lpips_images(1, n=2)
    for name in ("psnr", "ssim", "mae"):
        got = getattr(metrics, name)(x.double(), y.double())
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.float(), getattr(metrics, name)(x, y), rtol=1e-5, atol=1e-5)


def test_ssim_gradients_are_right():
    torch.manual_seed(0)
    x = (torch.rand(1, 3, 13, 12, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    y = torch.rand(1, 3, 13, 12, dtype=torch.float64) * 2 - 1
    assert torch.autograd.gradcheck(lambda a: metrics.ssim(a, y), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a: metrics.psnr(a, y), (x,), fast_mode=True)


@pytest.mark.parametrize("name", ["psnr", "ssim", "mae", "lpips"])
def test_gradients_reach_both_inputs_and_inputs_are_not_modified(name):
    x, y = mw.lpips_images(2, n=2)
    x0, y0 = x.clone(), y.clone()
    x.requires_grad_(True)
    y.requires_grad_(True)
    getattr(metrics, name)(x, y).mean().backward()
    for t in (x, y):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert torch.equal(x.detach(), x0) and torch.equal(y.detach(), y0)


def test_ms_ssim_gradients():
    a, b = _uint8_pair(3, 161, 164)
    x = _tensor(a).requires_grad_(True)
    metrics.ms_ssim(x, _tensor(b)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["psnr", "ssim", "mae", "lpips"])
def test_nan_in_an_image_gives_nan_for_that_image_only(name):
    x, y = mw.lpips_images(3, n=3)
    y[1, 0, 5, 5] = float("nan")
    got = getattr(metrics, name)(x, y)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2]]).all()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: metrics.psnr(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)), ValueError, r"\[N, 3, H, W\].*\(3, 8, 8\)"),
        (lambda: metrics.psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9)), ValueError, "differ in shape"),
        (lambda: metrics.mae(*[torch.zeros(1, 3, 8, 8, dtype=torch.uint8)] * 2), TypeError, "127.5"),
        (lambda: metrics.psnr(np.zeros((1, 3, 8, 8)), torch.zeros(1, 3, 8, 8)), TypeError, "torch.Tensor"),
        (lambda: metrics.ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32)), ValueError, "11x11.*32x10"),
        (lambda: metrics.ms_ssim(torch.zeros(1, 3, 160, 200), torch.zeros(1, 3, 160, 200)), ValueError, "161x161"),
        (lambda: metrics.lpips(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)), ValueError, "31x31.*16x16"),
        (lambda: metrics.LPIPS("resnet"), ValueError, "'alex', 'vgg' or 'squeeze'"),  # squeeze: test_lpips_squeeze
        (lambda: metrics.FrechetInceptionDistance(dims=100), ValueError, "64, 192, 768, 2048"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_vgg_lpips_takes_16x16_images():
    x, y = mw.lpips_images(4, n=1, size=(16, 16))
    assert torch.isfinite(metrics.lpips(x, y, net="vgg")).all()


# --- LPIPS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_values_and_gradients_equal_the_lpips_package(net):
    x, y = mw.lpips_images(0)
    x.requires_grad_(True)
    values = metrics.lpips(x, y, net=net)
    values.sum().backward()
    np.testing.assert_allclose(values.detach().double().numpy(), REFERENCES[f"lpips_{net}"], rtol=0, atol=1e-5)
    reference_grad = REFERENCES[f"lpips_{net}_grad"]
    assert np.abs(x.grad.numpy() - reference_grad).max() <= 1e-4 * np.abs(reference_grad).max()


@pytest.mark.skipif(not _importable("lpips", "torchvision"), reason="lpips and torchvision are not importable here")
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_lpips_package_live(net, planted_home):
    values, grad = _reference_script().lpips_reference(net, planted_home / "hub" / "checkpoints")
    x, y = mw.lpips_images(0)
    x.requires_grad_(True)
    ours = metrics.LPIPS(net)(x, y)
    ours.sum().backward()
    np.testing.assert_allclose(ours.detach().numpy(), values, rtol=0, atol=1e-5)
    assert np.abs(x.grad.numpy() - grad).max() <= 1e-4 * np.abs(grad).max()


@pytest.mark.parametrize(
    "net, backbone, heads", [("alex", mw.ALEXNET, mw.LPIPS_ALEX), ("vgg", mw.VGG16, mw.LPIPS_VGG)]
)
def test_lpips_parameters_are_the_files_tensors_frozen(net, backbone, heads):
    module = metrics.LPIPS(net)
    backbone_sd, heads_sd = mw.state_dict(backbone), mw.state_dict(heads)
    features = {k: v for k, v in backbone_sd.items() if k.startswith("features.")}
    assert module.net.state_dict().keys() == features.keys()
    for key, value in features.items():
        assert torch.equal(module.net.state_dict()[key], value)
    for key, value in heads_sd.items():
        assert torch.equal(module.state_dict()[key], value)
    assert not any(p.requires_grad for p in module.parameters())


def _cached(net: str) -> list:
    return [m for k, m in metrics._LPIPS_CACHE.items() if k[:2] == (net, "cpu")]


def test_lpips_function_reuses_one_module_per_net_device_and_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "_LPIPS_CACHE", {})  # other tests' weight files (their TORCH_HOMEs) left aside
    x, y = mw.lpips_images(5, n=1)
    metrics.lpips(x, y)
    before = _cached("alex")
    metrics.lpips(x, y)
    assert _cached("alex") == before and len(before) == 1
    torch.testing.assert_close(metrics.lpips(x, y), before[0](x, y), rtol=0, atol=0)
    # other weight files (another TORCH_HOME): another module, built from them and checked, not the cached one
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    for name in (mw.ALEXNET, mw.LPIPS_ALEX):
        (tmp_path / "hub" / "checkpoints" / name).write_bytes(b"not a weights file")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(metrics.InvalidWeightsError, match="probably truncated"):
        metrics.lpips(x, y)


def test_lpips_module_refuses_images_on_another_device(monkeypatch):
    module = metrics.LPIPS("alex")
    x, y = mw.lpips_images(5, n=1)
    meta_x, meta_y = x.to("meta"), y.to("meta")
    with pytest.raises(ValueError, match="on meta but the LPIPS module on cpu"):
        module(meta_x, meta_y)


# --- FID ---------------------------------------------------------------------------------------------


def _fid(dims: int, real: torch.Tensor, fake: torch.Tensor) -> metrics.FrechetInceptionDistance:
    fid = metrics.FrechetInceptionDistance(dims)
    fid.update(real, real=True)
    fid.update_fake(fake)
    return fid


def test_fid_2048_features_and_statistics_equal_pytorch_fids():
    real, _ = mw.fid_sets()
    fid = metrics.FrechetInceptionDistance(2048)
    reference = REFERENCES["fid_features_2048_real"]
    assert np.abs(fid.features(real).numpy() - reference).max() <= 1e-5 * np.abs(reference).max()
    for real_set, name in ((True, "real"), (False, "fake")):  # statistics of pytorch-fid's own features
        act = REFERENCES[f"fid_features_2048_{name}"]
        fid.update_features(torch.from_numpy(act), real=real_set)
        mu, sigma = fid.statistics(real_set)
        act64 = act.astype(np.float64)
        np.testing.assert_allclose(mu, np.mean(act64, axis=0), rtol=1e-12, atol=0)
        cov = np.cov(act64, rowvar=False)
        np.testing.assert_allclose(sigma, cov, rtol=0, atol=1e-10 * np.abs(cov).max())


@pytest.mark.skipif(
    os.environ.get("VAE_TOOLKIT_FULL_FID", "").lower() not in ("1", "true", "yes", "on"),
    reason="a 2048x2048 matrix square root takes 10-70 s on a busy 2-core machine; VAE_TOOLKIT_FULL_FID=1 runs it",
)
def test_fid_2048_equals_pytorch_fid():
    real, fake = mw.fid_sets()
    value = _fid(2048, real, fake).compute()
    assert abs(value - float(REFERENCES["fid_2048"])) <= 1e-3 * float(REFERENCES["fid_2048"])


def test_fid_64_equals_pytorch_fid_and_logs_the_bias_warning(caplog):
    real, fake = mw.fid_sets()
    with caplog.at_level(logging.WARNING, logger="vae_toolkit.metrics"):
        value = _fid(64, real, fake).compute()
    assert abs(value - float(REFERENCES["fid_64"])) <= 1e-3 * float(REFERENCES["fid_64"])
    assert any("below 2048 images FID is biased" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not _importable("pytorch_fid", "torchvision"), reason="pytorch-fid is not importable here")
def test_fid_equals_pytorch_fid_live(planted_home):
    reference = _reference_script().fid_reference(planted_home / "hub" / "checkpoints")
    real, fake = mw.fid_sets()
    for dims in (64, 2048):
        assert abs(_fid(dims, real, fake).compute() - reference[f"fid_{dims}"]) <= 1e-3 * reference[f"fid_{dims}"]


def test_frechet_distance_is_pytorch_fids():
    stats = mw.small_statistics()
    assert metrics.frechet_distance(*stats) == pytest.approx(float(REFERENCES["frechet_small"]), rel=1e-9)
    if _importable("pytorch_fid"):
        from pytorch_fid.fid_score import calculate_frechet_distance

        assert metrics.frechet_distance(*stats) == pytest.approx(calculate_frechet_distance(*stats), rel=1e-12)


def test_statistics_are_np_mean_and_np_cov():
    torch.manual_seed(0)
    features = torch.rand(9, 64) * 3
    fid = metrics.FrechetInceptionDistance(64)
    fid.update_features(features[:4], real=True)
    fid.update_features(features[4:], real=True)
    mu, sigma = fid.statistics(real=True)
    act = features.double().numpy()
    np.testing.assert_allclose(mu, np.mean(act, axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(act, rowvar=False), rtol=1e-9, atol=1e-12)


def test_a_singular_product_gets_pytorch_fids_offset(monkeypatch):
    calls = []
    real_sqrtm = metrics._sqrtm

    def sqrtm(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics, "_sqrtm", sqrtm)
    mu1, s1, mu2, s2 = mw.small_statistics(4)
    value = metrics.frechet_distance(mu1, s1, mu2, s2)
    offset = np.eye(4) * 1e-6
    np.testing.assert_array_equal(calls[1], (s1 + offset).dot(s2 + offset))
    assert np.isfinite(value)


def test_an_imaginary_square_root_is_refused():
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_halves_merged_equal_one_pass():
    real, fake = mw.fid_sets(6)
    whole = _fid(64, real, fake)
    first, second = _fid(64, real[:2], fake[:4]), _fid(64, real[2:], fake[4:])
    merged = first.merge(second)
    assert (merged.num_real, merged.num_fake) == (whole.num_real, whole.num_fake) == (6, 6)
    for real_set in (True, False):
        for a, b in zip(merged.statistics(real_set), whole.statistics(real_set), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-9)


def test_memory_does_not_grow_with_the_number_of_images():
    real, _ = mw.fid_sets(2)
    fid = metrics.FrechetInceptionDistance(192)
    fid.update_real(real)
    after_two = fid.nbytes
    assert after_two == 8 * (192 + 192**2)  # the real set's sums
    for _ in range(10):
        fid.update_features(torch.rand(500, 192), real=False)
    fid.update_features(torch.rand(500, 192), real=True)
    assert (fid.num_real, fid.num_fake) == (502, 5000)
    assert fid.nbytes == 2 * 8 * (192 + 192**2)  # both sets, whatever the number of images
    held = [v for v in vars(fid).values() if isinstance(v, (list, tuple, set))]
    assert not held, "the accumulator must not keep per-image data"


def test_images_with_nan_are_left_out_of_fid(caplog):
    real, fake = mw.fid_sets(4)
    broken = real.clone()
    broken[1, 2, 3, 4] = float("nan")
    fid = metrics.FrechetInceptionDistance(64)
    with caplog.at_level(logging.WARNING, logger="vae_toolkit.metrics"):
        fid.update(broken, real=True)
    assert (fid.num_real, fid.num_skipped) == (3, 1)
    assert any("1 image(s) with NaN or inf values" in r.getMessage() for r in caplog.records)
    clean = metrics.FrechetInceptionDistance(64)
    clean.update(real[[0, 2, 3]], real=True)
    np.testing.assert_allclose(fid.statistics()[1], clean.statistics()[1], rtol=1e-10, atol=1e-12)


def test_feature_rows_with_nan_are_left_out():
    features = torch.rand(4, 64)
    features[2, 7] = float("inf")
    fid = metrics.FrechetInceptionDistance(64)
    fid.update_features(features, real=False)
    assert (fid.num_fake, fid.num_skipped) == (3, 1)
    np.testing.assert_allclose(fid.statistics(False)[0], features[[0, 1, 3]].double().mean(0).numpy(), rtol=1e-12)


def test_fid_needs_two_images_per_set():
    real, fake = mw.fid_sets(2)
    fid = _fid(64, real, fake[:1])
    with pytest.raises(ValueError, match="at least 2 images.*generated set has 1"):
        fid.compute()


def test_all_reduce_without_a_process_group_is_a_copy():
    real, fake = mw.fid_sets(3)
    fid = _fid(64, real, fake)
    copy = fid.all_reduce()
    assert copy is not fid and copy.num_real == 3
    assert copy.compute() == fid.compute()


_RANKS_SCRIPT = """
import json, sys
import torch.distributed as dist
import metric_weights as mw
from vae_toolkit import metrics

def parts(rank):
    real, fake = mw.fid_sets(6)
    return real[rank::2], (fake[:4] if rank == 0 else fake[4:])

dist.init_process_group("gloo")
rank = dist.get_rank()
fid = metrics.FrechetInceptionDistance(64)
real, fake = parts(rank)
fid.update(real, real=True)
fid.update(fake, real=False)
total = fid.all_reduce()
again = fid.all_reduce()  # reducing again counts nothing twice
if rank == 0:
    single = metrics.FrechetInceptionDistance(64)  # one process, the same batches
    for part in (0, 1):
        real, fake = parts(part)
        single.update(real, real=True)
        single.update(fake, real=False)
    result = {"fid": total.compute(), "again": again.compute(), "single": single.compute(),
              "counts": [total.num_real, total.num_fake, fid.num_real, fid.num_fake]}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
"""


def test_two_ranks_equal_one_process(tmp_path, planted_home):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    out = tmp_path / "out.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "TORCH_HOME": str(planted_home),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["counts"] == [6, 6, 3, 4]
    assert result["fid"] == pytest.approx(result["single"], rel=1e-12)  # float64 sums in another order
    assert result["again"] == result["fid"]
    real, fake = mw.fid_sets(6)  # this process: other threads and batch shapes, float32 features within 1e-6
    assert result["fid"] == pytest.approx(_fid(64, real, fake).compute(), rel=1e-5)


# --- weight files ------------------------------------------------------------------------------------


def test_the_file_in_torch_home_is_used(empty_home):
    mw.plant(empty_home, (mw.ALEXNET, mw.LPIPS_ALEX))
    altered = mw.state_dict(mw.ALEXNET)
    altered["features.0.weight"] = altered["features.0.weight"] * 2
    torch.save(altered, empty_home / mw.ALEXNET)
    module = metrics.LPIPS("alex")
    assert torch.equal(module.net.features[0].weight, altered["features.0.weight"])


@pytest.mark.parametrize(
    "build, missing, url",
    [
        (lambda: metrics.LPIPS("alex"), mw.LPIPS_ALEX, _weights.LPIPS_ALEX.url),
        (lambda: metrics.LPIPS("vgg"), mw.VGG16, "https://download.pytorch.org/models/vgg16-397923af.pth"),
        (lambda: metrics.lpips(*mw.lpips_images(0)), mw.LPIPS_ALEX, _weights.LPIPS_ALEX.url),
        (lambda: metrics.FrechetInceptionDistance(), mw.FID_INCEPTION, _weights.FID_INCEPTION.url),
    ],
)
def test_offline_a_missing_file_is_one_line_naming_file_address_and_folder(
    empty_home, build, missing, url, monkeypatch
):
    present = [name for name in (mw.ALEXNET, mw.VGG16, mw.LPIPS_VGG) if name != missing]
    mw.plant(empty_home, tuple(present))
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("read before the check"))
    with pytest.raises(metrics.WeightsUnavailableError) as info:
        build()
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message and missing in message and url in message and str(empty_home) in message
    assert "HF_HUB_OFFLINE" in message
    assert not loads


def _serve(monkeypatch, payload: bytes | Exception, opened: list | None = None):
    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload) if isinstance(payload, bytes) else 0)}

    def urlopen(url, timeout):
        if opened is not None:
            opened.append(url)
        if isinstance(payload, Exception):
            raise payload
        return Response(payload)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(_weights, "_urlopen", urlopen)


def _saved(name: str) -> bytes:
    buffer = io.BytesIO()
    torch.save(mw.state_dict(name), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("digits", [64, 8])
def test_a_missing_file_is_downloaded_checked_and_moved_into_place(empty_home, monkeypatch, digits):
    payload = _saved(mw.LPIPS_ALEX)
    spec = replace(_weights.LPIPS_ALEX, sha256=hashlib.sha256(payload).hexdigest()[:digits])
    opened: list[str] = []
    _serve(monkeypatch, payload, opened)
    path = _weights.locate(spec)
    assert path == empty_home / mw.LPIPS_ALEX and path.read_bytes() == payload
    assert opened == [spec.url]
    assert sorted(p.name for p in empty_home.iterdir()) == [mw.LPIPS_ALEX]  # no temporary file left
    _weights.locate(spec)  # present now: not fetched again
    assert opened == [spec.url]


def test_a_download_with_another_sha256_is_refused_and_not_kept(empty_home, monkeypatch):
    mw.plant(empty_home, (mw.ALEXNET,))
    _serve(monkeypatch, _saved(mw.LPIPS_ALEX))  # random heads, not the lpips package's file
    with pytest.raises(metrics.InvalidWeightsError, match=f"SHA-256 .* expected {_weights.LPIPS_ALEX.sha256}"):
        metrics.LPIPS("alex")
    assert sorted(p.name for p in empty_home.iterdir()) == [mw.ALEXNET]


def test_a_prefix_mismatch_is_refused(empty_home, monkeypatch):
    _serve(monkeypatch, b"not the weights")
    with pytest.raises(metrics.InvalidWeightsError, match=r"expected 6726825d\.\.\."):
        _weights.locate(_weights.FID_INCEPTION)
    assert list(empty_home.iterdir()) == []


def test_no_network_is_the_same_one_line_error(empty_home, monkeypatch):
    _serve(monkeypatch, urllib.error.URLError("no route to host"))
    with pytest.raises(metrics.WeightsUnavailableError) as info:
        metrics.FrechetInceptionDistance()
    message = str(info.value)
    assert "no route to host" in message and _weights.FID_INCEPTION.url in message and "\n" not in message
    assert list(empty_home.iterdir()) == []


def test_a_truncated_file_names_the_file(empty_home):
    mw.plant(empty_home, (mw.ALEXNET, mw.LPIPS_ALEX))
    path = empty_home / mw.ALEXNET
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(metrics.InvalidWeightsError, match="not a readable PyTorch weights file") as info:
        metrics.LPIPS("alex")
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_file_of_another_network_names_the_expected_keys(empty_home):
    mw.plant(empty_home, (mw.LPIPS_ALEX,))
    torch.save(mw.state_dict(mw.VGG16), empty_home / mw.ALEXNET)
    with pytest.raises(metrics.InvalidWeightsError, match="is not torchvision's AlexNet") as info:
        metrics.LPIPS("alex")
    message = str(info.value)
    assert "wrong shape" in message and "features.0.weight" in message and "\n" not in message


# --- imports -----------------------------------------------------------------------------------------


def test_imports_stay_light_and_metrics_work_without_scipy():
    code = (
        "import sys\n"
        "import vae_toolkit\n"
        "assert 'vae_toolkit.metrics' not in sys.modules\n"
        "sys.modules['scipy'] = None\n"  # as if scipy were not installed
        "import torch\n"
        "from vae_toolkit import metrics\n"
        "assert not {'scipy', 'torchvision', 'lpips', 'pytorch_fid'} & {m for m in sys.modules if sys.modules[m]}\n"
        "print(float(metrics.psnr(torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.1))))\n"
        "try:\n"
        "    metrics.frechet_distance([0.0], [[1.0]], [0.0], [[1.0]])\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "vae-toolkit[eval]" in proc.stdout
