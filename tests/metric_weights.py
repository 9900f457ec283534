"""Seeded random weights in the key layout of the metrics' real weight files, and the images the references use.

Shared by the tests (which plant these files in a temporary ``TORCH_HOME``) and by
``tests/data/make_metric_references.py`` (which loads the same tensors into torchvision, lpips and pytorch-fid
to compute the stored reference values). Depends on torch only, so that it runs in the reference
environment, and spells the layouts out instead of taking them from the library under test.

The classifiers of torchvision's files (``classifier.*``), which the metrics do not use, are planted under their
real names but as 1-element tensors, to keep the files small; pytorch-fid's ``fc`` keeps its real shape (its
loader checks it).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

ALEXNET = "alexnet-owt-7be5be79.pth"
VGG16 = "vgg16-397923af.pth"
FID_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"
LPIPS_ALEX = "lpips-v0.1-alex.pth"
LPIPS_VGG = "lpips-v0.1-vgg.pth"
SQUEEZENET1_1 = "squeezenet1_1-b8a52dc0.pth"
LPIPS_SQUEEZE = "lpips-v0.1-squeeze.pth"
FILES = (ALEXNET, VGG16, FID_INCEPTION, LPIPS_ALEX, LPIPS_VGG, SQUEEZENET1_1, LPIPS_SQUEEZE)

_SEEDS = {
    ALEXNET: 11,
    VGG16: 12,
    FID_INCEPTION: 13,
    LPIPS_ALEX: 14,
    LPIPS_VGG: 15,
    SQUEEZENET1_1: 16,
    LPIPS_SQUEEZE: 17,
}

# (index in features, in channels, out channels, kernel) of torchvision's convolutions
_ALEX_CONVS = ((0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3))
_VGG_CONVS = tuple(
    (i, cin, cout, 3)
    for i, cin, cout in (
        (0, 3, 64),
        (2, 64, 64),
        (5, 64, 128),
        (7, 128, 128),
        (10, 128, 256),
        (12, 256, 256),
        (14, 256, 256),
        (17, 256, 512),
        (19, 512, 512),
        (21, 512, 512),
        (24, 512, 512),
        (26, 512, 512),
        (28, 512, 512),
    )
)
# (index in features, in channels, squeeze, expand1x1, expand3x3) of torchvision's SqueezeNet 1.1 Fire blocks
_FIRES = (
    (3, 64, 16, 64, 64),
    (4, 128, 16, 64, 64),
    (6, 128, 32, 128, 128),
    (7, 256, 32, 128, 128),
    (9, 256, 48, 192, 192),
    (10, 384, 48, 192, 192),
    (11, 384, 64, 256, 256),
    (12, 512, 64, 256, 256),
)
_LPIPS_CHANNELS = {
    LPIPS_ALEX: (64, 192, 384, 256, 256),
    LPIPS_VGG: (64, 128, 256, 512, 512),
    LPIPS_SQUEEZE: (64, 128, 256, 384, 384, 512, 512),
}


def _inception_convs() -> list[tuple[str, int, int, tuple[int, int]]]:
    """(name, in, out, (kh, kw)) of every ``BasicConv2d`` of torchvision's Inception3, in order."""
    convs = [
        ("Conv2d_1a_3x3", 3, 32, (3, 3)),
        ("Conv2d_2a_3x3", 32, 32, (3, 3)),
        ("Conv2d_2b_3x3", 32, 64, (3, 3)),
        ("Conv2d_3b_1x1", 64, 80, (1, 1)),
        ("Conv2d_4a_3x3", 80, 192, (3, 3)),
    ]

    def a(name: str, cin: int, pool: int) -> None:
        convs.extend(
            [
                (f"{name}.branch1x1", cin, 64, (1, 1)),
                (f"{name}.branch5x5_1", cin, 48, (1, 1)),
                (f"{name}.branch5x5_2", 48, 64, (5, 5)),
                (f"{name}.branch3x3dbl_1", cin, 64, (1, 1)),
                (f"{name}.branch3x3dbl_2", 64, 96, (3, 3)),
                (f"{name}.branch3x3dbl_3", 96, 96, (3, 3)),
                (f"{name}.branch_pool", cin, pool, (1, 1)),
            ]
        )

    def c(name: str, c7: int) -> None:
        convs.extend(
            [
                (f"{name}.branch1x1", 768, 192, (1, 1)),
                (f"{name}.branch7x7_1", 768, c7, (1, 1)),
                (f"{name}.branch7x7_2", c7, c7, (1, 7)),
                (f"{name}.branch7x7_3", c7, 192, (7, 1)),
                (f"{name}.branch7x7dbl_1", 768, c7, (1, 1)),
                (f"{name}.branch7x7dbl_2", c7, c7, (7, 1)),
                (f"{name}.branch7x7dbl_3", c7, c7, (1, 7)),
                (f"{name}.branch7x7dbl_4", c7, c7, (7, 1)),
                (f"{name}.branch7x7dbl_5", c7, 192, (1, 7)),
                (f"{name}.branch_pool", 768, 192, (1, 1)),
            ]
        )

    def e(name: str, cin: int) -> None:
        convs.extend(
            [
                (f"{name}.branch1x1", cin, 320, (1, 1)),
                (f"{name}.branch3x3_1", cin, 384, (1, 1)),
                (f"{name}.branch3x3_2a", 384, 384, (1, 3)),
                (f"{name}.branch3x3_2b", 384, 384, (3, 1)),
                (f"{name}.branch3x3dbl_1", cin, 448, (1, 1)),
                (f"{name}.branch3x3dbl_2", 448, 384, (3, 3)),
                (f"{name}.branch3x3dbl_3a", 384, 384, (1, 3)),
                (f"{name}.branch3x3dbl_3b", 384, 384, (3, 1)),
                (f"{name}.branch_pool", cin, 192, (1, 1)),
            ]
        )

    a("Mixed_5b", 192, 32)
    a("Mixed_5c", 256, 64)
    a("Mixed_5d", 288, 64)
    convs.extend(
        [
            ("Mixed_6a.branch3x3", 288, 384, (3, 3)),
            ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1)),
            ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3)),
            ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3)),
        ]
    )
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        c(name, c7)
    convs.extend(
        [
            ("Mixed_7a.branch3x3_1", 768, 192, (1, 1)),
            ("Mixed_7a.branch3x3_2", 192, 320, (3, 3)),
            ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1)),
            ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
            ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)),
            ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3)),
        ]
    )
    e("Mixed_7b", 1280)
    e("Mixed_7c", 2048)
    return convs


