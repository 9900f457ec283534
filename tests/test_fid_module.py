"""FrechetInceptionDistance as torchmetrics' users and pytorch-fid's files expect it: an nn.Module, ``update(images,
real)``, uint8, ``reset(real=False)``, and statistics saved and loaded in pytorch-fid's ``.npz`` layout.

Inception weights are seeded random tensors in a temporary ``TORCH_HOME``; 64-d features keep the tests fast.
"""

from __future__ import annotations

import importlib.util
import logging

import metric_weights as mw
import numpy as np
import pytest
import torch

from vae_toolkit import metrics

# every test here reads the seeded Inception weights (tests/conftest.py: inception_home)
pytestmark = pytest.mark.usefixtures("inception_torch_home")


@pytest.fixture(scope="module")
def sets(inception_home):
    """Real and generated sets (5 images each) and their 64-d features, computed once."""
    real, fake = mw.fid_sets(5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(inception_home))
        return real, fake, metrics.inception_features(real, 64), metrics.inception_features(fake, 64)


def _acc(real_features, fake_features, **kwargs) -> metrics.FrechetInceptionDistance:
    fid = metrics.FrechetInceptionDistance(64, **kwargs)
    fid.update_features(real_features, real=True)
    fid.update_features(fake_features, real=False)
    return fid


def test_it_is_a_module_whose_sums_follow_the_device_and_stay_float64(sets):
    _, _, rf, ff = sets
    fid = _acc(rf, ff)
    assert isinstance(fid, torch.nn.Module)
    before = fid.compute()
    assert fid.to("cpu") is fid and fid.float() is fid and fid.half() is fid
    assert all(t.dtype == torch.float64 for t in (*fid._sums.values(), *fid._outer.values()))
    assert fid.compute() == before
    fid.to("meta")
    assert {t.device.type for t in fid._sums.values()} == {"meta"}


def test_update_takes_real_by_position_keyword_and_call(sets):
    real, fake, rf, ff = sets
    positional, keyword, called = (metrics.FrechetInceptionDistance(64) for _ in range(3))
    positional.update(real[:2], True)
    positional.update(fake[:2], False)
    keyword.update(real[:2], real=True)
    keyword.update(fake[:2], real=False)
    called(real[:2], True)
    called(fake[:2], real=False)
    for fid in (positional, keyword, called):
        assert (fid.num_real, fid.num_fake) == (2, 2)
        np.testing.assert_allclose(fid.statistics(True)[0], rf[:2].double().mean(0).numpy(), rtol=1e-6, atol=1e-7)


def test_uint8_images_declared_as_levels_give_the_statistics_of_signed_ones(sets):
    real, _, rf, _ = sets
    fid = metrics.FrechetInceptionDistance(64, input_range=(0, 255))
    fid.update(((real + 1) * 127.5).round().to(torch.uint8), True)
    mu, sigma = fid.statistics(True)
    act = rf.double().numpy()
    np.testing.assert_allclose(mu, act.mean(0), rtol=1e-5, atol=1e-5 * np.abs(act).max())
    np.testing.assert_allclose(sigma, np.cov(act, rowvar=False), rtol=0, atol=1e-4 * np.abs(np.cov(act.T)).max())


def test_reset_keeps_the_real_set_when_asked(sets):
    _, _, rf, ff = sets
    fid = _acc(rf, ff)
    reference = fid.compute()
    fid.reset(real=False)
    assert (fid.num_real, fid.num_fake) == (5, 0)
    fid.update_features(ff, real=False)
    assert fid.compute() == pytest.approx(reference, rel=1e-12)
    fid.reset()
    assert (fid.num_real, fid.num_fake) == (0, 0)
    kept = _acc(rf, ff, reset_real_features=False)  # torchmetrics' reset_real_features=False
    kept.reset()
    assert (kept.num_real, kept.num_fake) == (5, 0)
    kept.reset(real=True)
    assert kept.num_real == 0


