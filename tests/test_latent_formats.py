"""vae_toolkit.latent_formats and latents for every supported class, checked against the diffusers pipelines' own code.

The references are the pipelines' lines, read from the installed diffusers' source files and run here: the pipeline
modules import ``transformers`` (not a dependency), so they are never imported; each reference names the file,
the function and the statements it runs, and fails loudly if diffusers moves them.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import json
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
import torch

from vae_toolkit import VAEToolkitWarning, latents
from vae_toolkit.latent_formats import (
    SUPPORTED_CLASSES,
    LatentFormat,
    UnsupportedVAEError,
    latent_format,
)

# --- tiny random models of every class ------------------------------------------------------------

WAN_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508]
WAN_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743]

TINY: dict[str, dict] = {
    "AutoencoderKL": dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ),
    "AutoencoderKLFlux2": dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=32,
        batch_norm_eps=1e-4,
        patch_size=(2, 2),
    ),
    "AutoencoderKLQwenImage": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=WAN_MEAN[:4],
        latents_std=WAN_STD[:4],
    ),
    "AutoencoderKLWan": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=WAN_MEAN[4:],
        latents_std=WAN_STD[4:],
        scale_factor_spatial=4,
        scale_factor_temporal=4,
    ),
    "AutoencoderDC": dict(
        latent_channels=4,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        scaling_factor=0.41407,
    ),
    "AutoencoderTiny": dict(  # four blocks: AutoencoderTiny's tiling assumes an 8x model
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        scaling_factor=0.9,
        shift_factor=0.05,
    ),
    "AutoencoderKLHunyuanImage": dict(  # its GroupNorm has 32 groups: 32 channels at least
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        spatial_compression_ratio=2,
        sample_size=32,
        scaling_factor=0.75289,
    ),
}
# class -> (latent_channels, spatial_factor, temporal_factor, has_posterior, video, normalization) of the tiny model
TINY_FORMATS = {
    "AutoencoderKL": (4, 2, None, True, False, "scale_shift"),
    "AutoencoderKLFlux2": (16, 4, None, True, False, "batch_norm"),
    "AutoencoderKLQwenImage": (4, 4, 4, True, True, "per_channel"),
    "AutoencoderKLWan": (4, 4, 4, True, True, "per_channel"),
    "AutoencoderDC": (4, 2, None, False, False, "scale"),
    "AutoencoderTiny": (4, 8, None, False, False, "scale_shift"),
    "AutoencoderKLHunyuanImage": (16, 2, None, True, False, "scale"),
}
VIDEO = ("AutoencoderKLQwenImage", "AutoencoderKLWan")
NO_POSTERIOR = ("AutoencoderDC", "AutoencoderTiny")


def build(class_name: str, config: dict, seed: int = 0):
    """A model of ``class_name`` from ``config`` (as ``from_pretrained`` reads a config.json), random weights."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # published configs carry keys this diffusers ignores (force_upcast, ...)
        vae = getattr(diffusers, class_name).from_config(config).eval()
    if class_name == "AutoencoderKLFlux2":
        # Give the batch norm the statistics a trained model has (not 0 and 1); small variances make eps count.
        g = torch.Generator().manual_seed(seed + 1)
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.5)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 0.01 + 0.0005)
    return vae


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is faster than two fighting over a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return {name: build(name, config) for name, config in TINY.items()}


