"""LPIPS ``net="squeeze"``: SqueezeNet 1.1 and lpips' seven heads, equal to the lpips package on the same weights.

As ``tests/test_metrics.py`` does for AlexNet and VGG-16: seeded random weights in the real files' layout
(``tests/metric_weights.py``: torchvision's ``squeezenet1_1-b8a52dc0.pth`` keys, lpips' ``squeeze.pth`` keys)
are planted in a temporary ``TORCH_HOME`` (offline), and the values are compared with those lpips 0.1.4 computed
on them (recorded below) and, where lpips and torchvision import, with lpips live, also on lpips' own heads file.

The recorded values came from :func:`lpips_reference` run in a scratch environment (torch 2.13.0, torchvision
0.28.0 with its ``_meta_registrations.py`` emptied, lpips 0.1.4; see ``tests/data/make_metric_references.py``).
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import metric_weights as mw
import numpy as np
import pytest
import torch

from vae_toolkit import _weights, metrics
from vae_toolkit._backbones import SqueezeNet11Features, min_side
from vae_toolkit.eval_perceptual import plan

#: lpips 0.1.4 ``LPIPS(net="squeeze")`` on ``mw.lpips_images(0)`` with the planted weights (float32 values).
SQUEEZE_VALUES = [0.33970367908477783, 0.353177011013031, 0.3716234564781189]
#: ... on ``mw.lpips_images(4, n=2, size=(17, 23))``: the smallest height SqueezeNet 1.1 takes.
SQUEEZE_VALUES_17 = [0.2677212655544281, 0.28644445538520813]
#: The gradient of the sum of :data:`SQUEEZE_VALUES` with respect to the first batch: some entries (flat indices),
#: the sum of absolute values and the largest absolute value.
SQUEEZE_GRAD_AT = {
    228: 0.00023541427799500525,
    566: -0.00045833532931283116,
    1040: 0.0007688499754294753,
    3728: 0.0008545916643925011,
    4254: -0.001208626781590283,
    7063: -0.0001050893115461804,
    8801: 0.001006132224574685,
    11753: -0.0006133989663794637,
}
SQUEEZE_GRAD_ABS_SUM = 13.490546124020035
SQUEEZE_GRAD_MAX = 0.02230316959321499


@pytest.fixture(scope="module")
def planted_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("torch_home")
    mw.plant(home / "hub" / "checkpoints")
    return home


@pytest.fixture(autouse=True)
def _torch_home(planted_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(planted_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _importable(*names: str) -> bool:
    try:
        for name in names:
            __import__(name)
    except Exception:  # torchvision may fail to import against a CPU torch build
        return False
    return True


def lpips_reference(folder: Path, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """lpips 0.1.4's ``LPIPS(net="squeeze")`` of ``x``, ``y`` with the backbone and heads files in ``folder``:
    values and the gradient of their sum with respect to ``x``. Imports lpips and torchvision, not vae_toolkit."""
    import lpips
    import torchvision

    backbone = torch.load(folder / mw.SQUEEZENET1_1, map_location="cpu")
    heads = torch.load(folder / mw.LPIPS_SQUEEZE, map_location="cpu")  # lpips' own file was saved from CUDA
    tv_model = torchvision.models.squeezenet1_1()  # the planted layout is torchvision's: it loads strictly
    tv_model.features.load_state_dict(
        {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}, strict=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecated `pretrained` argument inside lpips
        model = lpips.LPIPS(
            net="squeeze", version="0.1", lpips=True, pnet_rand=True, model_path=str(folder / mw.LPIPS_SQUEEZE)
        )
    state = {}
    for key in model.net.state_dict():
        _, rest = key.split(".", 1)  # sliceK.<index in features>.<...>
        state[key] = backbone[f"features.{rest}"]
    model.net.load_state_dict(state, strict=True)
    assert len(model.lins) == 7
    for k, lin in enumerate(model.lins):
        assert torch.equal(lin.model[1].weight, heads[f"lin{k}.model.1.weight"])
    model.eval()
    x = x.clone().requires_grad_(True)
    values = model(x, y).flatten()
    values.sum().backward()
    return values.detach().double().numpy(), x.grad.numpy()


def test_squeeze_values_and_gradients_equal_the_lpips_package():
    x, y = mw.lpips_images(0)
    x.requires_grad_(True)
    values = metrics.lpips(x, y, net="squeeze")
    values.sum().backward()
    np.testing.assert_allclose(values.detach().double().numpy(), SQUEEZE_VALUES, rtol=0, atol=1e-5)
    grad = x.grad.flatten().double().numpy()
    for index, expected in SQUEEZE_GRAD_AT.items():
        assert abs(grad[index] - expected) <= 1e-4 * SQUEEZE_GRAD_MAX, index
    assert np.abs(grad).sum() == pytest.approx(SQUEEZE_GRAD_ABS_SUM, rel=1e-4)
    assert np.abs(grad).max() == pytest.approx(SQUEEZE_GRAD_MAX, rel=1e-4)


def test_squeeze_takes_17x17_images_and_refuses_16x16():
    np.testing.assert_allclose(
        metrics.LPIPS("squeeze")(*mw.lpips_images(4, n=2, size=(17, 23))).numpy(), SQUEEZE_VALUES_17, atol=1e-5
    )
    with pytest.raises(ValueError, match=r"LPIPS \(SqueezeNet 1.1\) needs images of at least 17x17.*16x16"):
        metrics.lpips(*mw.lpips_images(4, n=1, size=(16, 16)), net="squeeze")


def test_min_side_of_squeezenet_is_where_the_network_first_runs():
    net = SqueezeNet11Features().eval()
    side = min_side(net.features)
    with torch.no_grad():
        for size in (side - 2, side - 1):
            with pytest.raises(RuntimeError):
                net(torch.zeros(1, 3, size, size))
        for size in range(side, side + 12):  # ceil-mode pools: every size from there on runs
            assert [o.shape[1] for o in net(torch.zeros(1, 3, size, size))] == list(net.channels)
    assert side == 17


@pytest.mark.skipif(not _importable("lpips", "torchvision"), reason="lpips and torchvision are not importable here")
def test_squeeze_equals_the_lpips_package_live(planted_home, tmp_path):
    folder = planted_home / "hub" / "checkpoints"
    x, y = mw.lpips_images(0)
    values, grad = lpips_reference(folder, x, y)
    x.requires_grad_(True)
    ours = metrics.LPIPS("squeeze")(x, y)
    ours.sum().backward()
    np.testing.assert_allclose(ours.detach().numpy(), values, rtol=0, atol=1e-5)
    assert np.abs(x.grad.numpy() - grad).max() <= 1e-4 * np.abs(grad).max()
    # lpips' own heads file (the one the library downloads): its tensors load, and the values agree
    import lpips

    own = Path(lpips.__file__).parent / "weights" / "v0.1" / "squeeze.pth"
    assert hashlib.sha256(own.read_bytes()).hexdigest() == _weights.LPIPS_SQUEEZE.sha256
    home = tmp_path / "home"
    mw.plant(home / "hub" / "checkpoints", (mw.SQUEEZENET1_1,))
    shutil.copy(own, home / "hub" / "checkpoints" / mw.LPIPS_SQUEEZE)
    values, _ = lpips_reference(home / "hub" / "checkpoints", x.detach(), y)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        np.testing.assert_allclose(metrics.LPIPS("squeeze")(x.detach(), y).numpy(), values, rtol=0, atol=1e-5)


def test_squeeze_parameters_are_the_files_tensors_frozen():
    module = metrics.LPIPS("squeeze")
    backbone, heads = mw.state_dict(mw.SQUEEZENET1_1), mw.state_dict(mw.LPIPS_SQUEEZE)
    features = {k: v for k, v in backbone.items() if k.startswith("features.")}
    assert module.net.state_dict().keys() == features.keys()
    for key, value in features.items():
        assert torch.equal(module.net.state_dict()[key], value)
    assert len(module.heads) == 7 and [h.model[1].in_channels for h in module.heads] == list(module.net.channels)
    for key, value in heads.items():
        assert torch.equal(module.state_dict()[key], value)
    assert not any(p.requires_grad for p in module.parameters())


def test_squeeze_weight_files_are_torchvisions_and_lpips_published_ones():
    backbone, heads = metrics.lpips_weight_files("squeeze")
    assert (backbone.name, backbone.url, backbone.sha256) == (
        "squeezenet1_1-b8a52dc0.pth",
        "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
        "b8a52dc0",
    )
    assert (
        heads.url
        == "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/squeeze.pth"
    )
    assert heads.name == "lpips-v0.1-squeeze.pth"
    assert heads.sha256 == "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76"  # lpips 0.1.4's file


@pytest.mark.parametrize("missing", [mw.SQUEEZENET1_1, mw.LPIPS_SQUEEZE])
def test_a_missing_squeeze_file_offline_names_its_address(tmp_path, monkeypatch, missing):
    folder = tmp_path / "hub" / "checkpoints"
    mw.plant(folder, tuple(n for n in (mw.SQUEEZENET1_1, mw.LPIPS_SQUEEZE) if n != missing))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metrics, "_LPIPS_CACHE", {})
    spec = _weights.SQUEEZENET1_1 if missing == mw.SQUEEZENET1_1 else _weights.LPIPS_SQUEEZE
    with pytest.raises(metrics.WeightsUnavailableError, match=f"{missing}.*download {spec.url}"):
        metrics.LPIPS("squeeze")
    with pytest.raises(metrics.WeightsUnavailableError, match=missing):
        plan("squeeze", False)


def test_evaluate_plans_squeeze_and_refuses_unknown_nets():
    assert plan("squeeze", False).lpips == "squeeze"
    with pytest.raises(ValueError, match="'alex', 'vgg', 'squeeze' or 'none'"):
        plan("resnet", False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'alex', 'vgg' or 'squeeze'"):
        metrics.LPIPS("resnet")  # type: ignore[arg-type]
