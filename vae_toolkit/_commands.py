"""The commands that run a model: ``roundtrip``, ``encode``, ``decode`` and ``evaluate``.

Each parses nothing (``__main__`` builds the parser and the environment report) and is a thin layer over the
library's public functions: it checks what the user gave, calls one function, and prints what it did. torch and
the image modules are imported inside the commands, so that ``--help`` and argument errors do not import them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._signals import SIGTERM_STATUS
from .model_config import list_available_models

if TYPE_CHECKING:
    import torch
    from PIL import Image


DTYPES = ("float32", "float16", "bfloat16")  # --dtype: the weights'


LATENT_DTYPES = (*DTYPES, "float64")  # --latent-dtype: the stored latents'


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` / ``--latent-dtype`` name."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[
        name
    ]


def local_rank() -> int | None:
    from .device_manager import local_rank as rank

    return rank()


def image_extensions() -> frozenset[str]:
    from .image_utils import image_extensions as extensions

    return extensions()


MULTIPLE = 8  # spatial downsampling of the SD / SDXL / FLUX VAEs


class CliError(Exception):
    """A failure reported as one line with exit status 1."""


class UsageError(CliError):
    """A bad combination of arguments found after parsing: one line, exit status 2."""


def model_name(value: str) -> str:
    """The name a store records for ``--model``: a registered name as is, a folder as its resolved path."""
    from .vae_loader import local_model_config

    local = local_model_config(value)
    return value if local is None else str(local["repo_id"])


@contextmanager
def quiet_dependencies(verbose: bool) -> Iterator[None]:
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
            raise CliError(f"no image files found in directory {source}")
        out_dir = output if output is not None else source.with_name(source.name + "-roundtrip")
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"argument -o/--output: {out_dir} is a file; IMAGE is a directory, so pass -o DIR")
        used: set[str] = set()
        pairs = []
        for src in inputs:
            name = f"{src.stem}.png" if f"{src.stem}.png" not in used else f"{src.name}.png"
            used.add(name)
            pairs.append((src, out_dir / name))
    else:
        if not source.exists():
            raise CliError(f"image file not found: {source}")
        if output is None:
            dst = source.with_name(f"{source.stem}-roundtrip.png")
        elif output_is_dir or output.is_dir():
            dst = output / f"{source.stem}-roundtrip.png"
        else:
            dst = output
            if dst.suffix.lower() not in image_extensions():
                raise UsageError(
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
            raise UsageError(f"argument -o/--output: refusing to overwrite the input image {inputs[dst.resolve()]}")
    if overwrite:
        return
    existing = [dst for _, dst in pairs if dst.exists() or dst.is_symlink()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"{existing[0]}{more} already exists; pass --overwrite to replace it, or choose -o OUT")


def _open_image(path: Path) -> Image.Image:
    from .image_utils import ImageProcessingError, open_image

    try:
        return open_image(path)
    except ImageProcessingError as err:
        raise CliError(str(err)) from err


def _prepare(rgb: Image.Image, size: int | None, multiple: int = MULTIPLE) -> Image.Image:
    from .image_utils import ImageProcessingError, center_crop_to_multiple, pil_to_tensor, tensor_to_pil

    if size is not None:
        return tensor_to_pil(pil_to_tensor(rgb, target_size=size))
    try:
        return center_crop_to_multiple(rgb, multiple)
    except ImageProcessingError as err:
        raise CliError(str(err)) from err


def _load_image(src: Path, size: int | None, multiple: int = MULTIPLE) -> tuple[Image.Image, torch.Tensor, float]:
    """``(rgb, [1, 3, H, W] tensor, seconds taken)`` for one input image."""
    from .image_utils import pil_to_tensor

    start = time.perf_counter()
    rgb = _prepare(_open_image(src), size, multiple)
    x = pil_to_tensor(rgb).unsqueeze(0)
    return rgb, x, time.perf_counter() - start


def _model_multiple(vae: Any, size: int | None) -> int:
    """The multiple images are cropped to for ``vae`` (its spatial factor, at least 8); a ``--size`` that is not
    one is refused."""
    from .latent_formats import crop_multiple

    multiple = crop_multiple([vae])
    if size is not None and size % multiple:
        raise UsageError(
            f"argument --size: {size} is not a multiple of {multiple}, the spatial factor of the model "
            f"({type(vae).__name__}); pass a multiple of {multiple}"
        )
    return multiple


def _roundtrip_one(
    vae: Any,
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
        raise CliError(f"{dst} appeared while running; not replaced (pass --overwrite to replace it)") from err
    except (OSError, ValueError) as err:
        raise CliError(f"cannot write {dst}: {err}") from err
    times["save"] = time.perf_counter() - start
    return {"input": src, "output": dst, "size": rgb.size, "psnr": psnr(rgb, recon), "times": times}


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _describe(result: dict[str, Any]) -> str:
    w, h = result["size"]
    timings = ", ".join(f"{step} {_ms(t)}" for step, t in result["times"].items())
    return f"{result['input']} ({w}x{h}) -> {result['output']}  PSNR {result['psnr']:.2f} dB  ({timings})"


def roundtrip_command(args: argparse.Namespace) -> int:
    from .vae_loader import VAELoader

    output = None if args.output is None else Path(args.output)
    output_is_dir = args.output is not None and args.output.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))
    pairs = _plan(args.image, output, output_is_dir=output_is_dir, overwrite=args.overwrite)
    single = not args.image.is_dir()
    if single:  # read the image before the (slower) model load, so that a bad file fails fast
        image = _load_image(args.image, args.size)
    start = time.perf_counter()
    with quiet_dependencies(args.verbose):
        vae, device = VAELoader().load_sd_vae(args.model, args.device, dtype=torch_dtype(args.dtype))
    print(f"model {args.model} on {device} ({args.dtype}): loaded in {_ms(time.perf_counter() - start)}")
    multiple = _model_multiple(vae, args.size)

    if single:
        if multiple != MULTIPLE and args.size is None:  # cropped to 8 before the model was known: crop further
            image = _load_image(args.image, args.size, multiple)
        print(_describe(_roundtrip_one(vae, args.image, image, pairs[0][1], args.overwrite)))
        return 0

    from tqdm import tqdm

    results, failed = [], 0
    for src, dst in tqdm(pairs, desc="roundtrip", unit="image", disable=None):
        try:
            result = _roundtrip_one(vae, src, _load_image(src, args.size, multiple), dst, args.overwrite)
        except CliError as err:
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


@contextmanager
def pixel_limit() -> Iterator[None]:
    """During a command, ``--max-pixels`` (0: none) is the only pixel limit: PIL's own decompression-bomb check
    (a warning above 89.5 MP, an error above twice that, raised only through ``PIL.Image.MAX_IMAGE_PIXELS``, which
    no command-line user can set) is turned off, since the reader refuses larger images before PIL decodes them."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _mismatch_message(err: Any) -> str:
    """A store refusal in command-line terms (flags, not keyword arguments)."""
    return (
        f"{err.folder} holds latents made with other settings ({'; '.join(err.problems)}); use another output "
        "folder (-o), or pass --overwrite to replace that store"
    )