def images_for(spatial_factor: int, n: int = 2, rows: int = 2, cols: int = 3, seed: int = 1) -> torch.Tensor:
    """Non-square images in [-1, 1], a multiple of the spatial factor high and wide."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, rows * spatial_factor, cols * spatial_factor, generator=g) * 2 - 1


# --- published configs (random weights, small images) ---------------------------------------------
# Copied from the hub's config.json files (repo id + subfolder in each entry). Where the published model is too big
# for a CPU test, SHRINK replaces only channel widths and layer counts; latent channels, factors, normalisation
# parameters and every other key stay as published.

QWEN_WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
QWEN_WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]  # fmt: skip
WAN22_MEAN = [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
              0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
              -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681,
              -0.0667]  # fmt: skip
WAN22_STD = [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
             0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
             0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468,
             0.7744]  # fmt: skip
KL_BLOCKS = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
DC_BLOCKS = dict(
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
    decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
)
TAESD = dict(
    act_fn="relu",
    decoder_block_out_channels=[64, 64, 64, 64],
    encoder_block_out_channels=[64, 64, 64, 64],
    force_upcast=False,
    in_channels=3,
    latent_channels=4,
    latent_magnitude=3,
    latent_shift=0.5,
    num_decoder_blocks=[3, 3, 3, 1],
    num_encoder_blocks=[1, 3, 3, 3],
    out_channels=3,
    scaling_factor=1.0,
    upsampling_scaling_factor=2,
)

# name -> (class, repo id, subfolder, config.json as published, SHRINK, expected format fields)
PUBLISHED: dict[str, tuple] = {
    "sd35": (
        "AutoencoderKL", "stabilityai/stable-diffusion-3.5-large", "vae",
        dict(_class_name="AutoencoderKL", act_fn="silu", **KL_BLOCKS, force_upcast=True, in_channels=3,
             latent_channels=16, latents_mean=None, latents_std=None, layers_per_block=2,
             mid_block_add_attention=True, norm_num_groups=32, out_channels=3, sample_size=1024,
             scaling_factor=1.5305, shift_factor=0.0609, use_post_quant_conv=False, use_quant_conv=False),
        dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),
        dict(latent_channels=16, spatial_factor=8, scaling_factor=1.5305, shift_factor=0.0609),
    ),
    "flux2": (
        "AutoencoderKLFlux2", "black-forest-labs/FLUX.2-dev", "vae",
        dict(_class_name="AutoencoderKLFlux2", act_fn="silu", batch_norm_eps=0.0001, batch_norm_momentum=0.1,
             block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
             force_upcast=True, in_channels=3, latent_channels=32, layers_per_block=2,
             mid_block_add_attention=True, norm_num_groups=32, out_channels=3, patch_size=[2, 2], sample_size=1024,
             up_block_types=["UpDecoderBlock2D"] * 4, use_post_quant_conv=True, use_quant_conv=True),
        dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1),
        dict(latent_channels=128, spatial_factor=16, batch_norm_eps=1e-4, patch_size=2),
    ),
    "qwen-image": (
        "AutoencoderKLQwenImage", "Qwen/Qwen-Image", "vae",
        dict(_class_name="AutoencoderKLQwenImage", attn_scales=[], base_dim=96, dim_mult=[1, 2, 4, 4], dropout=0.0,
             latents_mean=QWEN_WAN21_MEAN, latents_std=QWEN_WAN21_STD, num_res_blocks=2,
             temperal_downsample=[False, True, True], z_dim=16),
        dict(base_dim=8, num_res_blocks=1),
        dict(latent_channels=16, spatial_factor=8, temporal_factor=4, latents_mean=tuple(QWEN_WAN21_MEAN)),
    ),
    "wan2.1": (
        "AutoencoderKLWan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae",
        dict(_class_name="AutoencoderKLWan", attn_scales=[], base_dim=96, decoder_base_dim=None,
             dim_mult=[1, 2, 4, 4], dropout=0.0, in_channels=3, is_residual=False, latents_mean=QWEN_WAN21_MEAN,
             latents_std=QWEN_WAN21_STD, num_res_blocks=2, out_channels=3, patch_size=None,
             scale_factor_spatial=8, scale_factor_temporal=4, temperal_downsample=[False, True, True], z_dim=16),
        dict(base_dim=8, num_res_blocks=1),
        dict(latent_channels=16, spatial_factor=8, temporal_factor=4, latents_std=tuple(QWEN_WAN21_STD)),
    ),
    "wan2.2": (
        "AutoencoderKLWan", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae",
        dict(_class_name="AutoencoderKLWan", attn_scales=[], base_dim=160, clip_output=False, decoder_base_dim=256,
             dim_mult=[1, 2, 4, 4], dropout=0.0, in_channels=12, is_residual=True, latents_mean=WAN22_MEAN,
             latents_std=WAN22_STD, num_res_blocks=2, out_channels=12, patch_size=2, scale_factor_spatial=16,
             scale_factor_temporal=4, temperal_downsample=[False, True, True], z_dim=48),
        dict(base_dim=8, decoder_base_dim=8, num_res_blocks=1),
        dict(latent_channels=48, spatial_factor=16, temporal_factor=4, image_channels=3),
    ),
    "dc-ae-f32c32-sana": (
        "AutoencoderDC", "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers", None,
        dict(_class_name="AutoencoderDC", attention_head_dim=32, decoder_act_fns="silu", **DC_BLOCKS,
             decoder_norm_types="rms_norm", downsample_block_type="Conv", in_channels=3, latent_channels=32,
             scaling_factor=0.41407, upsample_block_type="interpolate"),
        dict(encoder_block_out_channels=[8, 8, 16, 32, 32, 32], decoder_block_out_channels=[8, 8, 16, 32, 32, 32],
             encoder_layers_per_block=[1] * 6, decoder_layers_per_block=[1] * 6),
        dict(latent_channels=32, spatial_factor=32, scaling_factor=0.41407, has_posterior=False),
    ),
    "taesd": (
        "AutoencoderTiny", "madebyollin/taesd", None,
        dict(_class_name="AutoencoderTiny", **TAESD),
        {},  # small enough as published
        dict(latent_channels=4, spatial_factor=8, scaling_factor=1.0, shift_factor=0.0, has_posterior=False),
    ),
    "taef1": (
        "AutoencoderTiny", "madebyollin/taef1", None,
        dict(_class_name="AutoencoderTiny", **{**TAESD, "latent_channels": 16}, block_out_channels=[64, 64, 64, 64],
             shift_factor=0.0, upsample_fn="nearest"),
        {},
        dict(latent_channels=16, spatial_factor=8, has_posterior=False),
    ),
    "hunyuanimage-2.1": (
        "AutoencoderKLHunyuanImage", "hunyuanvideo-community/HunyuanImage-2.1-Diffusers", "vae",
        dict(_class_name="AutoencoderKLHunyuanImage", block_out_channels=[128, 256, 512, 512, 1024, 1024],
             downsample_match_channel=True, in_channels=3, latent_channels=64, layers_per_block=2, out_channels=3,
             sample_size=384, scaling_factor=0.75289, spatial_compression_ratio=32, upsample_match_channel=True),
        dict(block_out_channels=[32, 32, 32, 32, 64, 128], layers_per_block=1),
        dict(latent_channels=64, spatial_factor=32, scaling_factor=0.75289),
    ),
}  # fmt: skip


@functools.cache
def published(name: str):
    class_name, _repo, _subfolder, config, shrink, _expected = PUBLISHED[name]
    return build(class_name, {**config, **shrink})


# --- the pipelines' own code ------------------------------------------------------------------------

PIPELINES = Path(importlib.util.find_spec("diffusers").origin).parent / "pipelines"


@functools.cache
def _parsed(relpath: str) -> tuple[str, ast.Module]:
    source = (PIPELINES / relpath).read_text(encoding="utf-8")
    return source, ast.parse(source)


def _definition(relpath: str, qualname: str) -> ast.FunctionDef:
    _, node = _parsed(relpath)
    for part in qualname.split("."):
        found = [n for n in node.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part]
        assert found, f"{qualname} not found in diffusers/pipelines/{relpath}: diffusers changed, update this test"
        node = found[0]
    assert isinstance(node, ast.FunctionDef)
    return node


def pipeline_function(relpath: str, qualname: str, **names):
    """The function ``qualname`` of ``diffusers/pipelines/<relpath>``, compiled from its source."""
    source, _ = _parsed(relpath)
    node = _definition(relpath, qualname)
    code = textwrap.dedent("\n".join(source.splitlines()[node.lineno - 1 : node.end_lineno]))
    namespace = {"torch": torch, **names}
    exec(compile(code, f"diffusers/pipelines/{relpath}:{qualname}", "exec"), namespace)
    return namespace[node.name]


def pipeline_lines(relpath: str, qualname: str, first: str, last: str | None = None) -> str:
    """The statements of ``qualname`` from the one starting with ``first`` to the one starting with ``last``."""
    source, _ = _parsed(relpath)
    for node in ast.walk(_definition(relpath, qualname)):
        for block in (getattr(node, name, None) for name in ("body", "orelse")):
            if not isinstance(block, list):
                continue
            texts = [ast.get_source_segment(source, statement) or "" for statement in block]
            starts = [i for i, text in enumerate(texts) if text.startswith(first)]
            if starts:
                ends = [j for j in range(starts[0], len(texts)) if texts[j].startswith(last or first)]
                if ends:
                    lines = source.splitlines()[block[starts[0]].lineno - 1 : block[ends[0]].end_lineno]
                    return textwrap.dedent("\n".join(lines))
    raise AssertionError(f"{first!r} not found in {relpath} {qualname}: diffusers changed, update this test")


def run(code: str, **names) -> dict:
    namespace = {"torch": torch, **names}
    exec(compile(code, "<pipeline lines>", "exec"), namespace)
    return namespace


def identity(x, *args, **kwargs):
    return x


def retrieve_latents(relpath: str):
    return pipeline_function(relpath, "retrieve_latents")


def pipeline_encode(class_name: str, vae, x: torch.Tensor) -> torch.Tensor:
    """What the class's pipeline gives its denoiser for images ``x`` [N, 3, H, W] (frames dropped, not packed)."""
    if class_name == "AutoencoderKL":
        # StableDiffusion3Img2ImgPipeline.prepare_latents draws a sample (retrieve_latents' default); with the mode
        # (sample=False) its normalisation line runs on the posterior's mode. test_sample_matches_the_pipeline
        # runs its retrieve_latents line as well.
        code = pipeline_lines(
            "stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py",
            "StableDiffusion3Img2ImgPipeline.prepare_latents",
            "init_latents = (init_latents - self.vae.config.shift_factor)",
        )
        return run(code, self=SimpleNamespace(vae=vae), init_latents=vae.encode(x).latent_dist.mode())["init_latents"]
    if class_name == "AutoencoderKLFlux2":
        path = "flux2/pipeline_flux2.py"
        encode = pipeline_function(path, "Flux2Pipeline._encode_vae_image", retrieve_latents=retrieve_latents(path))
        me = SimpleNamespace(vae=vae, _patchify_latents=pipeline_function(path, "Flux2Pipeline._patchify_latents"))
        return encode(me, image=x, generator=None)
    if class_name == "AutoencoderKLQwenImage":
        path = "qwenimage/pipeline_qwenimage_edit.py"
        encode = pipeline_function(
            path, "QwenImageEditPipeline._encode_vae_image", retrieve_latents=retrieve_latents(path)
        )
        me = SimpleNamespace(vae=vae, latent_channels=vae.config.z_dim)
        return encode(me, image=x.unsqueeze(2), generator=None)[:, :, 0]  # __call__: image.unsqueeze(2)
    if class_name == "AutoencoderKLWan":
        path = "wan/pipeline_wan_video2video.py"
        code = pipeline_lines(
            path,
            "WanVideoToVideoPipeline.prepare_latents",
            "init_latents = [retrieve_latents(",
            "init_latents = (init_latents - latents_mean) * latents_std",
        )
        namespace = run(
            code,
            self=SimpleNamespace(vae=vae),
            video=x.unsqueeze(2),
            device=x.device,
            dtype=torch.float32,
            retrieve_latents=retrieve_latents(path),
        )
        return namespace["init_latents"][:, :, 0]
    if class_name == "AutoencoderDC":
        code = pipeline_lines(
            "sana/pipeline_sana_controlnet.py",
            "SanaControlNetPipeline.__call__",
            "control_image = self.vae.encode(control_image).latent",
            "control_image = control_image * self.vae.config.scaling_factor",
        )
        return run(code, self=SimpleNamespace(vae=vae), control_image=x)["control_image"]
    if class_name == "AutoencoderTiny":
        # The FLUX pipelines (TAEF1) apply shift_factor and scaling_factor; the SD ones (TAESD) only the scale, which
        # is the same for TAESD's shift of 0. retrieve_latents returns AutoencoderTiny's .latents.
        path = "flux/pipeline_flux_img2img.py"
        encode = pipeline_function(
            path, "FluxImg2ImgPipeline._encode_vae_image", retrieve_latents=retrieve_latents(path)
        )
        return encode(SimpleNamespace(vae=vae), image=x, generator=None)
    if class_name == "AutoencoderKLHunyuanImage":
        # HunyuanImagePipeline never encodes; its refiner scales encoded latents by the same factor.
        code = pipeline_lines(
            "hunyuan_image/pipeline_hunyuanimage_refiner.py",
            "HunyuanImageRefinerPipeline._encode_vae_image",
            "image_latents = image_latents * self.vae.config.scaling_factor",
        )
        names = dict(self=SimpleNamespace(vae=vae), image_latents=vae.encode(x).latent_dist.mode())
        return run(code, **names)["image_latents"]
    raise AssertionError(class_name)


