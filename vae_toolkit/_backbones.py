"""The networks behind LPIPS and FID, as plain ``nn.Module``s whose parameter names match the field's weight files.

- :class:`AlexNetFeatures` and :class:`VGG16Features`: torchvision's ``features`` stacks (keys
  ``features.N.weight`` / ``features.N.bias`` of ``alexnet-owt-7be5be79.pth`` and ``vgg16-397923af.pth``),
  returning the five ReLU outputs that LPIPS compares; :class:`SqueezeNet11Features`: torchvision's SqueezeNet 1.1
  ``features`` (keys ``features.N.weight`` and ``features.N.{squeeze,expand1x1,expand3x3}.{weight,bias}`` of
  ``squeezenet1_1-b8a52dc0.pth``), returning the seven outputs that LPIPS ``net="squeeze"`` compares.
- :class:`FIDInceptionV3`: Inception-v3 as pytorch-fid 0.3.0 builds it for FID (torchvision's ``Inception3``
  with the ``FIDInceptionA/C/E_1/E_2`` blocks patched to TensorFlow's pooling), keys of
  ``pt_inception-2015-12-05-6726825d.pth``, returning the pool features of one of its four blocks.

No torchvision is needed: the layers are written out here, in the order and with the names torchvision uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AlexNetFeatures",
    "FIDInceptionV3",
    "Fire",
    "SqueezeNet11Features",
    "TapFeatures",
    "VGG16Features",
    "min_side",
]


class TapFeatures(nn.Module):
    """A torchvision ``features`` stack whose :meth:`forward` returns the outputs of the layers in ``taps``."""

    channels: tuple[int, ...] = ()
    taps: tuple[int, ...] = ()
    features: nn.Sequential

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the tapped layers for ``x`` ``[N, 3, H, W]``."""
        out: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                out.append(x)
        return out


class AlexNetFeatures(TapFeatures):
    """torchvision's ``alexnet().features`` up to its fifth ReLU; :meth:`forward` returns relu1..relu5.

    The taps are the ReLUs after ``features.{0,3,6,8,10}``, the slices of the ``lpips`` package.
    """

    channels = (64, 192, 384, 256, 256)
    taps = (1, 4, 7, 9, 11)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )


class VGG16Features(TapFeatures):
    """torchvision's ``vgg16().features`` up to relu5_3; :meth:`forward` returns relu1_2, relu2_2, relu3_3,
    relu4_3 and relu5_3 (after ``features.{2,7,14,21,28}``), the slices of the ``lpips`` package."""

    channels = (64, 128, 256, 512, 512)
    taps = (3, 8, 15, 22, 29)
    _config = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in self._config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(item, int)
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)


class Fire(nn.Module):
    """torchvision's SqueezeNet ``Fire`` block: a 1x1 squeeze convolution and ReLU, then 1x1 and 3x3 expand
    convolutions, each with a ReLU, concatenated over channels (the spatial size is kept)."""

    def __init__(self, in_channels: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze, kernel_size=1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, kernel_size=1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x), inplace=True)
        return torch.cat([F.relu(self.expand1x1(x), inplace=True), F.relu(self.expand3x3(x), inplace=True)], 1)


class SqueezeNet11Features(TapFeatures):
    """torchvision's ``squeezenet1_1().features``; :meth:`forward` returns the seven outputs the ``lpips``
    package's ``squeezenet`` slices end on: the first ReLU (``features.1``) and the ``Fire`` blocks
    ``features.{4,7,9,10,11,12}``.

    The max pools round up (``ceil_mode=True``), as torchvision's.
    """

    channels = (64, 128, 256, 384, 384, 512, 512)
    taps = (1, 4, 7, 9, 10, 11, 12)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(128, 32, 128, 128),
            Fire(256, 32, 128, 128),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(256, 48, 192, 192),
            Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256),
        )


def min_side(features: nn.Sequential) -> int:
    """The smallest side (pixels) for which every layer of ``features`` has an output of at least 1x1.

    Convolutions and max pools change the size (a pool with ``ceil_mode`` rounds up as PyTorch does, its last
    window starting inside the input); other layers, ``Fire`` blocks included, keep it.
    """

    def out(size: int) -> int:
        for layer in features:
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
                k, s, p = (_first(getattr(layer, name)) for name in ("kernel_size", "stride", "padding"))
                if getattr(layer, "ceil_mode", False):
                    rounded_up = -(-(size + 2 * p - k) // s) + 1
                    size = rounded_up - 1 if (rounded_up - 1) * s >= size + p else rounded_up
                else:
                    size = (size + 2 * p - k) // s + 1
                if size < 1:
                    return 0
        return size

    side = 1
    while out(side) < 1:
        side += 1
    return side


def _first(value: int | tuple[int, ...] | str) -> int:
    if isinstance(value, str):  # padding="same" does not occur in these networks
        raise TypeError(f"unexpected padding {value!r}")
    return value if isinstance(value, int) else value[0]


# --- Inception-v3 for FID -------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU: torchvision's ``inception.BasicConv2d``."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pooling, stride 1, padding 1, not counting the padded zeros (TensorFlow's, as pytorch-fid)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """pytorch-fid's ``FIDInceptionA`` (torchvision's ``InceptionA``, pool without the padded zeros)."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """torchvision's ``InceptionB`` (``Mixed_6a``), unchanged by pytorch-fid."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
    """pytorch-fid's ``FIDInceptionC`` (torchvision's ``InceptionC``, pool without the padded zeros)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """torchvision's ``InceptionD`` (``Mixed_7a``), unchanged by pytorch-fid."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """pytorch-fid's ``FIDInceptionE_1`` (``max_pool=False``: average pool without the padded zeros) or
    ``FIDInceptionE_2`` (``max_pool=True``: 3x3 max pool, as the TensorFlow graph of the FID weights has)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid 0.3.0's ``InceptionV3`` with ``use_fid_inception=True``, without its resizing and scaling.

    :meth:`forward` takes images already resized to 299x299 and scaled to ``[-1, 1]`` and returns the
    ``[N, dims]`` features of the block pytorch-fid assigns to ``dims`` (64: first max pool, 192: second max
    pool, 768: before the auxiliary classifier, 2048: the final average pool), average-pooled to 1x1 as
    pytorch-fid's ``get_activations`` does. Parameter names are those of torchvision's ``Inception3`` that
    pytorch-fid's weight file uses (its ``fc`` classifier is not part of this module).
    """

    #: pytorch-fid's ``InceptionV3.BLOCK_INDEX_BY_DIM``.
    BLOCK_BY_DIMS = {64: 0, 192: 1, 768: 2, 2048: 3}

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor, dims: int = 2048) -> torch.Tensor:
        """``[N, dims]`` features of ``x`` ``[N, 3, 299, 299]`` in ``[-1, 1]``."""
        block = self.BLOCK_BY_DIMS[dims]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        if block >= 1:
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        if block >= 2:
            mixed: tuple[nn.Module, ...] = (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b)
            for layer in (*mixed, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
                x = layer(x)
        if block >= 3:
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)
