"""The latent conventions of the diffusers autoencoder classes vae-toolkit loads.

Each diffusers pipeline turns its autoencoder's raw latent into the tensor its denoiser sees in its own way:
Stable Diffusion scales, SD3 and FLUX.1 shift and scale, FLUX.2 patchifies and batch-normalises, Qwen-Image and
Wan normalise each channel, SANA and HunyuanImage scale. This module describes that once per class, as one small
class per family (in the spirit of ComfyUI's ``comfy/latent_formats.py``); ``process_in(z)`` maps the raw latent to
the pipeline's:

- ``AutoencoderKL`` (:class:`KLFormat`, ``scale_shift``): ``(z - shift_factor) * scaling_factor``
- ``AutoencoderTiny`` (:class:`TinyFormat`, ``scale_shift``): the same, on ``encode(x).latents``
- ``AutoencoderKLFlux2`` (:class:`Flux2Format`, ``batch_norm``): ``(patchify_2x2(z) - mean) / sqrt(var + eps)``
- ``AutoencoderKLQwenImage`` (:class:`QwenImageFormat`, ``per_channel``): ``(z - latents_mean) / latents_std``
- ``AutoencoderKLWan`` (:class:`WanFormat`, ``per_channel``): the same
- ``AutoencoderDC`` (:class:`DCFormat`, ``scale``): ``z * scaling_factor``, on ``encode(x).latent``
- ``AutoencoderKLHunyuanImage`` (:class:`HunyuanImageFormat`, ``scale``): ``z * scaling_factor``

``process_out`` is the exact inverse, as each pipeline decodes. :func:`latent_format` reads the format of a model
from its class and ``config`` (and, for FLUX.2, its ``bn`` buffers); ``to_dict`` / :meth:`LatentFormat.from_dict`
carry it through JSON (a dataset store's metadata). diffusers is never imported here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch

__all__ = [
    "SUPPORTED_CLASSES",
    "Normalization",
    "LatentFormat",
    "KLFormat",
    "TinyFormat",
    "Flux2Format",
    "QwenImageFormat",
    "WanFormat",
    "DCFormat",
    "HunyuanImageFormat",
    "UnsupportedVAEError",
    "latent_format",
    "supported_class",
    "crop_multiple",
    "describe",
]

#: The diffusers classes vae-toolkit loads, encodes with and decodes with (``config.json`` ``_class_name``).
SUPPORTED_CLASSES: tuple[str, ...] = (
    "AutoencoderKL",
    "AutoencoderKLFlux2",
    "AutoencoderKLQwenImage",
    "AutoencoderKLWan",
    "AutoencoderDC",
    "AutoencoderTiny",
    "AutoencoderKLHunyuanImage",
)

#: How a format normalises the raw latent (the ``normalization`` entry of :meth:`LatentFormat.to_dict`).
Normalization = Literal["scale_shift", "batch_norm", "per_channel", "scale"]


class UnsupportedVAEError(TypeError, ValueError):
    """A model of a class vae-toolkit has no latent format for; catch it as ``TypeError`` or ``ValueError``."""


@dataclass(frozen=True)
class LatentFormat:
    """What a diffusers autoencoder class does with its latents, and the factors it reads from the model.

    Use :func:`latent_format` to get the format of a model; the subclasses below are the families.

    Attributes:
        class_name: The diffusers class (``config.json`` ``_class_name``), one of :data:`SUPPORTED_CLASSES`.
        latent_channels: Channels of the latents :func:`vae_toolkit.latents.encode` returns (the pipeline's, so
            after FLUX.2's 2x2 patchify: 4 x 32 = 128).
        spatial_factor: Image pixels per latent pixel along each side, any patchify included (8 for SD, 16 for
            FLUX.2 and Wan 2.2's 48-channel VAE, 32 for DC-AE f32 and HunyuanImage 2.1).
        temporal_factor: Frames per latent frame of the video-shaped classes (a video of ``1 + k * t`` frames
            gives ``1 + k`` latent frames); ``None`` for image classes.
        has_posterior: Whether ``encode`` gives a distribution (``sample=True`` works); ``False`` for DC-AE and Tiny.
        video: Whether the model works on ``[N, C, T, H, W]`` videos (an image is one frame).
        image_channels: Channels of the images the model encodes (3 for RGB).
    """

    normalization: ClassVar[Normalization]
    #: Modules only ``encode`` uses; a decode-only copy of the model may leave them out.
    encoder_modules: ClassVar[tuple[str, ...]] = ("encoder",)

    class_name: str
    latent_channels: int
    spatial_factor: int
    temporal_factor: int | None = None
    has_posterior: bool = True
    video: bool = False
    image_channels: int = 3

    def __post_init__(self) -> None:
        if _FORMAT_NAMES.get(self.class_name) != type(self).__name__:
            expected = _FORMAT_NAMES.get(self.class_name)
            raise ValueError(
                f"{type(self).__name__} describes {_classes_of(type(self).__name__)}, got class_name "
                f"{self.class_name!r}" + (f"; use {expected}" if expected else f"; supported: {_listing()}")
            )
        for name in ("latent_channels", "spatial_factor", "image_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.temporal_factor is not None and (
            not isinstance(self.temporal_factor, int) or self.temporal_factor < 1
        ):
            raise ValueError(f"temporal_factor must be a positive int or None, got {self.temporal_factor!r}")

    # --- the two directions ---------------------------------------------------------------------

    def process_in(self, z: torch.Tensor) -> torch.Tensor:
        """The model's raw latent (what its ``encode`` gives) -> the latent its pipeline gives the denoiser.

        ``z`` is ``[N, C, h, w]`` or, for the video-shaped classes, ``[N, C, T, h, w]``; channels on axis 1.
        Computed in ``z``'s dtype; differentiable.
        """
        raise NotImplementedError

    def process_out(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`process_in`: a pipeline latent -> what the model's ``decode`` takes."""
        raise NotImplementedError

    # --- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description: every field, plus ``format`` and ``normalization`` names.

        Example:
            >>> latent_format(vae).to_dict()  # doctest: +SKIP
            {'format': 'KLFormat', 'normalization': 'scale_shift', 'class_name': 'AutoencoderKL',
             'latent_channels': 4, 'spatial_factor': 8, ..., 'scaling_factor': 0.18215, 'shift_factor': 0.0}
        """
        out: dict[str, Any] = {"format": type(self).__name__, "normalization": self.normalization}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> LatentFormat:
        """Rebuild a format from :meth:`to_dict`'s output (as read back from JSON).

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: an unknown ``class_name``, a ``format``/``normalization`` that does not match it, or a
                missing, unknown or invalid field.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"from_dict takes a mapping (to_dict's output), got {type(data).__name__}")
        class_name = data.get("class_name")
        cls = _FORMATS.get(class_name) if isinstance(class_name, str) else None
        if cls is None:
            raise ValueError(f"unknown latent format class_name {class_name!r}; supported: {_listing()}")
        for key, want in (("format", cls.__name__), ("normalization", cls.normalization)):
            if key in data and data[key] != want:
                raise ValueError(f"{class_name} has {key} {want!r}, got {data[key]!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - {"format", "normalization"})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ValueError(f"cannot build {cls.__name__} from this dict: {err}") from err

    @classmethod
    def from_vae(cls, vae: Any) -> LatentFormat:
        """Read the format of ``vae`` (a model of this family) from its ``config``."""
        raise NotImplementedError

    # --- helpers for subclasses -----------------------------------------------------------------

    def _check_channels(self, t: torch.Tensor, channels: int, what: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        dims = (4, 5) if self.video else (4,)
        if t.dim() not in dims or t.shape[1] != channels:
            layout = "[N, C, h, w] or [N, C, T, h, w]" if self.video else "[N, C, h, w]"
            raise ValueError(
                f"{type(self).__name__}: {what} must be {layout} with C = {channels} for {self.class_name}, "
                f"got shape {tuple(t.shape)}"
            )


# --- the families ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KLFormat(LatentFormat):
    """``AutoencoderKL`` (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1): ``latents = (z - shift_factor) * scaling_factor``.

    As the Stable Diffusion pipelines (``scaling_factor * z``; no ``shift_factor``) and SD3 / FLUX.1
    (``(z - shift_factor) * scaling_factor``) do; decode takes ``latents / scaling_factor + shift_factor``.
    A missing or ``None`` factor in the config is ``1.0`` (scale) or ``0.0`` (shift).
    """

    normalization: ClassVar[Normalization] = "scale_shift"
    encoder_modules: ClassVar[tuple[str, ...]] = ("encoder", "quant_conv")

    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_factor("scaling_factor", self.scaling_factor, nonzero=True)
        _check_factor("shift_factor", self.shift_factor, nonzero=False)

    def process_in(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def process_out(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor

    @classmethod
    def from_vae(cls, vae: Any) -> KLFormat:
        config = _config(vae)
        return cls(
            class_name="AutoencoderKL",
            latent_channels=_int(config, "latent_channels", 4),
            spatial_factor=_pow2(_get(config, "block_out_channels", None), default=8),
            image_channels=_int(config, "in_channels", 3),
            scaling_factor=_float(config, "scaling_factor", 1.0),
            shift_factor=_float(config, "shift_factor", 0.0),
        )


@dataclass(frozen=True)
class TinyFormat(KLFormat):
    """``AutoencoderTiny`` (TAESD, TAESDXL, TAESD3, TAEF1): ``.latents``, then ``(z - shift) * scale`` as KL.

    The tiny autoencoders are trained to give the scaled latents of their big model directly, so their
    ``scaling_factor`` is 1.0; the pipelines still apply it (``StableDiffusionImg2ImgPipeline.prepare_latents``,
    decode ``latents / scaling_factor``). No posterior: ``sample=True`` is refused. Images in ``[-1, 1]`` in and
    out, as every class here (the encoder maps them to TAESD's ``[0, 1]`` itself, the decoder back).
    """

    encoder_modules: ClassVar[tuple[str, ...]] = ("encoder",)

    has_posterior: bool = False

    @classmethod
    def from_vae(cls, vae: Any) -> TinyFormat:
        config = _config(vae)
        blocks = _get(config, "num_encoder_blocks", None) or _get(config, "encoder_block_out_channels", None)
        return cls(
            class_name="AutoencoderTiny",
            latent_channels=_int(config, "latent_channels", 4),
            spatial_factor=_pow2(blocks, default=8),
            image_channels=_int(config, "in_channels", 3),
            has_posterior=False,
            scaling_factor=_float(config, "scaling_factor", 1.0),
            shift_factor=_float(config, "shift_factor", 0.0),
        )


@dataclass(frozen=True)
class Flux2Format(LatentFormat):
    """``AutoencoderKLFlux2`` (FLUX.2 dev and klein): patchify 2x2, then batch-normalise with the model's ``bn``.

    ``Flux2Pipeline._encode_vae_image``: ``_patchify_latents(z)`` (``[N, C, H, W]`` -> ``[N, 4C, H/2, W/2]``), then
    ``(z - bn.running_mean) / sqrt(bn.running_var + config.batch_norm_eps)``; the decode in
    ``Flux2Pipeline.__call__`` multiplies back, adds the mean and ``_unpatchify_latents``. ``running_mean`` and
    ``running_var`` are the ``bn`` buffers as read when the format was made.
    """

    normalization: ClassVar[Normalization] = "batch_norm"
    encoder_modules: ClassVar[tuple[str, ...]] = ("encoder", "quant_conv")

    patch_size: int = 2
    running_mean: tuple[float, ...] = ()
    running_var: tuple[float, ...] = ()
    batch_norm_eps: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.running_mean) != self.latent_channels or len(self.running_var) != self.latent_channels:
            raise ValueError(
                f"Flux2Format needs {self.latent_channels} running_mean and running_var values (one per patchified "
                f"channel), got {len(self.running_mean)} and {len(self.running_var)}"
            )
        if self.latent_channels % (self.patch_size * self.patch_size):
            raise ValueError(f"latent_channels {self.latent_channels} is not a multiple of patch_size**2")

    def process_in(self, z: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        self._check_channels(z, self.latent_channels // (p * p), "z")
        n, c, h, w = z.shape
        if h % p or w % p:
            raise ValueError(f"Flux2Format: z's height and width must be multiples of {p}, got shape {tuple(z.shape)}")
        z = z.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(n, c * p * p, h // p, w // p)
        return (z - _channels(self.running_mean, z)) / self._std(z)

    def process_out(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_channels(latents, self.latent_channels, "latents")
        p = self.patch_size
        z = latents * self._std(latents) + _channels(self.running_mean, latents)
        n, c, h, w = z.shape
        z = z.reshape(n, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(n, c // (p * p), h * p, w * p)

    def _std(self, like: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(_channels(self.running_var, like) + self.batch_norm_eps)

    @classmethod
    def from_vae(cls, vae: Any) -> Flux2Format:
        config = _config(vae)
        patch = _get(config, "patch_size", (2, 2))
        sizes = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
        if len(sizes) != 2 or sizes[0] != sizes[1]:
            raise ValueError(f"AutoencoderKLFlux2 with a non-square patch_size {patch!r} is not supported")
        p = int(sizes[0])
        bn = getattr(vae, "bn", None)
        if bn is None or getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
            raise ValueError(
                "AutoencoderKLFlux2 without bn.running_mean / bn.running_var: cannot read its latent format"
            )
        channels = _int(config, "latent_channels", 32) * p * p
        return cls(
            class_name="AutoencoderKLFlux2",
            latent_channels=channels,
            spatial_factor=_pow2(_get(config, "block_out_channels", None), default=8) * p,
            image_channels=_int(config, "in_channels", 3),
            patch_size=p,
            running_mean=tuple(float(v) for v in bn.running_mean.detach().float().cpu().tolist()),
            running_var=tuple(float(v) for v in bn.running_var.detach().float().cpu().tolist()),
            batch_norm_eps=_float(config, "batch_norm_eps", 1e-4),
        )


@dataclass(frozen=True)
class QwenImageFormat(LatentFormat):
    """``AutoencoderKLQwenImage``: video-shaped; ``(z - latents_mean) / latents_std`` per channel, from the config.

    ``QwenImageEditPipeline._encode_vae_image`` normalises; ``QwenImagePipeline.__call__`` decodes
    ``latents * latents_std + latents_mean`` (written there as ``latents / (1 / std) + mean``) and takes frame 0.
    """

    normalization: ClassVar[Normalization] = "per_channel"
    encoder_modules: ClassVar[tuple[str, ...]] = ("encoder", "quant_conv")

    temporal_factor: int | None = 4
    video: bool = True
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.latents_mean) != self.latent_channels or len(self.latents_std) != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__} needs {self.latent_channels} latents_mean and latents_std values, got "
                f"{len(self.latents_mean)} and {len(self.latents_std)}"
            )
        if any(not math.isfinite(s) or s <= 0 for s in self.latents_std):
            raise ValueError(f"latents_std must be positive, got {list(self.latents_std)}")

    def process_in(self, z: torch.Tensor) -> torch.Tensor:
        self._check_channels(z, self.latent_channels, "z")
        return (z - _channels(self.latents_mean, z)) / _channels(self.latents_std, z)

    def process_out(self, latents: torch.Tensor) -> torch.Tensor:
        self._check_channels(latents, self.latent_channels, "latents")
        return latents * _channels(self.latents_std, latents) + _channels(self.latents_mean, latents)

    @classmethod
    def from_vae(cls, vae: Any) -> QwenImageFormat:
        config = _config(vae)
        down = list(_get(config, "temperal_downsample", [False, True, True]))
        return cls(
            class_name="AutoencoderKLQwenImage",
            latent_channels=_int(config, "z_dim", 16),
            spatial_factor=2 ** len(down),
            temporal_factor=2 ** sum(bool(d) for d in down),
            image_channels=_int(config, "input_channels", 3),
            latents_mean=_floats(config, "latents_mean"),
            latents_std=_floats(config, "latents_std"),
        )


@dataclass(frozen=True)
class WanFormat(QwenImageFormat):
    """``AutoencoderKLWan`` (Wan 2.1, and Wan 2.2's 48-channel VAE): as Qwen-Image, per channel from the config.

    ``WanVideoToVideoPipeline.prepare_latents`` normalises ``(z - latents_mean) * (1 / latents_std)``;
    ``WanPipeline.__call__`` decodes ``latents / (1 / latents_std) + latents_mean``. Wan 2.2's VAE patchifies
    2x2 inside the model (``patch_size``), so its spatial factor is 16 and its ``in_channels`` 12.
    """

    @classmethod
    def from_vae(cls, vae: Any) -> WanFormat:
        config = _config(vae)
        down = list(_get(config, "temperal_downsample", [False, True, True]))
        patch = _get(config, "patch_size", None) or 1
        return cls(
            class_name="AutoencoderKLWan",
            latent_channels=_int(config, "z_dim", 16),
            spatial_factor=2 ** len(down) * int(patch),
            temporal_factor=2 ** sum(bool(d) for d in down),
            image_channels=_int(config, "in_channels", 3) // (int(patch) ** 2),
            latents_mean=_floats(config, "latents_mean"),
            latents_std=_floats(config, "latents_std"),
        )


@dataclass(frozen=True)
class DCFormat(LatentFormat):
    """``AutoencoderDC`` (SANA's DC-AE): ``latents = z * scaling_factor`` on ``encode(x).latent``; no posterior.

    As ``SanaControlNetPipeline`` encodes and ``SanaPipeline.__call__`` decodes (``latents / scaling_factor``).
    """

    normalization: ClassVar[Normalization] = "scale"

    has_posterior: bool = False
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_factor("scaling_factor", self.scaling_factor, nonzero=True)

    def process_in(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scaling_factor

    def process_out(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor

    @classmethod
    def from_vae(cls, vae: Any) -> DCFormat:
        config = _config(vae)
        return cls(
            class_name="AutoencoderDC",
            latent_channels=_int(config, "latent_channels", 32),
            spatial_factor=_pow2(_get(config, "encoder_block_out_channels", None), default=32),
            image_channels=_int(config, "in_channels", 3),
            has_posterior=False,
            scaling_factor=_float(config, "scaling_factor", 1.0),
        )


@dataclass(frozen=True)
class HunyuanImageFormat(DCFormat):
    """``AutoencoderKLHunyuanImage`` (HunyuanImage 2.1, 32x): ``latents = z * scaling_factor``, with a posterior.

    ``HunyuanImagePipeline.__call__`` decodes ``latents / scaling_factor`` (it never encodes; its refiner scales
    encoded latents by ``scaling_factor`` the same way).
    """

    encoder_modules: ClassVar[tuple[str, ...]] = ("encoder",)

    has_posterior: bool = True

    @classmethod
    def from_vae(cls, vae: Any) -> HunyuanImageFormat:
        config = _config(vae)
        return cls(
            class_name="AutoencoderKLHunyuanImage",
            latent_channels=_int(config, "latent_channels", 64),
            spatial_factor=_int(config, "spatial_compression_ratio", 32),
            image_channels=_int(config, "in_channels", 3),
            scaling_factor=_float(config, "scaling_factor", 1.0),
        )


_FORMATS: dict[str, type[LatentFormat]] = {
    "AutoencoderKL": KLFormat,
    "AutoencoderKLFlux2": Flux2Format,
    "AutoencoderKLQwenImage": QwenImageFormat,
    "AutoencoderKLWan": WanFormat,
    "AutoencoderDC": DCFormat,
    "AutoencoderTiny": TinyFormat,
    "AutoencoderKLHunyuanImage": HunyuanImageFormat,
}
_FORMAT_NAMES = {name: cls.__name__ for name, cls in _FORMATS.items()}


def supported_class(vae: Any) -> str | None:
    """The supported diffusers class ``vae`` is (or subclasses), or ``None``; looked up by name, without diffusers."""
    for klass in type(vae).__mro__:
        if klass.__name__ in _FORMATS:
            return klass.__name__
    return None


def latent_format(vae: Any) -> LatentFormat:
    """The latent format of a loaded diffusers autoencoder: its class, channels, factors and normalisation.

    Reads ``type(vae).__name__`` (or a base class's name) and ``vae.config`` (and FLUX.2's ``bn`` buffers);
    diffusers is not imported.

    Raises:
        UnsupportedVAEError: ``vae`` is not one of :data:`SUPPORTED_CLASSES` (a ``TypeError`` and a ``ValueError``).
        ValueError: the config is inconsistent (for example ``latents_mean`` of the wrong length).

    Example:
        >>> fmt = latent_format(vae)  # doctest: +SKIP
        >>> fmt.spatial_factor, fmt.latent_channels, fmt.normalization
        (16, 128, 'batch_norm')
        >>> z = fmt.process_in(vae.encode(x).latent_dist.mode())  # what Flux2Pipeline gives its transformer
    """
    name = supported_class(vae)
    if name is None:
        raise UnsupportedVAEError(
            f"{type(vae).__name__} is not an autoencoder class vae-toolkit supports; supported: {_listing()}"
        )
    return _FORMATS[name].from_vae(vae)


def crop_multiple(vaes: Iterable[Any]) -> int:
    """The multiple every side of an image is cropped to so that each of ``vaes`` can encode it: the largest
    spatial factor among them, and never less than 8 (what ``encode``, ``evaluate`` and ``roundtrip`` crop to).

    A model of another class (an ``AutoencoderKL``-like wrapper) counts with the factor of its config's
    ``block_out_channels`` (8 when it has none).

    Example:
        >>> crop_multiple([sd_vae, dc_ae])  # doctest: +SKIP
        32
    """
    multiple = 8
    for vae in vaes:
        if supported_class(vae) is not None:
            factor = latent_format(vae).spatial_factor
        else:
            blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
            factor = 2 ** (len(blocks) - 1) if blocks else 8
        multiple = max(multiple, factor)
    return multiple


def describe(vae: Any) -> dict[str, Any]:
    """A model's class, latent channels and spatial factor, in a few JSON values (what ``evaluate``'s report
    shows of each model); only the class for a model of another class.

    Example:
        >>> describe(vae)  # doctest: +SKIP
        {'class_name': 'AutoencoderKLFlux2', 'latent_channels': 128, 'spatial_factor': 16}
    """
    if supported_class(vae) is None:
        return {"class_name": type(vae).__name__}
    fmt = latent_format(vae)
    return {"class_name": fmt.class_name, "latent_channels": fmt.latent_channels, "spatial_factor": fmt.spatial_factor}


# --- private helpers ------------------------------------------------------------------------------


def _listing() -> str:
    return ", ".join(SUPPORTED_CLASSES)


def _classes_of(format_name: str) -> str:
    return " / ".join(name for name, fmt in _FORMAT_NAMES.items() if fmt == format_name) or "no class"


def _channels(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a tensor shaped to broadcast over axis 1 of ``like``, in its dtype and on its device."""
    t = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _config(vae: Any) -> Any:
    config = getattr(vae, "config", None)
    if config is None:
        raise ValueError(f"{type(vae).__name__} has no config: cannot read its latent format")
    return config


def _get(config: Any, name: str, default: Any) -> Any:
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return default if value is None else value


def _int(config: Any, name: str, default: int) -> int:
    return int(_get(config, name, default))


def _float(config: Any, name: str, default: float) -> float:
    return float(_get(config, name, default))


def _floats(config: Any, name: str) -> tuple[float, ...]:
    values = _get(config, name, None)
    if values is None:
        raise ValueError(f"the config has no {name}: cannot read the latent format")
    return tuple(float(v) for v in values)


def _check_factor(name: str, value: object, *, nonzero: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (nonzero and value == 0):
        raise ValueError(f"{name} must be a finite{' non-zero' if nonzero else ''} number, got {value!r}")


def _pow2(blocks: Sequence[Any] | None, *, default: int) -> int:
    return 2 ** (len(blocks) - 1) if blocks else default