def pipeline_decode(class_name: str, vae, z: torch.Tensor) -> torch.Tensor:
    """What the class's pipeline decodes latents ``z`` [N, C, h, w] (before packing) to, as images [N, 3, H, W]."""
    me = SimpleNamespace(vae=vae, image_processor=SimpleNamespace(postprocess=identity))
    if class_name == "AutoencoderKL":
        code = pipeline_lines(
            "stable_diffusion_3/pipeline_stable_diffusion_3.py",
            "StableDiffusion3Pipeline.__call__",
            "latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor",
            "image = self.vae.decode(latents, return_dict=False)[0]",
        )
        return run(code, self=me, latents=z)["image"]
    if class_name == "AutoencoderKLFlux2":
        path = "flux2/pipeline_flux2.py"
        code = pipeline_lines(
            path, "Flux2Pipeline.__call__", "latents = self._unpack_latents_with_ids(", "image = self.vae.decode("
        )
        me._unpack_latents_with_ids = identity  # z is already unpacked from tokens
        me._unpatchify_latents = pipeline_function(path, "Flux2Pipeline._unpatchify_latents")
        names = dict(self=me, latents=z, latent_ids=None, get_module_execution_device=lambda module: z.device)
        return run(code, **names)["image"]
    if class_name == "AutoencoderKLQwenImage":
        code = pipeline_lines(
            "qwenimage/pipeline_qwenimage.py",
            "QwenImagePipeline.__call__",
            "latents = self._unpack_latents(",
            "image = self.vae.decode(",
        )
        me._unpack_latents, me.vae_scale_factor = identity, 8  # _unpack_latents gives [N, C, 1, h, w]
        return run(code, self=me, latents=z.unsqueeze(2), height=None, width=None)["image"]
    if class_name == "AutoencoderKLWan":
        code = pipeline_lines(
            "wan/pipeline_wan.py",
            "WanPipeline.__call__",
            "latents = latents.to(get_module_execution_device(self.vae)",
            "video = self.vae.decode(",
        )
        names = dict(self=me, latents=z.unsqueeze(2), get_module_execution_device=lambda module: z.device)
        return run(code, **names)["video"][:, :, 0]
    if class_name == "AutoencoderDC":
        code = pipeline_lines(
            "sana/pipeline_sana.py", "SanaPipeline.__call__", "latents = latents.to(self.vae.dtype)", "try:"
        )
        return run(code, self=me, latents=z)["image"]
    if class_name == "AutoencoderTiny":
        code = pipeline_lines(
            "flux/pipeline_flux.py",
            "FluxPipeline.__call__",
            "latents = self._unpack_latents(",
            "image = self.vae.decode(",
        )
        me._unpack_latents, me.vae_scale_factor = identity, 8  # z is already unpacked from tokens
        names = dict(self=me, latents=z, height=None, width=None, get_module_execution_device=lambda module: z.device)
        return run(code, **names)["image"]
    if class_name == "AutoencoderKLHunyuanImage":
        code = pipeline_lines(
            "hunyuan_image/pipeline_hunyuanimage.py",
            "HunyuanImagePipeline.__call__",
            "latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor",
            "image = self.vae.decode(latents, return_dict=False)[0]",
        )
        return run(code, self=me, latents=z)["image"]
    raise AssertionError(class_name)


