"""vae_toolkit.kid: KID equal to torch-fidelity's definition (unbiased MMD², cubic polynomial kernel, gamma 1/d,
coef 1, seeded subsets), checked against the definition written out here, against values torch-fidelity 0.4.0
computed, and against torch-fidelity live where it imports.
"""

from __future__ import annotations

import importlib.util

import metric_weights as mw
import numpy as np
import pytest
import torch

from vae_toolkit import kid, metrics

# every test here reads the seeded Inception weights (tests/conftest.py: inception_home)
pytestmark = pytest.mark.usefixtures("inception_torch_home")


def _features() -> tuple[np.ndarray, np.ndarray]:
    """The features of the recorded references: ``np.random.RandomState(0)``, 40 and 30 rows of 16."""
    rng = np.random.RandomState(0)
    return rng.randn(40, 16), rng.randn(30, 16) * 1.3 + 0.2


def _definition(a: np.ndarray, b: np.ndarray, subsets: int, size: int, seed: int) -> tuple[float, float]:
    """KID from its published definition, pair by pair: for each seeded subset, the mean of k over ordered pairs of
    distinct rows within each set, minus twice the mean of k over all pairs across the sets."""
    rng = np.random.RandomState(seed)
    d = a.shape[1]

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        xx = sum(k(x[i], x[j]) for i in range(size) for j in range(size) if i != j) / (size * (size - 1))
        yy = sum(k(y[i], y[j]) for i in range(size) for j in range(size) if i != j) / (size * (size - 1))
        xy = sum(k(x[i], y[j]) for i in range(size) for j in range(size)) / (size * size)
        values.append(xx + yy - 2 * xy)
    return float(np.mean(values)), float(np.std(values))


@pytest.mark.parametrize("subsets, size, seed", [(7, 12, 2020), (3, 30, 5), (4, 2, 1)])
def test_kid_is_its_definition(subsets, size, seed):
    a, b = _features()
    got = kid.kernel_inception_distance(a, b, subsets=subsets, subset_size=size, seed=seed)
    assert got == pytest.approx(_definition(a, b, subsets, size, seed), rel=1e-10, abs=1e-12)


# torch_fidelity.metric_kid.kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=7,
# kid_subset_size=12, rng_seed=2020, verbose=False) with torch-fidelity 0.4.0, numpy 2.4, on _features() (float64)
TORCH_FIDELITY = {
    (7, 12, 2020): (0.3136474793942175, 0.34083005703812624),
    (3, 30, 5): (0.5049862161461632, 0.07650370684424843),
}


@pytest.mark.parametrize("settings", list(TORCH_FIDELITY))
def test_kid_equals_torch_fidelitys_recorded_values(settings):
    a, b = _features()
    subsets, size, seed = settings
    got = kid.kernel_inception_distance(torch.from_numpy(a), b, subsets=subsets, subset_size=size, seed=seed)
    assert got == pytest.approx(TORCH_FIDELITY[settings], rel=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity is not installed here")
def test_kid_equals_torch_fidelity_live():
    from torch_fidelity.metric_kid import kid_features_to_metric

    a, b = _features()
    out = kid_features_to_metric(
        torch.from_numpy(a), torch.from_numpy(b), kid_subsets=6, kid_subset_size=20, rng_seed=2020, verbose=False
    )
    expected = (out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"])
    assert kid.kernel_inception_distance(a, b, subsets=6, subset_size=20) == pytest.approx(expected, rel=1e-12)


def test_two_draws_of_one_distribution_give_a_kid_near_zero_and_defaults_are_torch_fidelitys():
    rng = np.random.RandomState(1)
    mean, _ = kid.kernel_inception_distance(rng.randn(300, 4), rng.randn(300, 4), subsets=5, subset_size=200)
    assert abs(mean) < 0.05
    assert (kid.KID_SUBSETS, kid.KID_SUBSET_SIZE, kid.KID_SEED) == (100, 1000, 2020)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"subset_size": 31}, r"KID subset_size 31 is larger than a set: 40 and 30 images; pass subset_size=30"),
        ({"subset_size": 1}, "subset_size must be an int of at least 2, got 1"),
        ({"subsets": 0, "subset_size": 5}, "subsets must be an int of at least 1, got 0"),
        ({"subset_size": 5.0}, r"subset_size must be an int of at least 2, got 5\.0"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, match):
    a, b = _features()
    with pytest.raises(ValueError, match=match):
        kid.kernel_inception_distance(a, b, **kwargs)


def test_features_of_different_dimensions_are_refused():
    a, b = _features()
    with pytest.raises(ValueError, match="differ in dimension: 16 and 8"):
        kid.kernel_inception_distance(a, b[:, :8], subset_size=5)
    with pytest.raises(ValueError, match=r"features1 must be features \[N, d\], got shape \(40,\)"):
        kid.kernel_inception_distance(a[:, 0], b, subset_size=5)


def test_the_module_is_the_function_on_inception_features():
    real, fake = mw.fid_sets(4)
    module = kid.KernelInceptionDistance(64, subsets=5, subset_size=3, input_range=(0, 255))
    module.update(((real + 1) * 127.5).round().to(torch.uint8), True)
    module(((fake + 1) * 127.5).round().to(torch.uint8), real=False)
    assert (module.num_real, module.num_fake) == (4, 4)
    expected = kid.kernel_inception_distance(
        metrics.inception_features(real, 64), metrics.inception_features(fake, 64), subsets=5, subset_size=3
    )
    assert module.compute() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    module.reset(real=False)
    assert (module.num_real, module.num_fake) == (4, 0)
    with pytest.raises(ValueError, match="larger than a set: 4 and 0 images"):
        module.compute()
    with pytest.raises(ValueError, match=r"features must be a tensor \[N, 64\], got \(2, 3\)"):
        module.update_features(torch.zeros(2, 3), real=True)
