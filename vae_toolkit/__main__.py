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

``--model`` takes a registered name or a local folder holding a diffusers ``AutoencoderKL``.

``roundtrip`` keeps each image's own size, center-cropped to a multiple of 8 pixels when needed
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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import torch

from . import VAEToolkitWarning, __version__
from .device_manager import DeviceRecord, auto_select_device, list_devices, local_rank, resolve_device
from .image_utils import ImageProcessingError, image_extensions
from .model_config import get_all_model_configs, list_available_models

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["main", "collect_env", "format_env", "format_models"]

_GB = 1024**3
_DISTRIBUTIONS = ("torch", "diffusers", "huggingface_hub", "numpy", "Pillow", "psutil", "tqdm", "nvidia-ml-py")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_LATENT_DTYPES = {**_DTYPES, "float64": torch.float64}
_MULTIPLE = 8  # spatial downsampling of the SD / SDXL / FLUX VAEs


class _CliError(Exception):
    """A failure reported as one line with exit status 1."""


class _UsageError(_CliError):
    """A bad combination of arguments found after parsing: one line, exit status 2."""


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
    try:
        return list_devices(), None
    except Exception as err:  # a broken driver must not stop the report
        return [], f"{type(err).__name__}: {err}"


def _auto_device(gpus: list[dict[str, Any]]) -> dict[str, Any]:
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
    """Render the model registry as a text table."""
    configs = get_all_model_configs() if configs is None else configs
    header = ("name", "repo", "subfolder", "channels", "scaling", "shift", "notes")

    def cell(value: Any) -> str:
        return "-" if value is None or value == "" else str(value)

    rows = [header] + [
        (
            name,
            cfg.get("repo_id"),
            cfg.get("subfolder"),
            cfg.get("latent_channels"),
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


def _plan(
    source: Path, output: Path | None, *, output_is_dir: bool = False, overwrite: bool = False
) -> list[tuple[Path, Path]]:
    """Pair every input image with the file its reconstruction goes to.

    ``output_is_dir``: ``-o`` ended with a path separator, so it names a directory even if it does not
    exist yet. Files that exist before the run are refused unless ``overwrite``; inputs are never replaced.
    """
    if source.is_dir():
        extensions = image_extensions()
        inputs = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not inputs:
            raise _CliError(f"no image files found in directory {source}")
        out_dir = output if output is not None else source.with_name(source.name + "-roundtrip")
        if out_dir.exists() and not out_dir.is_dir():
            raise _UsageError(f"argument -o/--output: {out_dir} is a file; IMAGE is a directory, so pass -o DIR")
        used: set[str] = set()
        pairs = []
        for src in inputs:
            name = f"{src.stem}.png" if f"{src.stem}.png" not in used else f"{src.name}.png"
            used.add(name)
            pairs.append((src, out_dir / name))
    else:
        if not source.exists():
            raise _CliError(f"image file not found: {source}")
        if output is None:
            dst = source.with_name(f"{source.stem}-roundtrip.png")
        elif output_is_dir or output.is_dir():
            dst = output / f"{source.stem}-roundtrip.png"
        else:
            dst = output
            if dst.suffix.lower() not in image_extensions():
                raise _UsageError(
                    f"argument -o/--output: cannot tell the image format of {dst}; use a suffix like .png, "
                    "or end it with / for a directory"
                )
        pairs = [(source, dst)]
    _check_outputs(pairs, overwrite)
    return pairs


def _check_outputs(pairs: list[tuple[Path, Path]], overwrite: bool) -> None:
    """Refuse to replace an input image, or (without ``overwrite``) any file that exists before the run."""
    inputs = {src.resolve(): src for src, _ in pairs}
    for _, dst in pairs:
        if dst.resolve() in inputs:
            raise _UsageError(f"argument -o/--output: refusing to overwrite the input image {inputs[dst.resolve()]}")
    if overwrite:
        return
    existing = [dst for _, dst in pairs if dst.exists() or dst.is_symlink()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise _UsageError(f"{existing[0]}{more} already exists; pass --overwrite to replace it, or choose -o OUT")


def _open_image(path: Path) -> Image.Image:
    from .image_utils import open_image

    try:
        return open_image(path)
    except ImageProcessingError as err:
        raise _CliError(str(err)) from err


def _prepare(rgb: Image.Image, size: int | None) -> Image.Image:
    from .image_utils import center_crop_to_multiple, pil_to_tensor, tensor_to_pil

    if size is not None:
        return tensor_to_pil(pil_to_tensor(rgb, target_size=size))
    try:
        return center_crop_to_multiple(rgb, _MULTIPLE)
    except ImageProcessingError as err:
        raise _CliError(str(err)) from err


def _psnr(a: Image.Image, b: Image.Image) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def _load_image(src: Path, size: int | None) -> tuple[Image.Image, torch.Tensor, float]:
    """``(rgb, [1, 3, H, W] tensor, seconds taken)`` for one input image."""
    from .image_utils import pil_to_tensor

    start = time.perf_counter()
    rgb = _prepare(_open_image(src), size)
    x = pil_to_tensor(rgb).unsqueeze(0)
    return rgb, x, time.perf_counter() - start


def _roundtrip_one(
    vae: Any,
    device: torch.device,
    src: Path,
    image: tuple[Image.Image, torch.Tensor, float],
    dst: Path,
    overwrite: bool = False,
) -> dict[str, Any]:
    from .evaluate import psnr, reconstruct

    rgb, x, load_time = image
    times = {"load": load_time}
    (recon,) = reconstruct(vae, x, timings=times)  # the same path as evaluate: encode, decode, tensor_to_pil
    start = time.perf_counter()
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            recon.save(dst)
        else:  # "x": a file that appeared since the run started is not replaced either
            with open(dst, "xb") as file:
                recon.save(file)  # the format comes from file.name's suffix
    except FileExistsError as err:
        raise _CliError(f"{dst} appeared while running; not replaced (pass --overwrite to replace it)") from err
    except (OSError, ValueError) as err:
        raise _CliError(f"cannot write {dst}: {err}") from err
    times["save"] = time.perf_counter() - start
    return {"input": src, "output": dst, "size": rgb.size, "psnr": psnr(rgb, recon), "times": times}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _describe(result: dict[str, Any]) -> str:
    w, h = result["size"]
    timings = ", ".join(f"{step} {_ms(t)}" for step, t in result["times"].items())
    return f"{result['input']} ({w}x{h}) -> {result['output']}  PSNR {result['psnr']:.2f} dB  ({timings})"


def _roundtrip(args: argparse.Namespace) -> int:
    from .vae_loader import VAELoader

    output = None if args.output is None else Path(args.output)
    output_is_dir = args.output is not None and args.output.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))
    pairs = _plan(args.image, output, output_is_dir=output_is_dir, overwrite=args.overwrite)
    single = not args.image.is_dir()
    if single:  # read the image before the (slower) model load, so that a bad file fails fast
        image = _load_image(args.image, args.size)
    start = time.perf_counter()
    with _quiet_dependencies(args.verbose):
        vae, device = VAELoader().load_sd_vae(args.model, args.device, dtype=_DTYPES[args.dtype])
    print(f"model {args.model} on {device} ({args.dtype}): loaded in {_ms(time.perf_counter() - start)}")

    if single:
        print(_describe(_roundtrip_one(vae, device, args.image, image, pairs[0][1], args.overwrite)))
        return 0

    from tqdm import tqdm

    results, failed = [], 0
    for src, dst in tqdm(pairs, desc="roundtrip", unit="image", disable=None):
        try:
            result = _roundtrip_one(vae, device, src, _load_image(src, args.size), dst, args.overwrite)
        except _CliError as err:
            failed += 1
            tqdm.write(f"{args.prog}: skipped {src}: {err}", file=sys.stderr)
            continue
        results.append(result)
        tqdm.write(_describe(result), file=sys.stdout)
    if results:
        finite = [r["psnr"] for r in results if r["psnr"] != float("inf")]
        mean = f"{sum(finite) / len(finite):.2f} dB" if finite else "inf"
        totals = {step: sum(r["times"][step] for r in results) for step in results[0]["times"]}
        timing = ", ".join(f"{step} {_ms(t)}" for step, t in totals.items())
        print(f"{len(results)} image(s) written to {pairs[0][1].parent}: mean PSNR {mean}; total {timing}")
    if failed:
        print(f"{args.prog}: error: {failed} of {len(pairs)} image(s) failed", file=sys.stderr)
        return 1
    return 0


# --- encode / decode ------------------------------------------------------------------------------


@contextmanager
def _log_lines(prog: str) -> Iterator[None]:
    """Show the library's warnings (a skipped image, an OOM retry) as one line each, above the progress bar."""
    from tqdm.auto import tqdm

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            level = "warning" if record.levelno >= logging.WARNING else "info"
            tqdm.write(f"{prog}: {level}: {' '.join(record.getMessage().split())}", file=sys.stderr)

    lg = logging.getLogger("vae_toolkit")
    handler = _Handler(logging.INFO if lg.getEffectiveLevel() <= logging.INFO else logging.WARNING)
    previous = lg.propagate
    lg.addHandler(handler)
    lg.propagate = False
    try:
        yield
    finally:
        lg.removeHandler(handler)
        lg.propagate = previous


def _mismatch_message(err: Any) -> str:
    """A store refusal in command-line terms (flags, not keyword arguments)."""
    return (
        f"{err.folder} holds latents made with other settings ({'; '.join(err.problems)}); use another output "
        "folder (-o), or pass --overwrite to replace that store"
    )


def _encode(args: argparse.Namespace) -> int:
    from .dataset import INDEX_NAME, StoreLockedError, StoreMismatchError, check_store, encode_dataset
    from .vae_loader import VAELoader

    if not args.source.exists():
        raise _UsageError(f"argument SOURCE: {args.source} does not exist")
    model = _model_name(args.model)  # a folder is recorded as its resolved path
    reader = "exact" if args.exact_resize or args.size is None else "fast"
    expected = {"model": model, "size": args.size, "dtype": args.latent_dtype, "vae_dtype": args.dtype}
    expected.update({"sample": args.sample, "seed": args.seed if args.sample else None, "reader": reader})
    try:
        if not args.overwrite:
            check_store(args.output, **expected)  # refuse a store of another model before loading one
    except StoreMismatchError as err:
        raise _UsageError(_mismatch_message(err)) from err
    except NotADirectoryError as err:
        raise _UsageError(str(err)) from err
    device = args.device
    if local_rank() is not None and device == "cuda":
        device = "auto"  # each rank takes its own GPU (LOCAL_RANK), not the current one
    device = str(VAELoader.get_optimal_device(device))

    def load() -> Any:  # only when there is something to encode
        with _quiet_dependencies(args.verbose):
            return VAELoader().load_sd_vae(model, device, dtype=_DTYPES[args.dtype])[0]

    try:
        with _log_lines(args.prog):
            summary = encode_dataset(
                load,
                args.source,
                args.output,
                model=model,
                size=args.size,
                batch_size=args.batch_size,
                sample=args.sample,
                seed=args.seed,
                dtype=_LATENT_DTYPES[args.latent_dtype],
                workers=args.workers,
                max_shard_size=max(1, int(args.shard_size * 2**20)),
                overwrite=args.overwrite,
                progress=not args.no_progress,
                exact_resize=args.exact_resize,
                checkpoint_every=args.checkpoint_every,
                keep_missing=args.keep_missing,
                device=device,
            )
    except StoreMismatchError as err:
        raise _UsageError(_mismatch_message(err)) from err
    except (StoreLockedError, PermissionError, ValueError, NotADirectoryError) as err:
        # another writer, an output that cannot be written, no images in SOURCE
        raise _UsageError(" ".join(str(err).split())) from err
    if summary.rank == 0:
        print(f"encode: {summary}")
    if summary.failed:
        if summary.rank == 0:
            print(
                f"{args.prog}: error: {len(summary.failed)} of {summary.total} image(s) failed; "
                f"they are listed under 'failures' in {summary.output / INDEX_NAME}",
                file=sys.stderr,
            )
        return 1
    return 0


def _decode_targets(keys: Sequence[str], out_dir: Path) -> list[Path]:
    """``a/b.jpg -> OUT/a/b.png``; when two keys would give the same file, the later one keeps its suffix."""
    used: set[Path] = set()
    targets = []
    for key in keys:
        target = out_dir / Path(key).with_suffix(".png")
        if target in used:
            target = out_dir / f"{key}.png"
        used.add(target)
        targets.append(target)
    return targets


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _decode(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import latents
    from .dataset import LatentStore, StoreDamagedError
    from .image_utils import tensor_to_pil
    from .vae_loader import VAELoader

    try:
        store = LatentStore(args.store)
    except (FileNotFoundError, ValueError, StoreDamagedError) as err:
        raise _UsageError(" ".join(str(err).split())) from err
    from .vae_loader import local_model_config

    model = str(args.model or store.metadata.get("model"))
    if model not in list_available_models() and local_model_config(model) is None:
        raise _UsageError(
            f"the store was made with model {model!r}, which is not registered here; pass --model NAME "
            f"({', '.join(list_available_models())}) or --model FOLDER (one holding a diffusers AutoencoderKL)"
        )
    keys = list(store)[: args.limit] if args.limit is not None else list(store)
    targets = _decode_targets(keys, args.output)
    source = store.metadata.get("source")
    if source and _inside(args.output, Path(source)):
        # never over a source image, whatever the flags; new PNGs there would be taken as images by the next encode
        raise _UsageError(
            f"refusing to decode into {args.output}: it is inside {source}, the folder the store was encoded from "
            "(its images could be replaced, and the next encode would take the PNGs for source images); "
            "choose an output folder (-o) outside it"
        )
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise _UsageError(f"refusing to overwrite {existing[0]}{more}; pass --overwrite to replace them")
    start = time.perf_counter()
    with _quiet_dependencies(args.verbose):
        vae, device = VAELoader().load_sd_vae(model, args.device, dtype=_DTYPES[args.dtype])
    failed: dict[str, str] = {}
    for key, target in tqdm(
        list(zip(keys, targets, strict=True)), desc="decode", unit="image", disable=args.no_progress
    ):
        try:
            latent = store[key]
        except StoreDamagedError as err:  # one line per damaged shard, then the rest
            failed[key] = " ".join(str(err).split())
            tqdm.write(f"{args.prog}: error: {key}: {failed[key]}", file=sys.stderr)
            continue
        with torch.inference_mode():
            image = tensor_to_pil(latents.decode(vae, latent.unsqueeze(0))[0])
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if args.overwrite:
                image.save(target)
            else:  # "x": a file that appeared since the run started is not replaced either
                with open(target, "xb") as file:
                    image.save(file, format="PNG")
        except FileExistsError:
            failed[key] = f"{target} appeared while running; not replaced (pass --overwrite to replace it)"
            tqdm.write(f"{args.prog}: warning: {target} appeared while running; not replaced", file=sys.stderr)
        except (OSError, ValueError) as err:  # e.g. a name too long for the file system: go on with the rest
            failed[key] = f"cannot write {target}: {' '.join(str(err).split())}"
            tqdm.write(f"{args.prog}: error: {failed[key]}", file=sys.stderr)
    store.close()
    seconds = time.perf_counter() - start
    print(f"decode: {len(keys) - len(failed)} of {len(store)} latents -> {args.output} in {seconds:.1f} s")
    if failed:
        print(f"{args.prog}: error: {len(failed)} latent(s) not written (listed above)", file=sys.stderr)
        return 1
    return 0


# --- evaluate -------------------------------------------------------------------------------------


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import ReportExistsError, check_report_folder, evaluate
    from .vae_loader import VAELoader

    if len(set(args.model)) != len(args.model):
        twice = next(m for m in args.model if args.model.count(m) > 1)
        raise _UsageError(f"argument --model: {twice!r} is given twice; name each model once")
    if not args.source.exists():
        raise _UsageError(f"argument SOURCE: {args.source} does not exist")
    try:  # before any model loads
        check_report_folder(args.output, args.overwrite)
    except (ReportExistsError, NotADirectoryError) as err:
        raise _UsageError(str(err)) from err
    device = args.device
    if local_rank() is not None and device == "cuda":
        device = "auto"  # each rank takes its own GPU (LOCAL_RANK), not the current one
    loader = VAELoader()
    vaes = {}
    with _quiet_dependencies(args.verbose):
        for model in args.model:
            vaes[model] = loader.load_sd_vae(_model_name(model), device, dtype=_DTYPES[args.dtype])[0]
    try:
        with _log_lines(args.prog):
            result = evaluate(
                vaes,
                args.source,
                args.output,
                size=args.size,
                batch_size=args.batch_size,
                limit=args.limit,
                workers=args.workers,
                seed=args.seed,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except (ValueError, NotADirectoryError, ReportExistsError) as err:
        raise _UsageError(str(err)) from err
    if result.rank != 0:  # rank 0 reports the failures of every rank and carries the exit status
        return 0
    for note in result.notes:
        print(f"{args.prog}: note: {note}", file=sys.stderr)
    summary = result.summary
    width = max(len(m) for m in result.models)
    count = len({r["image"] for r in result.rows})
    print(f"evaluate: {count} image(s), {len(result.failures)} failed, in {result.seconds:.1f} s -> {args.output}")
    for rank, model in enumerate(result.ranking, 1):
        stats = summary[model]
        cells = []
        for metric in result.metrics:
            s = stats[metric]
            cells.append(f"{metric} " + ("-" if s is None else f"{s['mean']:.4g}"))
        print(f"{rank}. {model:<{width}}  " + "  ".join(cells) + "  (means)")
    print(f"report: {args.output / 'index.html'}")
    if result.failures:
        print(
            f"{args.prog}: error: {len(result.failures)} image(s) failed; they are listed under 'failures' in "
            f"{args.output / 'summary.json'}",
            file=sys.stderr,
        )
        return 1
    return 0


# --- parser and entry point -----------------------------------------------------------------------


def _device_arg(value: str) -> str:
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
    """A registered model name, or a local folder holding a diffusers AutoencoderKL (kept as written)."""
    from .vae_loader import local_model_config

    if value in list_available_models() or local_model_config(value) is not None:
        return value
    hint = " (the folder has no config.json, nor vae/config.json)" if Path(value).expanduser().is_dir() else ""
    raise argparse.ArgumentTypeError(
        f"invalid model {value!r}: neither a registered name ({', '.join(list_available_models())}) nor a folder "
        f"holding a diffusers AutoencoderKL (config.json + safetensors){hint}"
    )


def _model_name(value: str) -> str:
    """The name a store records for ``--model``: a registered name as is, a folder as its resolved path."""
    from .vae_loader import local_model_config

    local = local_model_config(value)
    return value if local is None else str(local["repo_id"])


_size_arg = _int_arg("size", 1, f"a positive multiple of {_MULTIPLE}", _MULTIPLE)
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
    model_help = f"registered model ({names}) or a folder holding a diffusers AutoencoderKL"
    # --device and --dtype, the same in every command that loads a VAE
    vae_options = _Parser(add_help=False)
    vae_options.add_argument(
        "--device", default="auto", type=_device_arg, help="auto (default), cpu, mps, cuda or cuda:N"
    )
    vae_options.add_argument(
        "--dtype", default="float32", choices=list(_DTYPES), help="weights dtype (default float32)"
    )
    # one required --model, as roundtrip and encode take it
    one_model = _Parser(add_help=False)
    one_model.add_argument("--model", "-m", required=True, type=_model_arg, metavar="NAME", help=model_help)

    rt = commands.add_parser(
        "roundtrip",
        parents=[common, one_model, vae_options],
        help="encode and decode images, print PSNR and timings",
        description="Encode and decode an image (or every image in a directory), save the reconstruction and "
        "print its PSNR and the time of each step. Images keep their size, center-cropped to a multiple of 8 pixels "
        "(or, with --size N, resized and center-cropped to N x N).",
    )
    rt.add_argument("image", type=Path, metavar="IMAGE", help="an image file or a directory of images")
    rt.add_argument(
        "--size",
        type=_size_arg,
        metavar="N",
        help="resize the shorter side to N and center-crop N x N (N a multiple of 8)",
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
    enc.add_argument("source", type=Path, metavar="SOURCE", help="a folder of images (searched recursively)")
    enc.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="the store folder")
    enc.add_argument("--size", type=_size_arg, metavar="N", help="resize the shorter side to N, center-crop N x N")
    enc.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="images per batch (default 8)")
    enc.add_argument(
        "--latent-dtype",
        default="float32",
        choices=list(_LATENT_DTYPES),
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
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")

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
    ev.add_argument("--overwrite", action="store_true", help="replace the report in a non-empty REPORT folder")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        ours = issubclass(category, (VAEToolkitWarning, RuntimeWarning))
        ours = ours or os.path.abspath(filename).startswith(package_dir)
        if verbose or ours:
            # The library's hints name its arguments; on the command line they are options.
            text = " ".join(str(message).split()).replace("device='cpu'", "--device cpu")
            print(f"{prog}: warning: {text}", file=sys.stderr if file is None else file)

    return show


@contextmanager
def _quiet_dependencies(verbose: bool) -> Iterator[None]:
    """Hide the INFO/WARNING chatter of diffusers and huggingface_hub (e.g. "Could not reach the Hub" in
    offline mode) unless ``--verbose`` or ``DIFFUSERS_VERBOSITY`` / ``HF_HUB_VERBOSITY`` ask for it."""
    import diffusers.utils.logging  # noqa: F401 - configures the "diffusers" logger; imported to load anyway
    import huggingface_hub.utils.logging  # noqa: F401 - configures the "huggingface_hub" logger

    names = [
        n
        for n, var in (("diffusers", "DIFFUSERS_VERBOSITY"), ("huggingface_hub", "HF_HUB_VERBOSITY"))
        if not verbose and not os.environ.get(var)
    ]
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
                return _encode(args)
            if args.command == "decode":
                return _decode(args)
            if args.command == "evaluate":
                return _evaluate(args)
            return _roundtrip(args)
        except BrokenPipeError:  # e.g. `vae-toolkit env | head`
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1
        except KeyboardInterrupt:
            kept = (
                "; the latents encoded so far are kept: run the same command to resume"
                if args.command == "encode"
                else ""
            )
            print(f"{prog}: interrupted{kept}", file=sys.stderr)
            return 130
        except SystemExit as exit_:
            if exit_.code != 128 + 15:  # SIGTERM during encode (SLURM preemption, torchrun teardown)
                raise
            print(
                f"{prog}: terminated (SIGTERM); the latents encoded so far are kept: run the same command to resume",
                file=sys.stderr,
            )
            return 143
        except _UsageError as err:
            print(f"{prog} {args.command}: error: {err} (see '{prog} {args.command} --help')", file=sys.stderr)
            return 2
        except (_CliError, ImageProcessingError, OSError) as err:  # VAELoadError is an OSError
            print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