# --- the format of each class -----------------------------------------------------------------------


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_latent_format_of_each_class(tiny, class_name):
    fmt = latent_format(tiny[class_name])
    channels, factor, temporal, posterior, video, normalization = TINY_FORMATS[class_name]
    assert fmt.class_name == class_name and isinstance(fmt, LatentFormat)
    assert (fmt.latent_channels, fmt.spatial_factor, fmt.temporal_factor) == (channels, factor, temporal)
    assert (fmt.has_posterior, fmt.video, fmt.normalization, fmt.image_channels) == (
        posterior,
        video,
        normalization,
        3,
    )


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_config_formats(name):
    class_name, _repo, _subfolder, _config, _shrink, expected = PUBLISHED[name]
    fmt = latent_format(published(name))
    assert fmt.class_name == class_name
    for field, value in expected.items():
        assert getattr(fmt, field) == value, field


def test_flux2_format_reads_the_bn_buffers_and_eps(tiny):
    vae = tiny["AutoencoderKLFlux2"]
    fmt = latent_format(vae)
    assert fmt.running_mean == tuple(vae.bn.running_mean.tolist())
    assert fmt.running_var == tuple(vae.bn.running_var.tolist())
    assert fmt.batch_norm_eps == vae.config.batch_norm_eps == 1e-4


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_to_dict_is_json_and_from_dict_rebuilds_it(tiny, class_name):
    fmt = latent_format(tiny[class_name])
    data = json.loads(json.dumps(fmt.to_dict()))
    assert data["class_name"] == class_name and data["normalization"] == fmt.normalization
    assert data["spatial_factor"] == fmt.spatial_factor and data["latent_channels"] == fmt.latent_channels
    again = LatentFormat.from_dict(data)
    assert again == fmt and type(again) is type(fmt)
    z = torch.randn(1, fmt.latent_channels, 4, 6)
    torch.testing.assert_close(again.process_out(z), fmt.process_out(z), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"class_name": "UNet2DModel"}, "unknown latent format class_name 'UNet2DModel'.*AutoencoderKLHunyuanImage"),
        ({"normalization": "scale"}, "normalization 'scale_shift', got 'scale'"),
        ({"colour": "red"}, r"unknown KLFormat field\(s\) \['colour'\]"),
        ({"spatial_factor": 0}, "spatial_factor must be a positive int"),
        ({"scaling_factor": 0.0}, "scaling_factor must be a finite non-zero number"),
    ],
)
def test_from_dict_refuses_what_it_cannot_rebuild(tiny, change, match):
    data = {**latent_format(tiny["AutoencoderKL"]).to_dict(), **change}
    with pytest.raises(ValueError, match=match):
        LatentFormat.from_dict(data)


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_process_out_inverts_process_in(tiny, class_name):
    fmt = latent_format(tiny[class_name])
    raw_channels = fmt.latent_channels // 4 if class_name == "AutoencoderKLFlux2" else fmt.latent_channels
    z = torch.randn(2, raw_channels, 4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(fmt.process_out(fmt.process_in(z)), z)


# --- encode and decode equal the pipelines ----------------------------------------------------------


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_encode_and_decode_equal_the_pipeline(tiny, class_name):
    vae = tiny[class_name]
    fmt = latent_format(vae)
    x = images_for(fmt.spatial_factor)
    z = torch.randn(2, fmt.latent_channels, 3, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got_z, want_z = latents.encode(vae, x), pipeline_encode(class_name, vae, x)
        got_x, want_x = latents.decode(vae, z), pipeline_decode(class_name, vae, z)
    assert got_z.shape == (2, fmt.latent_channels, 2, 3)
    torch.testing.assert_close(got_z, want_z, rtol=1e-5, atol=1e-5)
    assert got_x.shape == (2, 3, 3 * fmt.spatial_factor, 5 * fmt.spatial_factor)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_encode_and_decode_as_their_pipeline(name):
    class_name = PUBLISHED[name][0]
    vae = published(name)
    fmt = latent_format(vae)
    x = images_for(fmt.spatial_factor, n=1)
    z = torch.randn(1, fmt.latent_channels, 2, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got_z, want_z = latents.encode(vae, x), pipeline_encode(class_name, vae, x)
        got_x, want_x = latents.decode(vae, z), pipeline_decode(class_name, vae, z)
    assert got_z.shape == (1, fmt.latent_channels, 2, 3) and got_x.shape == x.shape
    torch.testing.assert_close(got_z, want_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)


def test_sample_matches_the_pipeline():
    """StableDiffusion3Img2ImgPipeline samples the posterior (retrieve_latents' default): the same generator, the same
    latents."""
    vae = published("sd35")
    x = images_for(8, n=1)
    path, name = (
        "stable_diffusion_3/pipeline_stable_diffusion_3_img2img.py",
        "StableDiffusion3Img2ImgPipeline.prepare_latents",
    )
    code = "\n".join(
        [
            pipeline_lines(path, name, "init_latents = retrieve_latents(self.vae.encode(image), generator=generator)"),
            pipeline_lines(path, name, "init_latents = (init_latents - self.vae.config.shift_factor)"),
        ]
    )
    with torch.no_grad():
        got = latents.encode(vae, x, sample=True, generator=torch.Generator().manual_seed(5))
        names = dict(self=SimpleNamespace(vae=vae), image=x, generator=torch.Generator().manual_seed(5))
        want = run(code, retrieve_latents=retrieve_latents(path), **names)["init_latents"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_saved_and_reloaded_model_keeps_format_and_latents(tiny, class_name, tmp_path):
    vae = tiny[class_name]
    vae.save_pretrained(tmp_path, safe_serialization=True)
    again = getattr(diffusers, class_name).from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == class_name
    assert latent_format(again) == latent_format(vae)
    x = images_for(latent_format(vae).spatial_factor, n=1)
    with torch.no_grad():
        torch.testing.assert_close(latents.encode(again, x), latents.encode(vae, x), rtol=0, atol=0)


# --- shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_image_shapes(tiny, class_name):
    vae = tiny[class_name]
    fmt = latent_format(vae)
    x = images_for(fmt.spatial_factor, n=2, rows=1, cols=2)
    with torch.no_grad():
        z = latents.encode(vae, x)
        one = latents.encode(vae, x[0])
        y, y_one = latents.decode(vae, z), latents.decode(vae, one)
    assert z.shape == (2, fmt.latent_channels, 1, 2) and one.shape == z.shape[1:]
    assert y.shape == x.shape and y_one.shape == x.shape[1:]
    torch.testing.assert_close(one, z[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("class_name", VIDEO)
def test_video_shapes(tiny, class_name):
    vae = tiny[class_name]
    fmt = latent_format(vae)
    video = torch.rand(2, 3, 5, 8, 12, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z = latents.encode(vae, video)
        y = latents.decode(vae, z)
        first = latents.encode(vae, video[:, :, 0])
    assert z.shape == (2, fmt.latent_channels, 2, 2, 3)
    assert y.shape == video.shape
    # the causal encoder sees the first frame alone: its latent is the image's
    torch.testing.assert_close(z[:, :, 0], first, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"1 \+ 4k frames .* got 6 frames"):
        latents.encode(vae, torch.zeros(1, 3, 6, 8, 12))


@pytest.mark.parametrize("class_name", [c for c in SUPPORTED_CLASSES if c not in VIDEO])
def test_image_classes_refuse_videos(tiny, class_name):
    with pytest.raises(ValueError, match=f"look like videos.*{class_name} encodes images"):
        latents.encode(tiny[class_name], torch.zeros(1, 3, 1, 16, 16))


def test_sizes_must_be_multiples_of_the_spatial_factor():
    vae = published("dc-ae-f32c32-sana")
    with pytest.raises(
        ValueError, match=r"multiple of 32 pixels .* AutoencoderDC .* got 100x70 .* crop them to 96x64"
    ):
        latents.encode(vae, torch.zeros(1, 3, 100, 70))


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_wrong_latent_channels_are_refused(tiny, class_name):
    channels = latent_format(tiny[class_name]).latent_channels
    with pytest.raises(ValueError, match=f"{channels} channels"):
        latents.decode(tiny[class_name], torch.zeros(1, channels + 1, 2, 2))


# --- sampling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", [c for c in SUPPORTED_CLASSES if c not in NO_POSTERIOR])
def test_sample_draws_from_the_posterior(tiny, class_name):
    vae = tiny[class_name]
    fmt = latent_format(vae)
    x = images_for(fmt.spatial_factor)
    with torch.no_grad():
        a = latents.encode(vae, x, sample=True, generator=torch.Generator().manual_seed(7))
        b = latents.encode(vae, x, sample=True, generator=torch.Generator().manual_seed(7))
        mode = latents.encode(vae, x)
        mean, std = latents.encode_distribution(vae, x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, mode)
    # a sample is process_in(mean + std * noise), the noise drawn as the posterior draws it
    noise = torch.randn(
        (*mean.shape[:2], 1, *mean.shape[2:]) if fmt.video else mean.shape, generator=torch.Generator().manual_seed(7)
    )
    noise = noise[:, :, 0] if fmt.video else noise
    torch.testing.assert_close(a, fmt.process_in(mean + std * noise), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mode, fmt.process_in(mean), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("class_name", NO_POSTERIOR)
def test_sample_is_refused_without_a_posterior(tiny, class_name):
    vae = tiny[class_name]
    x = images_for(latent_format(vae).spatial_factor)
    with pytest.raises(ValueError, match=f"sample=True .* {class_name} has none"):
        latents.encode(vae, x, sample=True)
    with pytest.raises(ValueError, match=f"encode_distribution .* {class_name} has none"):
        latents.encode_distribution(vae, x)


# --- tiling -----------------------------------------------------------------------------------------


def small_tiles(vae, class_name: str) -> None:
    """Tile sizes of 32 pixels, so that a 32x48 image takes several tiles."""
    if class_name in ("AutoencoderKL", "AutoencoderKLFlux2"):
        return  # sample_size=32 sets them
    if class_name in VIDEO or class_name == "AutoencoderDC":
        vae.enable_tiling(32, 32, 16, 16)
    elif class_name == "AutoencoderKLHunyuanImage":
        vae.enable_tiling(32)
    elif class_name == "AutoencoderTiny":
        vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    vae.disable_tiling()


def record_tiling(vae, monkeypatch) -> dict[str, list[bool]]:
    seen: dict[str, list[bool]] = {"encoder": [], "decoder": []}
    for name in seen:
        module = getattr(vae, name)

        def forward(*args, _forward=module.forward, _seen=seen[name], **kwargs):
            _seen.append(vae.use_tiling)
            return _forward(*args, **kwargs)

        monkeypatch.setattr(module, "forward", forward)
    return seen


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_tile_true_takes_the_class_tiled_path(class_name, monkeypatch):
    vae = build(class_name, TINY[class_name])
    small_tiles(vae, class_name)
    fmt = latent_format(vae)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        z_plain = latents.encode(vae, x, tile=False)
        y_plain = latents.decode(vae, z_plain, tile=False)
        seen = record_tiling(vae, monkeypatch)
        y_tiled = latents.decode(vae, z_plain, tile=True)
        broken = class_name == "AutoencoderKLHunyuanImage"  # diffusers' tiled encode fails for it: see below
        with pytest.warns(VAEToolkitWarning, match="tiled encode fails") if broken else warnings.catch_warnings():
            z_tiled = latents.encode(vae, x, tile=True)
    assert (
        z_tiled.shape == z_plain.shape == (1, fmt.latent_channels, 32 // fmt.spatial_factor, 48 // fmt.spatial_factor)
    )
    assert y_tiled.shape == y_plain.shape == x.shape and torch.isfinite(y_tiled).all()
    assert len(seen["decoder"]) > 1 and all(seen["decoder"])  # several tiles, each with tiling on
    if not broken:
        assert len(seen["encoder"]) > 1 and all(seen["encoder"])
    assert vae.use_tiling is False


@pytest.mark.parametrize("name", ["hunyuanimage-2.1", "taef1"])
def test_a_tiled_encode_diffusers_cannot_do_runs_in_one_pass(name):
    """diffusers 0.42's AutoencoderKLHunyuanImage.tiled_encode unpacks 5 dims from 4-D images, and
    AutoencoderTiny._tiled_encode blends into a 4-channel buffer (TAEF1 has 16): encode warns and does not tile."""
    vae = published(name)
    fmt = latent_format(vae)
    x = images_for(fmt.spatial_factor, n=1)
    with torch.no_grad():
        plain = latents.encode(vae, x)
        with pytest.warns(VAEToolkitWarning, match=f"{PUBLISHED[name][0]}'s tiled encode fails"):
            tiled = latents.encode(vae, x, tile=True)
        vae.enable_tiling()
        try:
            auto = latents.encode(vae, x)  # the VAE's own tiling on: no warning, one pass
        finally:
            vae.disable_tiling()
    torch.testing.assert_close(tiled, plain, rtol=0, atol=0)
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)


# --- float16 overflow and gradients ------------------------------------------------------------------


def first_decoder_conv(vae) -> torch.nn.Module:
    return next(m for m in vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_float16_overflow_is_decoded_again_in_float32(class_name):
    vae = build(class_name, TINY[class_name])
    conv = first_decoder_conv(vae)
    with torch.no_grad():  # activations just under float16's largest value: half of them overflow to inf
        conv.weight.mul_(1000)
        conv.bias.fill_(65504.0)
    reference = copy.deepcopy(vae)
    vae = vae.half()
    fmt = latent_format(vae)
    z = torch.randn(1, fmt.latent_channels, 2, 3, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with pytest.warns(VAEToolkitWarning, match=r"float16 VAE produced NaN/inf.*float32"):
            y = latents.decode(vae, z)
        want = latents.decode(reference.half().float(), z)  # the same float16-rounded weights, in float32
    assert torch.isfinite(y).all() and y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-3)
    assert vae.dtype == torch.float16 and all(p.dtype == torch.float16 for p in vae.parameters())
    assert vae.encoder is not None and len(list(vae.encoder.parameters())) > 0


@pytest.mark.parametrize("class_name", SUPPORTED_CLASSES)
def test_gradients_flow_through_decode(tiny, class_name):
    vae = tiny[class_name]
    fmt = latent_format(vae)
    z = (torch.randn(1, fmt.latent_channels, 2, 3, generator=torch.Generator().manual_seed(9)) * 0.1).requires_grad_()
    loss = latents.decode(vae, z).pow(2).mean()
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# --- scaling_factors and other classes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("class_name", "factors"),
    [
        ("AutoencoderKL", (1.5305, 0.0609)),
        ("AutoencoderTiny", (0.9, 0.05)),
        ("AutoencoderDC", (0.41407, 0.0)),
        ("AutoencoderKLHunyuanImage", (0.75289, 0.0)),
    ],
)
def test_scaling_factors_where_the_convention_is_a_scale(tiny, class_name, factors):
    assert latents.scaling_factors(tiny[class_name]) == factors


@pytest.mark.parametrize("class_name", ["AutoencoderKLFlux2", "AutoencoderKLQwenImage", "AutoencoderKLWan"])
def test_scaling_factors_points_to_latent_format_for_the_others(tiny, class_name):
    with pytest.raises(ValueError, match=f"{class_name} has no scalar scaling/shift factor.*latent_format"):
        latents.scaling_factors(tiny[class_name])


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
    )


def test_another_class_is_refused_with_the_supported_list(unet):
    listing = r".*".join(SUPPORTED_CLASSES)
    for call in (
        lambda: latent_format(unet),
        lambda: latents.encode(unet, torch.zeros(1, 3, 8, 8)),
        lambda: latents.decode(unet, torch.zeros(1, 4, 8, 8)),
    ):
        with pytest.raises(UnsupportedVAEError, match=f"UNet2DModel is not an autoencoder class.*{listing}") as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


class Wrapped:
    """An AutoencoderKL-like object from outside diffusers (a wrapper): treated with AutoencoderKL's convention."""

    def __init__(self, vae):
        self.inner, self.config, self.dtype, self.device = vae, vae.config, vae.dtype, vae.device

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, z):
        return self.inner.decode(z)


def test_an_autoencoderkl_like_object_keeps_working(tiny):
    vae = tiny["AutoencoderKL"]
    x = images_for(2)
    with torch.no_grad():
        z = latents.encode(Wrapped(vae), x)
        torch.testing.assert_close(z, latents.encode(vae, x), rtol=0, atol=0)
        torch.testing.assert_close(latents.decode(Wrapped(vae), z), latents.decode(vae, z), rtol=0, atol=0)
    assert latents.scaling_factors(Wrapped(vae)) == (1.5305, 0.0609)
    with pytest.raises(UnsupportedVAEError, match="Wrapped is not an autoencoder class"):
        latent_format(Wrapped(vae))


def test_the_format_is_read_once_per_model_and_again_when_its_statistics_change(monkeypatch):
    """encode/decode read a model's format once, not per batch (FLUX.2's reads its bn buffers: a device sync on a
    GPU), and read it again when weights are loaded into those buffers or the config is replaced."""
    import vae_toolkit.latents as latents_module

    vae = build("AutoencoderKLFlux2", TINY["AutoencoderKLFlux2"])
    reads = []
    real = latents_module.latent_format
    monkeypatch.setattr(latents_module, "latent_format", lambda v: reads.append(1) or real(v))
    x = images_for(4)
    with torch.no_grad():
        z = latents.encode(vae, x)
        latents.decode(vae, z)
        latents.encode(vae, x)
        assert len(reads) == 1
        vae.bn.running_mean.copy_(vae.bn.running_mean + 1.0)  # weights loaded into the buffers
        assert torch.allclose(latents.encode(vae, x), pipeline_encode("AutoencoderKLFlux2", vae, x), atol=1e-5)
        assert len(reads) == 2
        vae.register_to_config(batch_norm_eps=0.5)  # a new config object
        assert torch.allclose(latents.encode(vae, x), pipeline_encode("AutoencoderKLFlux2", vae, x), atol=1e-5)
        assert len(reads) == 3