def encode_command(args: argparse.Namespace) -> int:
    from .buckets import training_settings
    from .dataset import INDEX_NAME, StoreLockedError, StoreMismatchError, check_store, encode_dataset
    from .encoding import EXIF_ORIENTATION
    from .vae_loader import VAELoader, weights_fingerprint

    if not args.source.exists() and not re.search(r"\{[^{}]*\}", str(args.source)):  # a brace pattern: expanded later
        raise UsageError(f"argument SOURCE: {args.source} does not exist")
    model = model_name(args.model)  # a folder is recorded as its resolved path
    reader = "exact" if args.exact_resize or (args.size is None and args.buckets is None) else "fast"
    expected = {"model": model, "size": args.size, "dtype": args.latent_dtype, "vae_dtype": args.dtype}
    expected.update({"sample": args.sample, "seed": args.seed if args.sample else None, "reader": reader})
    expected.update({"weights": weights_fingerprint(model), "exif_orientation": EXIF_ORIENTATION, "tile": args.tile})
    try:
        expected.update(training_settings(args.size, args.buckets, args.bucket_step, args.max_aspect, args.flip,
                                          args.distribution, args.sample, args.no_upscale, args.min_size))  # fmt: skip
        if not args.overwrite:
            check_store(args.output, **expected)  # refuse a store of another model before loading one
    except StoreMismatchError as err:
        raise UsageError(_mismatch_message(err)) from err
    except (NotADirectoryError, ValueError) as err:  # also a bucket setting without any bucket
        raise UsageError(str(err)) from err
    device = args.device
    if local_rank() is not None and device == "cuda":
        device = "auto"  # each rank takes its own GPU (LOCAL_RANK), not the current one
    device = str(VAELoader.get_optimal_device(device))

    def load() -> Any:  # only when there is something to encode
        with quiet_dependencies(args.verbose):
            return VAELoader().load_sd_vae(model, device, dtype=torch_dtype(args.dtype))[0]

    try:
        with _log_lines(args.prog), pixel_limit():
            summary = encode_dataset(
                load,
                args.source,
                args.output,
                model=model,
                size=args.size,
                batch_size=args.batch_size,
                sample=args.sample,
                seed=args.seed,
                dtype=torch_dtype(args.latent_dtype),
                workers=args.workers,
                max_shard_size=max(1, int(args.shard_size * 2**20)),
                overwrite=args.overwrite,
                progress=not args.no_progress,
                exact_resize=args.exact_resize,
                checkpoint_every=args.checkpoint_every,
                keep_missing=args.keep_missing,
                device=device,
                buckets=args.buckets,
                bucket_step=args.bucket_step,
                max_aspect=args.max_aspect,
                flip=args.flip,
                distribution=args.distribution,
                verify=args.verify,
                max_pixels=args.max_pixels or None,
                image_column=args.image_column,
                key_column=args.key_column,
                tile=args.tile,
                no_upscale=args.no_upscale,
                min_size=args.min_size,
                caption_column=args.caption_column,
            )
    except StoreMismatchError as err:
        raise UsageError(_mismatch_message(err)) from err
    except (StoreLockedError, PermissionError, ValueError, NotADirectoryError, FileNotFoundError, ImportError) as err:
        # another writer, an output that cannot be written, no images in SOURCE, a shard missing, no pyarrow
        raise UsageError(" ".join(str(err).split())) from err
    if summary.rank == 0:
        print(f"encode: {summary}")
    if summary.failed:
        if summary.rank == 0:
            print(
                f"{args.prog}: error: {_failed_count(len(summary.failed), summary.total)} failed; "
                f"they are listed under 'failures' in {summary.output / INDEX_NAME}",
                file=sys.stderr,
            )
        return 1
    return 0


