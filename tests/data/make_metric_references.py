"""Make ``metric_references.npz``: LPIPS and FID as the reference packages compute them on seeded random weights.

The tests plant the same seeded weights (``tests/metric_weights.py``) and compare ``vae_toolkit.metrics`` with
the values stored here, so that the definitions are checked where the reference packages are not installed.

Run it in a scratch environment that has the reference packages (torchvision's models are pure Python; with
torch's CPU wheel its ``_meta_registrations.py`` must be emptied for it to import)::

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0
    /tmp/refvenv/bin/pip install --no-deps torchvision==0.28.0 lpips==0.1.4 pytorch-fid==0.3.0
    /tmp/refvenv/bin/pip install scipy numpy pillow tqdm
    : > /tmp/refvenv/lib/python3.11/site-packages/torchvision/_meta_registrations.py
    /tmp/refvenv/bin/python tests/data/make_metric_references.py

It does not import vae_toolkit. Stored (float64 unless said): ``lpips_{alex,vgg}`` (values of
``lpips.LPIPS(net=...)`` on ``metric_weights.lpips_images(0)``), ``lpips_{alex,vgg}_grad`` (float32, the
gradient of their sum with respect to the first batch), ``fid_{64,2048}`` (pytorch-fid's
``calculate_frechet_distance`` of the statistics of ``metric_weights.fid_sets()`` through its ``InceptionV3``),
``fid_features_2048_{real,fake}`` (float32, the features of each set), ``frechet_small`` (pytorch-fid's
distance of the small statistics of ``metric_weights.small_statistics()``) and ``versions``.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import metric_weights as mw  # noqa: E402


def lpips_reference(net: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import lpips
    import torchvision

    heads = mw.LPIPS_ALEX if net == "alex" else mw.LPIPS_VGG
    backbone = torch.load(folder / (mw.ALEXNET if net == "alex" else mw.VGG16), map_location="cpu")
    # the planted layout is torchvision's: its features load strictly into torchvision's model
    tv_model = torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    features = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
    tv_model.features.load_state_dict(features, strict=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecated `pretrained` argument inside lpips
        model = lpips.LPIPS(
            net=net, version="0.1", lpips=True, pnet_rand=True, model_path=str(folder / heads), verbose=False
        )
    net_state = {}
    for key in model.net.state_dict():
        _, index, param = key.split(".")  # sliceK.<index in features>.<weight|bias>
        net_state[key] = backbone[f"features.{index}.{param}"]
    model.net.load_state_dict(net_state, strict=True)
    for k, lin in enumerate(model.lins):  # the heads came from the planted file
        assert torch.equal(lin.model[1].weight, torch.load(folder / heads)[f"lin{k}.model.1.weight"])
    model.eval()

    x, y = mw.lpips_images(0)
    x = x.clone().requires_grad_(True)
    values = model(x, y).flatten()
    values.sum().backward()
    return values.detach().double().numpy(), x.grad.numpy().astype(np.float32)


def fid_reference(folder: Path) -> dict[str, np.ndarray]:
    import pytorch_fid.inception as inception
    from pytorch_fid.fid_score import calculate_frechet_distance

    state = torch.load(folder / mw.FID_INCEPTION, map_location="cpu")
    inception.load_state_dict_from_url = lambda *args, **kwargs: state  # pytorch-fid's download, served locally
    real, fake = mw.fid_sets()
    out: dict[str, np.ndarray] = {}
    for dims in (64, 2048):
        model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()
        stats = []
        for images in (real, fake):
            with torch.no_grad():
                pred = model((images + 1) / 2)[0]  # pytorch-fid takes [0, 1] images (ToTensor)
            if pred.size(2) != 1 or pred.size(3) != 1:
                pred = torch.nn.functional.adaptive_avg_pool2d(pred, output_size=(1, 1))
            act = np.empty((len(images), dims))  # float64, as get_activations
            act[:] = pred.squeeze(3).squeeze(2).cpu().numpy()
            stats.append((np.mean(act, axis=0), np.cov(act, rowvar=False)))
            if dims == 2048:
                out[f"fid_features_2048_{'real' if images is real else 'fake'}"] = act.astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # scipy's deprecated `disp`, as pytorch-fid calls it
            out[f"fid_{dims}"] = np.float64(calculate_frechet_distance(*stats[0], *stats[1]))
        print(f"fid dims {dims}: {float(out[f'fid_{dims}']):.10g}")
    mu1, s1, mu2, s2 = mw.small_statistics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out["frechet_small"] = np.float64(calculate_frechet_distance(mu1, s1, mu2, s2))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = mw.plant(Path(tmp) / "hub" / "checkpoints")
        arrays: dict[str, np.ndarray] = {}
        for net in ("alex", "vgg"):
            values, grad = lpips_reference(net, folder)
            arrays[f"lpips_{net}"], arrays[f"lpips_{net}_grad"] = values, grad
            print(f"lpips {net}: {values}")
        arrays.update(fid_reference(folder))
    packages = ("torch", "torchvision", "lpips", "pytorch-fid", "scipy", "numpy")
    arrays["versions"] = np.array(", ".join(f"{p} {version(p)}" for p in packages))
    np.savez_compressed(HERE / "metric_references.npz", **arrays)
    print(f"wrote {HERE / 'metric_references.npz'} ({arrays['versions']})")


if __name__ == "__main__":
    main()
