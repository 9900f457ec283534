"""Command line: ``python -m vae_toolkit`` (or ``vae-toolkit``).

Commands::

    vae-toolkit [env] [--json]      versions, devices, GPU memory, HF cache: a report to paste into a bug
    vae-toolkit models [--json]     the registered VAEs
    vae-toolkit roundtrip IMAGE|DIR --model NAME [--device auto] [--dtype float32] [--size N] [-o OUT] [--overwrite]
                                    encode and decode images, save the reconstructions, print PSNR and timings
    vae-toolkit encode SOURCE -o OUT --model NAME [--size N] [--batch-size B] [--sample --seed S] ...
                                    encode a folder of images into a resumable latent store (torchrun: many GPUs)
    vae-toolkit decode OUT -o DIR [--limit K]
                                    decode stored latents back to PNG images, to look at them
    vae-toolkit evaluate SOURCE -o REPORT --model A [--model B ...] [--size N] [--limit K] [--overwrite]
                                    metrics per image and model, a ranking, pictures and an HTML report
    vae-toolkit fid A B [--save-stats OUT] [--kid] [--json]
                                    FID (and KID) of two folders or .npz statistics, as pytorch-fid
    vae-toolkit compare A B -o REPORT [--match stem] [--resize] [--overwrite]
                                    two folders file by file (originals A, outputs B): evaluate's metrics and report

``--model`` takes a registered name or a local folder holding a diffusers autoencoder of a supported class.

``roundtrip`` keeps each image's own size, center-cropped to a multiple of the model's spatial factor (8 or more)
(``--size N`` instead resizes the shorter side to N and center-crops N x N); PSNR compares the
reconstruction with that (cropped) input. Reconstructions are written as PNG by default: next to the
image as ``NAME-roundtrip.png``, or for a directory into ``DIR-roundtrip/``; ``-o OUT/`` (ending in a
separator) is a directory. A file that exists before the run is never replaced without ``--overwrite``.

Exit status: 0 on success, 1 when an image or model could not be processed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from . import _commands
from ._checks import DEFAULT_MAX_PIXELS
from ._commands import DTYPES, LATENT_DTYPES, MULTIPLE, CliError, UsageError
from ._version import __version__
from ._warnings import VAEToolkitWarning
from .model_config import get_all_model_configs, list_available_models

if TYPE_CHECKING:
    from .device_manager import DeviceRecord

__all__ = ["main", "collect_env", "format_env", "format_models"]

_GB = 1024**3
_DISTRIBUTIONS = ("torch", "diffusers", "huggingface_hub", "numpy", "Pillow", "psutil", "tqdm", "nvidia-ml-py")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see 'PROG --help')``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --- env ------------------------------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> tuple[list[DeviceRecord], str | None]:
    """The device inventory, and why it is incomplete when listing the GPUs failed."""
    from .device_manager import list_devices

    try:
        return list_devices(), None
    except Exception as err:  # a broken driver must not stop the report
        return [], f"{type(err).__name__}: {err}"


def _auto_device(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    from .device_manager import auto_select_device, local_rank

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        device = auto_select_device()
        rank = local_rank()
    if device.startswith("cuda"):
        if rank is not None:
            reason = f"distributed run: LOCAL_RANK={rank}, WORLD_SIZE={os.environ.get('WORLD_SIZE')}"
        elif len(gpus) == 1:
            reason = "the only visible CUDA device"
        else:
            free = next((g["free_memory"] for g in gpus if g["device"] == device), None)
            amount = f", {free / _GB:.1f} GB" if free is not None else ""
            reason = f"most free memory of {len(gpus)} CUDA devices{amount}"
    elif device == "mps":
        reason = "no CUDA device; Apple MPS is available"
    else:
        reason = "no CUDA or MPS device"
        if torch.version.cuda is None:
            reason += " (this torch build has no CUDA support)"
    return {"device": device, "reason": reason, "warnings": list(dict.fromkeys(str(w.message) for w in caught))}


def _hf() -> dict[str, Any]:
    from huggingface_hub import constants

    if hasattr(constants, "is_offline_mode"):
        offline = bool(constants.is_offline_mode())
    else:  # older huggingface_hub
        offline = bool(constants.HF_HUB_OFFLINE)
    if os.environ.get("HF_TOKEN"):
        token = "set (HF_TOKEN)"
    elif os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        token = "set (HUGGING_FACE_HUB_TOKEN)"
    elif Path(constants.HF_TOKEN_PATH).is_file():
        token = f"stored login ({constants.HF_TOKEN_PATH})"
    else:
        token = None
    return {"home": constants.HF_HOME, "cache": constants.HF_HUB_CACHE, "offline": offline, "token": token}


def collect_env() -> dict[str, Any]:
    """Gather the environment report as a JSON-serialisable dict (memory in bytes; no token values).

    Devices come from :func:`vae_toolkit.device_manager.list_devices`: with NVML no CUDA context is
    created on any GPU.
    """
    import torch

    versions: dict[str, str | None] = {"vae-toolkit": __version__, "python": platform.python_version()}
    versions.update({name: _version(name) for name in _DISTRIBUTIONS})
    devices, error = _devices()
    gpus = [d.to_dict() for d in devices if d.device.startswith("cuda:")]
    cpu = next((d for d in devices if d.device == "cpu"), None)
    ram = None
    if cpu is not None and cpu.total_memory is not None and cpu.free_memory is not None:
        ram = {"total": cpu.total_memory, "available": cpu.free_memory}
    return {
        "versions": versions,
        "python": {"implementation": platform.python_implementation(), "executable": sys.executable},
        "platform": platform.platform(),
        "cuda": {
            "available": bool(gpus),
            "torch_cuda_version": torch.version.cuda,
            "device_count": len(gpus),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "error": error,
        },
        "mps_available": any(d.device == "mps" for d in devices),
        "gpus": gpus,
        "auto_device": _auto_device(gpus),
        "system_memory": ram,
        "huggingface": _hf(),
    }


def _gb(n: int | None) -> str:
    return "?" if n is None else f"{n / _GB:.1f} GB"


def format_env(info: dict[str, Any]) -> str:
    """Render :func:`collect_env` as aligned text."""
    rows: list[tuple[str, str]] = []
    for name, version in info["versions"].items():
        label = "Python" if name == "python" else name
        text = version or "not installed"
        if name == "python":
            text += f" ({info['python']['implementation']})"
        rows.append((label, text))
    rows.append(("platform", info["platform"]))
    cuda = info["cuda"]
    if cuda["available"]:
        text = f"yes, {cuda['device_count']} device(s), CUDA {cuda['torch_cuda_version']}"
    elif cuda["torch_cuda_version"] is None:
        text = "no (torch built without CUDA)"
    else:
        text = f"no (torch built for CUDA {cuda['torch_cuda_version']}; no device or driver found)"
    if cuda["CUDA_VISIBLE_DEVICES"] is not None:
        text += f"; CUDA_VISIBLE_DEVICES={cuda['CUDA_VISIBLE_DEVICES']}"
    if cuda.get("error"):
        text += f"; listing the GPUs failed: {cuda['error']}"
    rows.append(("CUDA available", text))
    rows.append(("MPS available", "yes" if info["mps_available"] else "no"))
    if not info["gpus"]:
        rows.append(("GPUs", "none"))
    for gpu in info["gpus"]:
        text = f"{gpu['name'] or '?'}: {_gb(gpu['total_memory'])} total, {_gb(gpu['free_memory'])} free"
        if gpu["memory_source"]:
            text += f" ({gpu['memory_source']})"
        if gpu.get("error"):
            text += f"; {gpu['error']}"
        rows.append((f"GPU {gpu['device']}", text))
    auto = info["auto_device"]
    rows.append(("auto device", f"{auto['device']}: {auto['reason']}"))
    rows.extend(("  warning", w) for w in auto["warnings"])
    ram = info["system_memory"]
    rows.append(("system RAM", f"{_gb(ram['total'])} total, {_gb(ram['available'])} available" if ram else "?"))
    hf = info["huggingface"]
    rows.append(("HF cache", hf["cache"]))
    rows.append(("HF offline mode", "on" if hf["offline"] else "off"))
    rows.append(("HF token", hf["token"] or "not set"))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"vae-toolkit {__version__} environment", ""]
    lines += [f"- {label + ':':<{width}}{text}" for label, text in rows]
    return "\n".join(lines)


# --- models ---------------------------------------------------------------------------------------


def _models_json() -> dict[str, dict[str, Any]]:
    configs = get_all_model_configs()
    return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()} for name, cfg in configs.items()}


def format_models(configs: dict[str, dict[str, Any]] | None = None) -> str:
    """Render the model registry as a text table: each VAE's diffusers class, channels, spatial factor (image pixels
    per latent pixel, a pipeline's patchify included) and scalar factors (``-`` where the pipeline normalises
    otherwise: see ``vae_toolkit.latent_formats``)."""
    configs = get_all_model_configs() if configs is None else configs
    header = ("name", "class", "repo", "subfolder", "channels", "factor", "scaling", "shift", "notes")

    def cell(value: Any) -> str:
        return "-" if value is None or value == "" else str(value)

    rows = [header] + [
        (
            name,
            cfg.get("class_name", "AutoencoderKL"),
            cfg.get("repo_id"),
            cfg.get("subfolder"),
            cfg.get("latent_channels"),
            cfg.get("spatial_factor"),
            cfg.get("scaling_factor"),
            cfg.get("shift_factor"),
            cfg.get("notes"),
        )
        for name, cfg in configs.items()
    ]
    cells = [[cell(v) if i else str(v) for i, v in enumerate(row)] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    return "\n".join(
        ("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]).rstrip() for r in cells
    )


# --- roundtrip ------------------------------------------------------------------------------------


# --- encode / decode ------------------------------------------------------------------------------


# --- evaluate -------------------------------------------------------------------------------------


# --- parser and entry point -----------------------------------------------------------------------


def _device_arg(value: str) -> str:
    from .device_manager import resolve_device

    try:
        return resolve_device(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_arg(name: str, minimum: int, expected: str, multiple: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` and a multiple of ``multiple``, else one line saying so."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {name} {value!r}: expected {expected}") from None
        if number < minimum or number % multiple:
            raise argparse.ArgumentTypeError(f"invalid {name} {number}: expected {expected}")
        return number

    return parse


def _positive_float(name: str) -> Callable[[str], float]:
    """An argparse type: a finite number > 0, else one line saying so."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {name} {value!r}: expected a number > 0") from None
        if not math.isfinite(number) or number <= 0:
            raise argparse.ArgumentTypeError(f"invalid {name} {value!r}: expected a finite number > 0")
        return number

    return parse