def test_saved_statistics_are_pytorch_fids_npz_and_load_back(tmp_path, sets):
    _, _, rf, ff = sets
    fid = _acc(rf, ff)
    path = fid.save_statistics(tmp_path / "real.npz")
    assert path == tmp_path / "real.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["real.npz"]
    with np.load(path) as f:  # what pytorch-fid's calculate_fid_given_paths reads: f["mu"][:], f["sigma"][:]
        assert set(f.files) == {"mu", "sigma", "num_images"} and int(f["num_images"]) == 5
        mu, sigma = f["mu"][:], f["sigma"][:]
    expected_mu, expected_sigma = fid.statistics(True)
    assert mu.dtype == np.float64 and np.array_equal(mu, expected_mu) and np.array_equal(sigma, expected_sigma)
    loaded = metrics.FrechetInceptionDistance(64)
    loaded.load_statistics(path)
    loaded.update_features(ff, real=False)
    assert loaded.num_real == 5
    assert loaded.compute() == fid.compute()
    assert loaded.all_reduce().compute() == fid.compute()  # one process: a copy, loaded statistics included


def test_statistics_without_a_count_load_and_skip_the_bias_warning(tmp_path, sets, caplog):
    _, _, rf, ff = sets
    fid = _acc(rf, ff)
    mu, sigma = fid.statistics(True)
    np.savez_compressed(tmp_path / "paper.npz", mu=mu.astype(np.float32), sigma=sigma)  # float32, as some papers
    loaded = metrics.FrechetInceptionDistance(64)
    loaded.load_statistics(tmp_path / "paper.npz")
    loaded.update_features(ff, real=False)
    assert loaded.num_real == 0
    with caplog.at_level(logging.WARNING, logger="vae_toolkit.metrics"):
        value = loaded.compute()
    assert value == pytest.approx(fid.compute(), rel=1e-5)
    assert any("over 0 real and 5 generated" in r.getMessage() for r in caplog.records)


def test_a_loaded_set_takes_no_images_until_reset(tmp_path, sets):
    real, _, rf, ff = sets
    _acc(rf, ff).save_statistics(tmp_path / "real.npz")
    fid = metrics.FrechetInceptionDistance(64)
    fid.load_statistics(tmp_path / "real.npz")
    with pytest.raises(ValueError, match=r"the real set holds statistics loaded from a file.*reset\(real=True\)"):
        fid.update(real, True)
    with pytest.raises(ValueError, match="cannot merge FID accumulators: the real set was loaded"):
        fid.merge(_acc(rf, ff))
    fid.reset(real=True)
    fid.update_features(rf, real=True)
    assert fid.num_real == 5


@pytest.mark.parametrize(
    "content, error, match",
    [
        (None, FileNotFoundError, "missing.npz"),
        (b"not a zip", ValueError, r"is not readable as statistics .*'mu' \[d\] and 'sigma' \[d, d\]"),
        ({"features": np.zeros((2, 64))}, ValueError, r"holds \['features'\], not statistics"),
        ({"mu": np.zeros(64), "sigma": np.zeros((64, 3))}, ValueError, r"mu of shape \(64,\) and sigma of shape"),
        ({"mu": np.zeros(2048), "sigma": np.zeros((2048, 2048))}, ValueError,
         r"2048-d features, this accumulator has dims=64; create it with FrechetInceptionDistance\(dims=2048\)"),
        ("npy", ValueError, "holds a single array"),
    ],
)  # fmt: skip
def test_a_file_that_is_not_statistics_is_a_clear_error(tmp_path, content, error, match):
    path = tmp_path / ("missing.npz" if content is None else "stats.npz")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    with pytest.raises(error, match=match):
        metrics.FrechetInceptionDistance(64).load_statistics(path)


@pytest.mark.skipif(importlib.util.find_spec("pytorch_fid") is None, reason="pytorch-fid is not installed here")
def test_pytorch_fid_reads_the_saved_statistics(tmp_path, sets):
    from pytorch_fid.fid_score import calculate_frechet_distance

    _, _, rf, ff = sets
    fid = _acc(rf, ff)
    fid.save_statistics(tmp_path / "real.npz")
    fid.save_statistics(tmp_path / "fake.npz", real=False)
    with np.load(tmp_path / "real.npz") as a, np.load(tmp_path / "fake.npz") as b:
        value = calculate_frechet_distance(a["mu"][:], a["sigma"][:], b["mu"][:], b["sigma"][:])
    assert value == pytest.approx(fid.compute(), rel=1e-12)