def _failed_count(failed: int, total: int) -> str:
    """``2 of 10 image(s)``; a shard that could not be read is a failure of no known image count."""
    return f"{failed} of {total} image(s)" if failed <= total else f"{failed} image(s) or shard(s)"


def _decode_targets(keys: Sequence[str], out_dir: Path) -> list[Path | None]:
    """``a/b.jpg -> OUT/a/b.png``; when two keys would give the same file, the later one keeps its suffix.

    A key that would not name a file inside ``out_dir`` (``..``, absolute, empty, or through a link in ``out_dir``
    that leads outside) gets ``None``: whatever a store holds, decode writes only inside its folder."""
    from .archives import check_member_name  # the rule encode applies when it makes a key

    used: set[Path] = set()
    targets: list[Path | None] = []
    for key in keys:
        if check_member_name(key) is not None or key.startswith("/"):
            targets.append(None)
            continue
        target = out_dir / Path(key).with_suffix(".png")
        if target in used:
            target = out_dir / f"{key}.png"
        used.add(target)
        targets.append(_target(out_dir, target))
    return targets


def _target(out_dir: Path, target: Path) -> Path | None:
    """``target`` when it lies inside ``out_dir`` once links are resolved (the file's own link aside), else None."""
    try:
        folder = out_dir.resolve()
        if not target.parent.resolve().is_relative_to(folder) or target.name in ("", ".", ".."):
            return None
    except (OSError, RuntimeError):  # a link loop
        return None
    return target