def _he(g: torch.Generator, cout: int, cin: int, kh: int, kw: int) -> torch.Tensor:
    return torch.randn(cout, cin, kh, kw, generator=g) * math.sqrt(2.0 / (cin * kh * kw))


def state_dict(name: str) -> dict[str, torch.Tensor]:
    """The seeded random state dict planted as ``name`` (one of :data:`FILES`)."""
    g = torch.Generator().manual_seed(_SEEDS[name])
    sd: dict[str, torch.Tensor] = {}
    if name in (ALEXNET, VGG16):
        for index, cin, cout, k in _ALEX_CONVS if name == ALEXNET else _VGG_CONVS:
            sd[f"features.{index}.weight"] = _he(g, cout, cin, k, k)
            sd[f"features.{index}.bias"] = torch.randn(cout, generator=g) * 0.05
        for index in (1, 4, 6) if name == ALEXNET else (0, 3, 6):
            sd[f"classifier.{index}.weight"] = torch.zeros(1)
            sd[f"classifier.{index}.bias"] = torch.zeros(1)
    elif name == SQUEEZENET1_1:
        sd["features.0.weight"] = _he(g, 64, 3, 3, 3)
        sd["features.0.bias"] = torch.randn(64, generator=g) * 0.05
        for index, cin, squeeze, e1, e3 in _FIRES:
            for part, (i, o, k) in (
                ("squeeze", (cin, squeeze, 1)),
                ("expand1x1", (squeeze, e1, 1)),
                ("expand3x3", (squeeze, e3, 3)),
            ):
                sd[f"features.{index}.{part}.weight"] = _he(g, o, i, k, k)
                sd[f"features.{index}.{part}.bias"] = torch.randn(o, generator=g) * 0.05
        sd["classifier.1.weight"] = torch.zeros(1)  # the final 1x1 convolution of the classifier, unused
        sd["classifier.1.bias"] = torch.zeros(1)
    elif name == FID_INCEPTION:
        for prefix, cin, cout, (kh, kw) in _inception_convs():
            sd[f"{prefix}.conv.weight"] = _he(g, cout, cin, kh, kw)
            sd[f"{prefix}.bn.weight"] = 0.5 + torch.rand(cout, generator=g)
            sd[f"{prefix}.bn.bias"] = torch.randn(cout, generator=g) * 0.1
            sd[f"{prefix}.bn.running_mean"] = torch.randn(cout, generator=g) * 0.1
            sd[f"{prefix}.bn.running_var"] = 0.5 + torch.rand(cout, generator=g)
            sd[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
        sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
        sd["fc.bias"] = torch.zeros(1008)
    elif name in _LPIPS_CHANNELS:
        for k, channels in enumerate(_LPIPS_CHANNELS[name]):
            sd[f"lin{k}.model.1.weight"] = torch.rand(1, channels, 1, 1, generator=g)
    else:
        raise ValueError(f"unknown weight file {name!r}")
    return sd


def plant(folder: Path, names: tuple[str, ...] = FILES) -> Path:
    """Write the files ``names`` into ``folder`` (a ``checkpoints`` folder) unless already there; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = folder / name
        if not path.is_file():
            torch.save(state_dict(name), path)
    return folder


def lpips_images(seed: int, n: int = 3, size: tuple[int, int] = (32, 48)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches ``[n, 3, H, W]`` in ``[-1, 1]``: smooth colour fields, the second a noisy, shifted copy."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size[0] // 4, size[1] // 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    y = (x.roll(2, dims=-1) * 0.8 + torch.randn(n, 3, *size, generator=g) * 0.2).clamp(-1, 1)
    return x.contiguous(), y.contiguous()


def fid_images(seed: int, n: int, size: int = 64, shift: float = 0.0) -> torch.Tensor:
    """A batch ``[n, 3, size, size]`` of whole-level images in ``[-1, 1]`` (``u / 127.5 - 1`` of uint8 ``u``)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=g) * 255
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = (x + torch.randn(n, 3, size, size, generator=g) * 20 + shift).clamp(0, 255).round()
    return x / 127.5 - 1


def fid_sets(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The real and generated sets of the FID references: ``n`` 64x64 images each, the second brighter."""
    return fid_images(21, n), fid_images(22, n, shift=30.0)


def small_statistics(dims: int = 16) -> tuple[object, ...]:
    """``(mu1, sigma1, mu2, sigma2)`` float64 numpy arrays of two seeded 40-sample sets of ``dims`` features."""
    g = torch.Generator().manual_seed(31)
    a = torch.randn(40, dims, generator=g, dtype=torch.float64)
    b = torch.randn(40, dims, generator=g, dtype=torch.float64) * 1.5 + 0.3
    out: list[object] = []
    for act in (a.numpy(), b.numpy()):
        import numpy as np

        out += [np.mean(act, axis=0), np.cov(act, rowvar=False)]
    return tuple(out)