def _model_arg(value: str) -> str:
    """A registered model name, or a local folder holding a supported diffusers autoencoder (kept as written)."""
    from .vae_loader import VAELoadError, check_local_model, local_model_config

    if value in list_available_models():
        return value
    local = local_model_config(value)
    if local is not None:
        try:  # another diffusers model, or no weights: refused before any image is read
            check_local_model(local)
        except VAELoadError as err:
            raise argparse.ArgumentTypeError(f"invalid model {value!r}: {err}") from None
        return value
    hint = " (the folder has no config.json, nor vae/config.json)" if Path(value).expanduser().is_dir() else ""
    raise argparse.ArgumentTypeError(
        f"invalid model {value!r}: neither a registered name ({', '.join(list_available_models())}) nor a folder "
        f"holding a supported diffusers autoencoder (config.json + safetensors){hint}"
    )


class _BucketOption(argparse.Action):
    """Store an option that only shapes buckets, and note that it was given (``main`` refuses it without
    ``--buckets`` rather than ignore it)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,  # noqa: ARG002 - argparse.Action's signature
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,  # noqa: ARG002
    ) -> None:
        setattr(namespace, self.dest, values)
        given = getattr(namespace, "bucket_options", None) or []
        namespace.bucket_options = [*given, self.option_strings[0]]


_size_arg = _int_arg("size", 1, f"a positive multiple of {MULTIPLE}", MULTIPLE)
_positive_int = _int_arg("value", 1, "a positive integer")
_non_negative_int = _int_arg("value", 0, "an integer >= 0")


def build_parser(prog: str = "vae-toolkit") -> argparse.ArgumentParser:
    """The argument parser of ``python -m vae_toolkit``."""
    parser = _Parser(
        prog=prog,
        description="Stable Diffusion VAE toolkit: environment report, models, round trips, datasets to latents.",
    )
    parser.add_argument("--version", action="version", version=f"vae-toolkit {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log what the library does (INFO)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    env = commands.add_parser(
        "env",
        parents=[common],
        help="versions, devices and memory (the default)",
        description="Report versions, devices, GPU memory and the Hugging Face cache.",
    )
    env.add_argument("--json", action="store_true", help="machine-readable output")

    models = commands.add_parser(
        "models", parents=[common], help="list the registered VAEs", description="List the registered VAEs."
    )
    models.add_argument("--json", action="store_true", help="machine-readable output")

    names = ", ".join(list_available_models())
    model_help = f"registered model ({names}) or a folder holding a supported diffusers autoencoder"
    # --device and --dtype, the same in every command that loads a VAE
    vae_options = _Parser(add_help=False)
    # no string default: argparse would convert it (and import torch) even to report a missing argument
    vae_options.add_argument("--device", type=_device_arg, help="auto (default), cpu, mps, cuda or cuda:N")
    vae_options.add_argument(
        "--dtype", default="float32", choices=list(DTYPES), help="weights dtype (default float32)"
    )
    max_pixels: dict[str, Any] = {
        "type": _non_negative_int,
        "default": DEFAULT_MAX_PIXELS,
        "metavar": "N",
        "help": f"an image of more pixels is a failure, found before it is decoded (default {DEFAULT_MAX_PIXELS}, "
        "PIL's decompression-bomb threshold; 0: no limit)",
    }
    # one required --model, as roundtrip and encode take it
    one_model = _Parser(add_help=False)
    one_model.add_argument("--model", "-m", required=True, type=_model_arg, metavar="NAME", help=model_help)

    rt = commands.add_parser(
        "roundtrip",
        parents=[common, one_model, vae_options],
        help="encode and decode images, print PSNR and timings",
        description="Encode and decode an image (or every image in a directory), save the reconstruction and "
        "print its PSNR and the time of each step. Images keep their size, center-cropped to a multiple of the "
        "model's spatial factor (8 or more) "
        "(or, with --size N, resized and center-cropped to N x N).",
    )
    rt.add_argument("image", type=Path, metavar="IMAGE", help="an image file or a directory of images")
    rt.add_argument(
        "--size",
        type=_size_arg,
        metavar="N",
        help="resize the shorter side to N and center-crop N x N (N a multiple of the model's spatial factor)",
    )
    rt.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="output file, or directory (an existing one, or any path ending in /); "
        "default IMAGE-roundtrip.png, or DIR-roundtrip/",
    )
    rt.add_argument(
        "--overwrite", action="store_true", help="replace output files that already exist (refused otherwise)"
    )

    enc = commands.add_parser(
        "encode",
        parents=[common, one_model, vae_options],
        help="encode a folder of images into a latent store (resumable; torchrun for many GPUs)",
        description="Encode every image under SOURCE (recursively) into a store of safetensors shards in OUT. "
        "Run the same command again to resume after a crash: images already stored are skipped. Under torchrun "
        "every rank takes its own GPU and part of the images.",
    )
    enc.add_argument(
        "source",
        type=Path,
        metavar="SOURCE",
        help="a folder of images (searched recursively), or tar shards / Parquet files: a .tar or .parquet file, a "
        "folder of them, or a brace pattern such as 'shards/{00000..00999}.tar'",
    )
    enc.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="the store folder")
    shape = enc.add_mutually_exclusive_group()
    shape.add_argument("--size", type=_size_arg, metavar="N", help="resize the shorter side to N, center-crop N x N")
    shape.add_argument(
        "--buckets",
        type=_positive_int,
        metavar="AREA",
        help="aspect-ratio buckets of about AREA x AREA pixels: each image is resized to cover the bucket nearest "
        "its aspect ratio and center-cropped to it (see README, 'Training with the store')",
    )
    enc.add_argument(
        "--bucket-step",
        type=_int_arg("bucket step", MULTIPLE, f"a positive multiple of {MULTIPLE}", MULTIPLE),
        action=_BucketOption,
        default=64,
        metavar="S",
        help="with --buckets: both sides of a bucket are multiples of S (default 64)",
    )
    enc.add_argument(
        "--max-aspect",
        type=_positive_float("max aspect"),
        action=_BucketOption,
        default=4.0,
        metavar="R",
        help="with --buckets: the largest long side / short side of a bucket (default 4)",
    )
    enc.set_defaults(bucket_options=[])
    enc.add_argument("--flip", action="store_true", help="also store the latent of each horizontally mirrored image")
    enc.add_argument(
        "--tile",
        action="store_true",
        help="encode images larger than the model's sample_size in tiles (by default never: each latent is the "
        "whole image's, as training scripts cache them; recorded in the store)",
    )
    enc.add_argument(
        "--distribution",
        action="store_true",
        help="store the latent distribution's mean and std instead of one latent (draw a sample when training)",
    )
    enc.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="images per batch (default 8)")
    enc.add_argument(
        "--latent-dtype",
        default="float32",
        choices=list(LATENT_DTYPES),
        help="dtype of the stored latents (default float32)",
    )
    enc.add_argument("--sample", action="store_true", help="store a sample of the latent distribution, not its mean")
    enc.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="noise seed with --sample")
    enc.add_argument(
        "--workers",
        type=_positive_int,
        metavar="W",
        help="image decoding threads (default: the cores of this process, shared among the ranks of the machine)",
    )
    enc.add_argument(
        "--exact-resize",
        action="store_true",
        help="with --size: resize every image from its full-resolution decode (pil_to_tensor's values); by default "
        "a large JPEG is decoded at a reduced DCT scale first, several times faster",
    )
    enc.add_argument(
        "--shard-size",
        type=_positive_float("shard size"),
        default=256,
        metavar="MB",
        help="MB of latents per shard (256)",
    )
    enc.add_argument(
        "--checkpoint-every",
        type=_positive_float("checkpoint interval"),
        default=60.0,
        metavar="SECONDS",
        help="write the open shard at least this often (default 60): the most work a kill can lose",
    )
    enc.add_argument(
        "--keep-missing",
        action="store_true",
        help="keep the latents of images no longer in SOURCE (by default a run removes them)",
    )
    enc.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store made with other settings (a store with the same settings is resumed)",
    )
    enc.add_argument(
        "--verify",
        action="store_true",
        help="also read every shard in full and check it against the SHA-256 in the index (a run checks sizes and "
        "header checksums only); a damaged shard is moved aside and its images encoded again",
    )
    enc.add_argument("--max-pixels", **max_pixels)
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")
    enc.add_argument(
        "--image-column", default="image", metavar="NAME", help="Parquet: the column of image bytes (default image)"
    )
    enc.add_argument(
        "--key-column", default=None, metavar="NAME", help="Parquet: the column of keys (default: the row number)"
    )
    enc.add_argument(
        "--caption-column",
        default=None,
        metavar="NAME",
        help="Parquet: a string column of captions, stored beside each latent (a folder image's caption is its "
        "NAME.txt, a tar sample's its KEY.txt or KEY.json's 'caption')",
    )
    enc.add_argument(
        "--no-upscale",
        action="store_true",
        help="never scale an image up: with --buckets an image smaller than its bucket takes the largest bucket "
        "inside it, else its own size rounded down to the step; with --size one smaller than N is left out as too "
        "small (recorded in the store)",
    )
    enc.add_argument(
        "--min-size",
        type=_positive_int,
        metavar="PIXELS",
        help="leave out, listed as too small, an image whose shorter side is below PIXELS (recorded in the store)",
    )

    dec = commands.add_parser(
        "decode",
        parents=[common, vae_options],
        help="decode stored latents back to PNG images",
        description="Decode the latents of a store (in key order) and write them as PNG files under DIR, "
        "keeping the folders of the keys, so that a person can look at what was stored.",
    )
    dec.add_argument("store", type=Path, metavar="OUT", help="a store folder written by encode")
    dec.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="folder for the PNG files")
    dec.add_argument("--limit", type=_positive_int, metavar="K", help="decode the first K latents only")
    dec.add_argument(
        "--model", "-m", type=_model_arg, metavar="NAME", help=f"{model_help}; default: the model the store records"
    )
    dec.add_argument("--overwrite", action="store_true", help="replace existing PNG files")
    dec.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = commands.add_parser(
        "evaluate",
        parents=[common, vae_options],
        help="how much VAEs lose on a folder of images: metrics, pictures and an HTML report",
        description="Reconstruct every image under SOURCE (recursively) with each --model and compare it with the "
        "prepared original: PSNR, SSIM, MS-SSIM, MAE (and LPIPS when installed) per image, a summary and ranking "
        "per model, and pictures, in REPORT/ (metrics.csv, summary.json, images/, index.html). Images are prepared "
        "as encode prepares them. Under torchrun the ranks split the images and rank 0 writes the report.",
    )
    ev.add_argument("source", type=Path, metavar="SOURCE", help="an image file, or a folder (searched recursively)")
    ev.add_argument("-o", "--output", type=Path, required=True, metavar="REPORT", help="the report folder")
    ev.add_argument(
        "--model",
        "-m",
        required=True,
        action="append",
        type=_model_arg,
        metavar="NAME",
        help=f"{model_help}; repeat it to compare models",
    )
    ev.add_argument("--size", type=_size_arg, metavar="N", help="resize the shorter side to N, center-crop N x N")
    ev.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="images per batch (default 8)")
    ev.add_argument("--limit", type=_positive_int, metavar="K", help="evaluate the first K images only")
    ev.add_argument("--workers", type=_positive_int, metavar="W", help="image decoding threads (default: CPUs, max 8)")
    ev.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the pictured picks (0)")
    ev.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the report in a non-empty REPORT folder (only the files a report wrote, as its "
        "report-manifest.json lists them; nothing else is removed); REPORT may never be SOURCE or inside it",
    )
    ev.add_argument(
        "--tile",
        action="store_true",
        help="encode and decode images larger than a model's sample_size in tiles (by default never: the model is "
        "measured as it is)",
    )
    ev.add_argument("--max-pixels", **max_pixels)
    ev.add_argument(
        "--lpips",
        choices=("alex", "vgg", "squeeze", "none"),
        default=None,
        help="LPIPS per image with AlexNet (as lpips and torchmetrics default to), VGG-16 or SqueezeNet 1.1, or none; "
        "by default AlexNet when its weights are in torch hub's checkpoints folder or can be downloaded, else left "
        "out (a note)",
    )
    fid_group = ev.add_mutually_exclusive_group()
    fid_group.add_argument(
        "--fid",
        action="store_true",
        default=None,
        help="require rFID (pytorch-fid's Inception weights; by default on when they are there or can be downloaded)",
    )
    fid_group.add_argument("--no-fid", dest="fid", action="store_false", help="no rFID")
    ev.add_argument(
        "--fast-reader",
        action="store_true",
        help="with --size, decode large JPEGs at a reduced DCT scale before resizing (as encode does); by default "
        "the originals are read exactly (full decode, then resize), as other tools read them",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    fid = commands.add_parser(
        "fid",
        parents=[common],
        help="FID (and KID) between two folders of images or .npz statistics, as pytorch-fid",
        description="The FID python -m pytorch_fid A B prints (pytorch-fid 0.3.0's Inception weights and "
        "definition): A and B are folders (their images, not searched recursively) or .npz statistics files "
        "(mu, sigma). --save-stats OUT writes A's statistics in the same layout (B may then be left out).",
    )
    fid.add_argument("paths", type=Path, nargs="+", metavar="A B", help="two folders or .npz files")
    fid.add_argument("--dims", type=int, choices=(64, 192, 768, 2048), default=2048, help="features (2048)")
    fid.add_argument("--batch-size", type=_positive_int, default=50, metavar="B", help="images per batch (50)")
    fid.add_argument("--device", type=_device_arg, help="auto (default), cpu, mps, cuda or cuda:N")
    fid.add_argument("--workers", type=_positive_int, metavar="W", help="decoding threads (default: CPUs, max 8)")
    fid.add_argument("--save-stats", type=Path, metavar="OUT", help="write A's statistics to OUT (.npz)")
    fid.add_argument("--kid", action="store_true", help="also KID (torch-fidelity's definition), mean and std")
    fid.add_argument("--kid-subsets", type=_positive_int, default=100, metavar="S", help="KID subsets (100)")
    fid.add_argument(
        "--kid-subset-size",
        type=_int_arg("KID subset size", 2, "an integer >= 2"),
        default=1000,
        metavar="M",
        help="images per KID subset (1000; lowered to the smaller set's number of images, with a note)",
    )
    fid.add_argument("--json", action="store_true", help='print {"fid": ..., "kid_mean": ..., "kid_std": ...}')

    cmp = commands.add_parser(
        "compare",
        parents=[common],
        help="two folders file by file: evaluate's metrics, pictures and report, unpaired files listed",
        description="Pair each file of A (the originals) with B's file of the same relative path (recursively) and "
        "measure the pair as evaluate does: PSNR, SSIM, MS-SSIM, MAE, LPIPS and FID when their weights are there, "
        "in REPORT/ (metrics.csv, summary.json, images/, index.html). Files in one folder only are listed; a pair "
        "whose sizes differ is a failure unless --resize.",
    )
    cmp.add_argument("a", type=Path, metavar="A", help="the folder of the originals (the reference)")
    cmp.add_argument("b", type=Path, metavar="B", help="the folder of the reconstructions or outputs")
    cmp.add_argument("-o", "--output", type=Path, required=True, metavar="REPORT", help="the report folder")
    cmp.add_argument("--match", choices=("name", "stem"), default="name", help="pair by path, or without extension")
    cmp.add_argument("--resize", action="store_true", help="resize B's image to A's size where they differ (bilinear)")
    cmp.add_argument("--name", metavar="LABEL", help="B's name in the report (default: its folder's name)")
    cmp.add_argument("--lpips", metavar="NET", help="as evaluate's --lpips: alex, vgg, ... or none (default alex)")
    cmp.add_argument("--fid", action=argparse.BooleanOptionalAction, help="require FID of B against A, or --no-fid")
    cmp.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="pairs per batch (default 8)")
    cmp.add_argument("--workers", type=_positive_int, metavar="W", help="decoding threads (default: CPUs, max 8)")
    cmp.add_argument("--device", type=_device_arg, help="auto (default), cpu, mps, cuda or cuda:N")
    cmp.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the pictured picks (0)")
    cmp.add_argument("--overwrite", action="store_true", help="replace the report in REPORT (never inside A or B)")
    cmp.add_argument("--max-pixels", **max_pixels)
    cmp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _prog() -> str:
    return "python -m vae_toolkit" if os.path.basename(sys.argv[0]) == "__main__.py" else "vae-toolkit"


def _warning_printer(prog: str, verbose: bool) -> Callable[..., None]:
    """Print warnings as one line each; without ``--verbose`` only this library's (``VAEToolkitWarning``)
    and RuntimeWarnings."""
    package_dir = os.path.dirname(os.path.abspath(__file__))

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,  # noqa: ARG001 - warnings.showwarning's signature
        file: TextIO | None = None,
        line: str | None = None,  # noqa: ARG001
    ) -> None:
        ours = issubclass(category, (VAEToolkitWarning, RuntimeWarning))
        ours = ours or os.path.abspath(filename).startswith(package_dir)
        if verbose or ours:
            # The library's hints name its arguments; on the command line they are options.
            text = " ".join(str(message).split()).replace("device='cpu'", "--device cpu")
            print(f"{prog}: warning: {text}", file=sys.stderr if file is None else file)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failure, 2 bad arguments).

    Example:
        >>> main(["models"])  # doctest: +SKIP
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "env")
    prog = _prog()
    parser = build_parser(prog)
    verbose = any(a in ("-v", "--verbose") for a in args_list)
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(prog, verbose)
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exit_:
            return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 2
        args.prog = prog
        if args.command == "encode" and args.buckets is None and args.bucket_options:
            flag = args.bucket_options[0]
            print(
                f"{prog} encode: error: {flag} needs --buckets (it shapes the aspect-ratio buckets and nothing else); "
                f"add --buckets AREA or drop {flag} (see '{prog} encode --help')",
                file=sys.stderr,
            )
            return 2
        if hasattr(args, "device") and args.device is None:
            args.device = _device_arg("auto")
        if args.verbose:
            logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
            logging.getLogger("vae_toolkit").setLevel(logging.INFO)
        try:
            if args.command == "env":
                info = collect_env()
                print(json.dumps(info, indent=2) if args.json else format_env(info))
                return 0
            if args.command == "models":
                print(json.dumps(_models_json(), indent=2) if args.json else format_models())
                return 0
            if args.command == "encode":
                return _commands.encode_command(args)
            if args.command == "decode":
                return _commands.decode_command(args)
            if args.command == "evaluate":
                return _commands.evaluate_command(args)
            if args.command == "fid":
                return _commands.fid_command(args)
            if args.command == "compare":
                return _commands.compare_command(args)
            return _commands.roundtrip_command(args)
        except BrokenPipeError:  # e.g. `vae-toolkit env | head`
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted{_commands.stopped_note(args)}", file=sys.stderr)
            return 130
        except SystemExit as exit_:
            if exit_.code not in _commands.STOPPED:  # SIGTERM (SLURM preemption, torchrun teardown)
                raise
            status = int(exit_.code)
            print(f"{prog}: {_commands.STOPPED[status]}{_commands.stopped_note(args)}", file=sys.stderr)
            return status
        except UsageError as err:
            print(f"{prog} {args.command}: error: {err} (see '{prog} {args.command} --help')", file=sys.stderr)
            return 2
        except (CliError, OSError) as err:  # VAELoadError is an OSError
            print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 1
        except Exception as err:
            from .image_utils import ImageProcessingError

            if not isinstance(err, ImageProcessingError):
                raise
            print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