def _replace_png(image: Any, target: Path) -> None:
    """Write a PNG to a new file beside ``target`` and move it over ``target``: a link there is replaced, not
    followed."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's mode, as a plain save gives
    try:
        with os.fdopen(fd, "wb") as file:
            image.save(file, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def decode_command(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from . import latents
    from .dataset import LatentStore, StoreDamagedError
    from .image_utils import tensor_to_pil
    from .vae_loader import VAELoader

    try:
        store = LatentStore(args.store)
    except (FileNotFoundError, ValueError, StoreDamagedError) as err:
        raise UsageError(" ".join(str(err).split())) from err
    from .vae_loader import local_model_config

    model = str(args.model or store.metadata.get("model"))
    if model not in list_available_models() and local_model_config(model) is None:
        raise UsageError(
            f"the store was made with model {model!r}, which is not registered here; pass --model NAME "
            f"({', '.join(list_available_models())}) or --model FOLDER (one holding a supported diffusers autoencoder)"
        )
    keys = list(store)[: args.limit] if args.limit is not None else list(store)
    targets = _decode_targets(keys, args.output)
    source = store.metadata.get("source")
    if source and _inside(args.output, Path(source)):
        # never over a source image, whatever the flags; new PNGs there would be taken as images by the next encode
        raise UsageError(
            f"refusing to decode into {args.output}: it is inside {source}, the folder the store was encoded from "
            "(its images could be replaced, and the next encode would take the PNGs for source images); "
            "choose an output folder (-o) outside it"
        )
    failed: dict[str, str] = {}
    for key, target in zip(keys, targets, strict=True):  # a key holding "..", or a path through a link
        if target is None:
            failed[key] = (f"not written: the key does not name a file inside {args.output} (it holds '..', is "
                           "absolute or empty, or passes through a link that leads outside)")  # fmt: skip
            print(f"{args.prog}: error: {key}: {failed[key]}", file=sys.stderr)
    existing = [t for t in targets if t is not None and (t.exists() or t.is_symlink())]
    if existing and not args.overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise UsageError(f"refusing to overwrite {existing[0]}{more}; pass --overwrite to replace them")
    start = time.perf_counter()
    with quiet_dependencies(args.verbose):
        vae, device = VAELoader().load_sd_vae(model, args.device, dtype=torch_dtype(args.dtype))
    for key, target in tqdm(
        [(k, t) for k, t in zip(keys, targets, strict=True) if t is not None],
        desc="decode",
        unit="image",
        disable=args.no_progress,
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
            if _target(args.output, target) is None:  # a link made inside the folder since the check
                raise OSError("the path now passes through a link that leads outside the output folder")
            if args.overwrite:  # a new file moved over the old name: never written through a link
                _replace_png(image, target)
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


def _unique_models(models: Sequence[str], prog: str) -> list[str]:
    """``--model`` values without repeats: one registered name given twice, or one folder given by two spellings
    (``./m`` and ``m/``, a link), is evaluated once, under the first spelling, with a note."""
    from .vae_loader import local_model_config

    first: dict[str, str] = {}
    for model in models:
        local = local_model_config(model) if model not in list_available_models() else None
        key = model if local is None else str(Path(str(local["repo_id"])).resolve())
        if key not in first:
            first[key] = model
        elif first[key] == model:
            print(f"{prog}: note: --model {model} is given twice; evaluated once", file=sys.stderr)
        else:
            print(f"{prog}: note: --model {model} is the same model as {first[key]}; evaluated once", file=sys.stderr)
    return list(first.values())


def _report_refusal(err: Exception) -> UsageError:
    """A report folder refused, in command-line terms (``--overwrite``, ``-o``)."""
    from .report_folder import ReportExistsError

    if isinstance(err, ReportExistsError):
        return UsageError(
            f"report folder {err.folder} exists and is not empty; pass --overwrite to replace the report in it (only "
            "the files a report wrote are replaced), or choose another folder (-o)"
        )
    return UsageError(" ".join(str(err).split()))


def evaluate_command(args: argparse.Namespace) -> int:
    from ._dist import env_rank
    from .eval_perceptual import plan
    from .evaluate import ReportExistsError, ReportInSourceError, check_report_folder, evaluate, require_metrics
    from .vae_loader import VAELoader

    try:  # before anything loads: one line saying what to install
        require_metrics()
    except ImportError as err:
        raise CliError(str(err)) from err
    models = _unique_models(args.model, args.prog)
    if not args.source.exists():
        raise UsageError(f"argument SOURCE: {args.source} does not exist")
    try:  # before any model loads: refused, inside SOURCE, or not writable (rank 0 writes the report)
        if env_rank() == 0:
            check_report_folder(args.output, args.overwrite, source=args.source, probe=True)
    except (ReportExistsError, ReportInSourceError, OSError, ImportError) as err:
        raise _report_refusal(err) from err
    try:  # LPIPS and rFID weights: found or fetched now; asked for by name and missing stops here, before loading
        plan(args.lpips, args.fid)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(" ".join(str(err).split())) from err
    device = args.device
    if local_rank() is not None and device == "cuda":
        device = "auto"  # each rank takes its own GPU (LOCAL_RANK), not the current one
    loader = VAELoader()
    vaes = {}
    with quiet_dependencies(args.verbose):
        for model in models:
            vaes[model] = loader.load_sd_vae(model_name(model), device, dtype=torch_dtype(args.dtype))[0]
    try:
        with _log_lines(args.prog), pixel_limit():
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
                tile=args.tile,
                max_pixels=args.max_pixels or None,
                lpips=args.lpips,  # as asked: a metric on by default and left out is a note of the report
                fid=args.fid,
                fast_reader=args.fast_reader,
            )
    except (ValueError, NotADirectoryError, ReportExistsError) as err:
        raise _report_refusal(err) from err
    if result.rank != 0:  # rank 0 reports the failures of every rank and carries the exit status
        return 0
    for note in result.notes:
        print(f"{args.prog}: note: {note}", file=sys.stderr)
    summary = result.summary
    width = max(len(m) for m in result.models)
    counts = result.counts
    print(
        f"evaluate: {counts['images']} images: {counts['evaluated']} evaluated, {counts['failed']} failed, "
        f"in {result.seconds:.1f} s -> {args.output}"
    )
    for rank, model in enumerate(result.ranking, 1):
        stats = summary[model]
        cells = []
        for metric in result.metrics:
            s = stats[metric]
            cells.append(f"{metric} " + ("-" if s is None else f"{s['mean']:.4g}"))
        if stats.get("rfid") is not None:
            cells.append(f"rfid {stats['rfid']:.4g} ({stats['rfid_images']} images)")
        print(f"{rank}. {model:<{width}}  " + "  ".join(cells) + "  (means)")
    print(f"report: {args.output / 'index.html'}")
    if result.failures:
        print(
            f"{args.prog}: error: {counts['failed']} of {counts['images']} images failed; they are listed under "
            f"'failures' in {args.output / 'summary.json'}",
            file=sys.stderr,
        )
        return 1
    return 0


def fid_command(args: argparse.Namespace) -> int:
    """``fid A B``: :func:`vae_toolkit.fid.fid_between`, then the value (or JSON)."""
    import json

    from .fid import fid_between

    if len(args.paths) > 2 or (len(args.paths) == 1 and args.save_stats is None):
        raise UsageError(f"give two paths A B (or one folder with --save-stats OUT), got {len(args.paths)}")
    try:
        result = fid_between(
            args.paths[0],
            args.paths[1] if len(args.paths) == 2 else None,
            dims=args.dims,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
            kid=args.kid,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            save_stats=args.save_stats,
        )
    except ValueError as err:
        raise CliError(str(err)) from err
    for note in result.notes:
        print(f"{args.prog}: note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        if result.fid is not None:
            print(f"FID: {result.fid}")
        if result.kid_mean is not None:
            subsets = f"{args.kid_subsets} subsets of {result.kid_subset_size}"
            print(f"KID: {result.kid_mean} ± {result.kid_std} ({subsets})")
    if args.save_stats is not None:
        print(f"statistics of {args.paths[0]} -> {args.save_stats}", file=sys.stderr)
    return 0


def compare_command(args: argparse.Namespace) -> int:
    """``compare A B -o REPORT``: :func:`vae_toolkit.compare.compare_folders`, then the means, the unpaired files and
    the failures (exit status 1 when a pair failed)."""
    from .compare import compare_folders

    try:
        with _log_lines(args.prog), pixel_limit():
            result = compare_folders(
                args.a, args.b, args.output, match=args.match, resize=args.resize, name=args.name, lpips=args.lpips,
                fid=args.fid, batch_size=args.batch_size, workers=args.workers, device=args.device, seed=args.seed,
                overwrite=args.overwrite, progress=not args.no_progress, max_pixels=args.max_pixels or None,
            )  # fmt: skip
    except (ValueError, TypeError, NotADirectoryError, FileExistsError, ImportError) as err:
        raise _report_refusal(err) from err
    for note in result.notes:
        print(f"{args.prog}: note: {note}", file=sys.stderr)
    counts, (label,) = result.counts, result.models
    stats = result.summary[label]
    means = [f"{m} " + ("-" if stats[m] is None else f"{stats[m]['mean']:.4g}") for m in result.metrics]
    if stats.get("rfid") is not None:
        means.append(f"fid {stats['rfid']:.4g} ({stats['rfid_images']} pairs)")
    print(
        f"compare: {counts['images']} pairs: {counts['evaluated']} compared, {counts['failed']} failed; "
        f"{counts['only_in_a']} files only in A, {counts['only_in_b']} only in B; in {result.seconds:.1f} s"
    )
    print(f"{label}: " + "  ".join(means) + "  (means)")
    for side, only in (("A", result.only_in_a), ("B", result.only_in_b)):
        for key in only:
            print(f"only in {side}: {key}")
    print(f"report: {args.output / 'index.html'}")
    if result.failures:
        print(
            f"{args.prog}: error: {counts['failed']} of {counts['images']} pairs failed; they are listed under "
            f"'failures' in {args.output / 'summary.json'}",
            file=sys.stderr,
        )
        return 1
    return 0


def stopped_note(args: argparse.Namespace) -> str:
    """What a command ended by Ctrl-C (130) or SIGTERM (143) kept, for the line that says it stopped."""
    if args.command == "encode":
        return "; the latents encoded so far are kept: run the same command to resume"
    if args.command not in ("evaluate", "compare"):
        return ""
    import json

    report = args.output
    try:
        summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if not summary.get("partial"):
        return "; no report was written"
    counts = summary.get("counts", {})
    return (
        f"; partial report: {counts.get('evaluated')} of {counts.get('images')} images evaluated, their rows in "
        f'{report / "metrics.csv"}; {report / "summary.json"} says "partial": true'
    )


STOPPED = {130: "interrupted", SIGTERM_STATUS: "terminated (SIGTERM)"}
