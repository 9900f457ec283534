"""Load VAEs from the hub or a local folder, on the right device, with a cache.

Every diffusers autoencoder class of ``latent_formats.SUPPORTED_CLASSES`` loads: the class the model's
``config.json`` (``_class_name``) names, else the one its registry entry names (``class_name``), else
``AutoencoderKL``. diffusers is imported on the first load, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import json
import logging
import os
import re
import threading
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from .device_manager import DeviceManager, resolve_device
from .model_config import get_default_token, get_model_config

if TYPE_CHECKING:
    from typing import TypeAlias

    from diffusers import (
        AutoencoderDC,
        AutoencoderKL,
        AutoencoderKLFlux2,
        AutoencoderKLHunyuanImage,
        AutoencoderKLQwenImage,
        AutoencoderKLWan,
        AutoencoderTiny,
    )

    #: What :meth:`VAELoader.load_sd_vae` returns: an instance of one of the supported diffusers classes.
    SupportedVAE: TypeAlias = (
        AutoencoderKL
        | AutoencoderKLFlux2
        | AutoencoderKLQwenImage
        | AutoencoderKLWan
        | AutoencoderDC
        | AutoencoderTiny
        | AutoencoderKLHunyuanImage
    )

__all__ = ["VAELoader", "VAELoadError", "local_model_config", "check_local_model", "weights_fingerprint"]

logger = logging.getLogger(__name__)

_CacheKey = tuple[str, str, "torch.dtype | None"]


class VAELoadError(OSError):
    """A VAE could not be loaded; the message names the model, the repo and what to do."""


class VAELoader:
    """Loads VAEs by short name (see ``list_available_models()``) or folder, and caches them per loader.

    The model comes back as the diffusers class its ``config.json`` names (``AutoencoderKL``, ``AutoencoderKLFlux2``,
    ``AutoencoderKLQwenImage``, ``AutoencoderKLWan``, ``AutoencoderDC``, ``AutoencoderTiny`` or
    ``AutoencoderKLHunyuanImage``); any other class is refused before anything loads.

    Args:
        device_manager: When given, ``device="auto"`` means the manager's device and its memory
            summary is logged after each load.

    Example:
        >>> loader = VAELoader(device_manager=DeviceManager())  # doctest: +SKIP
        >>> vae, device = loader.load_sd_vae("sd15")
    """

    def __init__(self, device_manager: DeviceManager | None = None) -> None:
        self.device_manager = device_manager
        self._model_cache: dict[_CacheKey, SupportedVAE] = {}
        self._lock = threading.Lock()
        self._key_locks: dict[_CacheKey, threading.Lock] = {}
        self._auto_device: torch.device | None = None

    def __repr__(self) -> str:
        return f"VAELoader(device_manager={self.device_manager!r}, cached={len(self._model_cache)})"

    @staticmethod
    def get_optimal_device(preferred_device: str | torch.device = "auto") -> torch.device:
        """Resolve a device request.

        ``"auto"`` → :meth:`DeviceManager.auto_select_device` (``cuda:N`` with the most free
        memory, else ``mps``, else ``cpu``); other requests are validated and fall back with a
        warning when unavailable (see :class:`DeviceManager`).

        Raises:
            TypeError, ValueError: for a request that is not one of the accepted forms.
        """
        if isinstance(preferred_device, str) and preferred_device == "auto":
            device = torch.device(DeviceManager.auto_select_device())
        else:
            device = torch.device(resolve_device(preferred_device))
        logger.info("Selected device: %s", device)
        return device

    def _resolve(self, device: str | torch.device) -> torch.device:
        if self.device_manager is not None:
            return self.device_manager.get_optimal_device(device)
        # Through self.get_optimal_device, as in 0.1.0, so that subclasses overriding it are honoured.
        if isinstance(device, str) and device == "auto":
            # Decided once per loader, so that the cache key does not move with free memory.
            if self._auto_device is None:
                self._auto_device = self.get_optimal_device("auto")
            return self._auto_device
        return self.get_optimal_device(device)

    def load_sd_vae(
        self,
        model_name: str = "sd14",
        device: str | torch.device = "auto",
        token: str | None = None,
        use_cache: bool = True,
        *,
        dtype: torch.dtype | None = None,
    ) -> tuple[SupportedVAE, torch.device]:
        """Load a VAE by short name or folder.

        Args:
            model_name: A registered name (``sd14``, ``sdxl``, ``flux2-dev``, ``wan22``, ``taesd``, ...), or a local
                folder that holds a diffusers autoencoder of a supported class (``config.json`` + safetensors
                weights, directly or in ``vae/``).
            device: ``"auto"``, ``"cpu"``, ``"mps"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
            token: Hugging Face token; default ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``.
            use_cache: Return the model this loader already loaded for the same name, device and dtype.
            dtype: Weights dtype (e.g. ``torch.float16``); default: as stored.

        Returns:
            ``(vae, device)``: ``vae`` is an instance of the diffusers class the model's ``config.json`` names
            (an ``AutoencoderKL`` for the Stable Diffusion and FLUX.1 VAEs, as in 0.1.0).

        Raises:
            ValueError: unknown model name, or a malformed ``device`` string.
            TypeError: ``dtype`` is not a ``torch.dtype``, or ``device`` is neither a string nor a ``torch.device``.
            VAELoadError: (an ``OSError``) the model could not be loaded (not in the cache, a gated repo without a
                token, another diffusers class, weights that do not fit); the message says what to do.

        Example:
            >>> vae, device = VAELoader().load_sd_vae("sd14", "cuda")  # doctest: +SKIP
        """
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
        local = local_model_config(model_name)
        if local is not None:  # one cache entry per folder, however its path is written
            model_name = local["repo_id"]
        target = self._resolve(device)
        key: _CacheKey = (model_name, str(target), dtype)
        if use_cache:
            cached = self._model_cache.get(key)
            if cached is not None:
                logger.debug("Using cached VAE %s on %s", model_name, target)
                return cached, target
        config = local if local is not None else get_model_config(model_name)
        if token is None:
            token = get_default_token()
        if not use_cache:
            return self._load(model_name, config, target, token, dtype), target

        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            cached = self._model_cache.get(key)
            if cached is None:
                cached = self._load(model_name, config, target, token, dtype)
                with self._lock:
                    self._model_cache[key] = cached
        return cached, target

    def _load(
        self,
        model_name: str,
        config: dict[str, Any],
        device: torch.device,
        token: str | None,
        dtype: torch.dtype | None,
    ) -> SupportedVAE:
        repo_id = os.path.expanduser(config["repo_id"])  # "~/..." folders; hub ids pass unchanged
        subfolder = config.get("subfolder")
        use_safetensors = config.get("use_safetensors", True)
        if use_safetensors is False:
            logger.warning(
                "Model %r allows pickle (.bin) weights (use_safetensors=False): unpickling runs code from the file; "
                "load only files you trust.",
                model_name,
            )
        kwargs: dict[str, Any] = {"subfolder": subfolder, "token": token, "use_safetensors": use_safetensors}
        if config.get("revision") is not None:
            kwargs["revision"] = config["revision"]
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        if not _accelerate_installed():
            # What diffusers falls back to anyway, minus its log line on every load.
            kwargs["low_cpu_mem_usage"] = False
        logger.info("Loading VAE %s from %s%s", model_name, repo_id, f" ({subfolder})" if subfolder else "")
        where = f"{repo_id}" + (f" ({subfolder})" if subfolder else "")
        revision = config.get("revision")
        if Path(repo_id, subfolder or "", "config.json").is_file():  # a local folder: checked before diffusers runs
            check_local_model({**config, "repo_id": repo_id})
        # The class: as the config.json names it (a local folder, or a hub model in the cache; another class is
        # refused here, before anything loads), else as the registry entry names it, else AutoencoderKL.
        found = _model_config_json(repo_id, subfolder, revision)
        _check_class(found, where)
        found_class = _class_name_of(found)
        class_name = found_class or _registered_class(model_name, config)
        if found_class and config.get("class_name") not in (None, found_class):
            logger.warning(
                "Model %r is registered as a diffusers %s, but %s holds a diffusers %s (config.json _class_name); "
                "loading it as such.",
                model_name,
                config["class_name"],
                where,
                found_class,
            )
        for attempt in range(2):
            failure: Exception | None = None
            try:
                # One load at a time in the process: with accelerate installed, diffusers builds the model inside
                # accelerate's init_empty_weights, which swaps torch.nn.Module.register_parameter for the whole
                # process; two loads at once (other models, other threads) could leave the swap in place, and every
                # module made afterwards, anywhere, would have its parameters on the meta device.
                with _FROM_PRETRAINED, _quiet_hub_notices(), _token_hidden_from_logs(token):
                    vae, info = _diffusers_class(class_name).from_pretrained(
                        repo_id, output_loading_info=True, **kwargs
                    )
            except Exception as err:
                failure = err
            # The hub's config.json is in the cache now if the hub sent it: it names the class (the clearer reason
            # of a failure, or a second try when it is not the class the first one guessed).
            found = _model_config_json(repo_id, subfolder, revision)
            _check_class(found, where)
            found_class = _class_name_of(found)
            if attempt == 0 and found_class is not None and found_class != class_name:
                logger.info("%s holds a diffusers %s, not a %s; loading it as such", where, found_class, class_name)
                class_name = found_class
                continue
            if failure is not None:
                raise _load_error(model_name, config, token, failure) from failure
            break
        _check_loading_info(info, model_name, class_name)
        if vae.device != device:  # .to() walks every module even when nothing moves
            vae = vae.to(device)
        logger.info("VAE %s loaded on %s", model_name, device)
        if self.device_manager is not None:
            summary = self.device_manager.get_memory_summary()
            if summary:
                logger.info("Memory after loading %s: %s", model_name, summary)
        return vae

    @classmethod
    def load_sd_vae_simple(
        cls,
        model_name: str = "sd14",
        device: str | torch.device = "auto",
        token: str | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> tuple[SupportedVAE, torch.device]:
        """Load a VAE once, without a cache (see :meth:`load_sd_vae`)."""
        return cls().load_sd_vae(model_name, device, token, use_cache=False, dtype=dtype)

    def clear_cache(self) -> None:
        """Forget every model this loader cached."""
        with self._lock:
            self._model_cache.clear()
        logger.info("Model cache cleared")


# --- helpers ------------------------------------------------------------------------------------


def local_model_config(model: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The model config of a local folder holding a diffusers model; ``None`` when ``model`` is not one.

    A registered name always wins: ``None`` is returned for it even if a folder of that name exists. The folder
    holds ``config.json`` and the weights, or a ``vae/`` subfolder that does (a whole pipeline folder). Its
    ``repo_id`` is the resolved absolute path. The folder's class is not checked here: :func:`check_local_model` does.

    Example:
        >>> local_model_config("checkpoints/my-vae")  # doctest: +SKIP
        {'repo_id': '/home/me/checkpoints/my-vae', 'subfolder': None, 'description': 'local folder'}
    """
    from .model_config import MODEL_CONFIGS

    if isinstance(model, str) and model in MODEL_CONFIGS:
        return None
    folder = Path(model).expanduser()
    for subfolder in (None, "vae"):
        if (folder / subfolder if subfolder else folder).joinpath("config.json").is_file():
            return {"repo_id": str(folder.resolve()), "subfolder": subfolder, "description": "local folder"}
    return None


_DEFAULT_CLASS = "AutoencoderKL"  # what a config without _class_name, or a registry entry without class_name, holds
_WEIGHTS = "diffusion_pytorch_model"  # diffusers' weights file name (+ .safetensors, .bin, or a sharded index)


def check_local_model(config: dict[str, Any]) -> None:
    """Check, without loading it, that a local model folder holds a diffusers autoencoder of a supported class, with
    weights.

    Reads the folder's ``config.json`` (``_class_name``) and looks for the weights file, so that a folder of
    another diffusers model (a ``UNet2DModel``, say) or a config without weights is refused before anything loads.
    The supported classes are ``latent_formats.SUPPORTED_CLASSES``. The weights themselves are checked when they
    load (no missing, unexpected or reshaped tensors).

    Args:
        config: A model config with ``repo_id`` (the folder) and ``subfolder``, as :func:`local_model_config` returns.

    Raises:
        VAELoadError: the folder holds another model, a config that is not JSON, or no weights.
    """
    folder = Path(os.path.expanduser(config["repo_id"]))
    subfolder = config.get("subfolder")
    model_dir = folder / subfolder if subfolder else folder
    where = f"{folder}" + (f" ({subfolder})" if subfolder else "")
    try:
        found = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise VAELoadError(f"Could not load VAE from {where}: its config.json cannot be read ({err}).") from err
    _check_class(found, where)
    # pickle-only weights are refused when they load, with how to opt in (see _load_error)
    suffixes = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
    if not any((model_dir / f"{_WEIGHTS}{suffix}").is_file() for suffix in suffixes):
        raise VAELoadError(
            f"Could not load VAE from {where}: the folder holds config.json but no weights ({_WEIGHTS}.safetensors); "
            "save the model with save_pretrained(folder), or copy the weights next to config.json."
        )


def _model_config_json(repo_id: str, subfolder: str | None, revision: str | None) -> Any:
    """The model's ``config.json``: a local folder's, or a hub model's from the local cache (no network); None when
    there is none yet or it cannot be read."""
    if os.path.isdir(repo_id):
        path: str | None = str(Path(repo_id, subfolder or "", "config.json"))
    else:
        path = _cached_file(repo_id, f"{subfolder}/config.json" if subfolder else "config.json", revision)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None


def _supported_classes() -> tuple[str, ...]:
    from .latent_formats import SUPPORTED_CLASSES

    return SUPPORTED_CLASSES


def _class_name_of(found: Any) -> str | None:
    """The ``_class_name`` of a parsed ``config.json``, or None."""
    name = found.get("_class_name") if isinstance(found, dict) else None
    return name if isinstance(name, str) else None


def _registered_class(model_name: str, config: dict[str, Any]) -> str:
    """The class a registry entry names (``class_name``), ``AutoencoderKL`` when it names none."""
    name = config.get("class_name") or _DEFAULT_CLASS
    supported = _supported_classes()
    if name not in supported:
        raise VAELoadError(
            f"Could not load VAE {model_name!r}: its registry entry names class_name {name!r}, not one of the "
            f"diffusers autoencoder classes vae-toolkit loads ({', '.join(supported)}); fix it with "
            f"add_model_config({model_name!r}, {{..., 'class_name': ...}})."
        )
    return str(name)


def _diffusers_class(name: str) -> Any:
    """The diffusers class of that name (one of the supported ones)."""
    import diffusers

    return getattr(diffusers, name)


def _cached_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # a malformed repo id, an unreadable cache: nothing to tell
        return None
    return path if isinstance(path, str) else None


def weights_fingerprint(model: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What identifies the weights that ``load_sd_vae(model)`` loads, as a latent store records them.

    - A local folder (or a registered name pointing at one): ``{"files": {name: {"bytes": n, "sha256": hex}}}``
      for its ``config.json`` and weights files (``diffusion_pytorch_model*``).
    - A registered hub model in the local cache: ``{"repo_id": ..., "revision": <commit>}``, the snapshot
      folder the cache resolves the name's revision to (no network).
    - ``None`` when it cannot be told (not a folder nor a registered name, or not in the cache yet).

    The weights are hashed in full (SHA-256) rather than identified by size and mtime: a copy or ``touch`` must
    not count as a change, and a rewrite of the same size must. Hashing runs at ~0.85 GB/s here (0.38-0.40 s for the
    335 MB of an SD VAE), below the time of loading the model, and once per file and process (cached by path,
    size, mtime and inode).

    Example:
        >>> weights_fingerprint("sd15")  # doctest: +SKIP
        {'repo_id': 'stable-diffusion-v1-5/stable-diffusion-v1-5', 'revision': '451f4fe1...'}
    """
    from .model_config import get_all_model_configs

    local = local_model_config(model)
    if local is None:
        config = get_all_model_configs().get(str(model))
        if config is None:
            return None
        repo_id = os.path.expanduser(config["repo_id"])
        subfolder = config.get("subfolder")
        if not os.path.isdir(repo_id):
            path = _cached_file(
                repo_id, f"{subfolder}/config.json" if subfolder else "config.json", config.get("revision")
            )
            parts = Path(path).parts if path is not None else ()
            if "snapshots" not in parts[:-1]:
                return None
            return {"repo_id": config["repo_id"], "revision": parts[parts.index("snapshots") + 1]}
        local = {"repo_id": repo_id, "subfolder": subfolder}
    folder = Path(local["repo_id"], local.get("subfolder") or "")
    files: dict[str, dict[str, Any]] = {}
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.name == "config.json" or file.name.startswith(_WEIGHTS)):
            st = file.stat()
            files[file.name] = {
                "bytes": st.st_size,
                "sha256": _sha256(str(file), st.st_size, st.st_mtime_ns, st.st_ino),
            }
    return {"files": files}


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:  # noqa: ARG001 - the cache key
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _check_class(found: Any, where: str) -> None:
    """Refuse a config whose ``_class_name`` names a diffusers class that is not one of the supported ones."""
    name = found.get("_class_name") if isinstance(found, dict) else None
    supported = _supported_classes()
    if name is not None and name not in supported:
        raise VAELoadError(
            f"Could not load VAE from {where}: it holds a diffusers {name} (config.json _class_name), "
            f"expected one of the diffusers autoencoder classes vae-toolkit loads ({', '.join(supported)}); "
            "pass a folder or registered name of one of those."
        )


def _check_loading_info(info: dict[str, Any], model_name: str, class_name: str = _DEFAULT_CLASS) -> None:
    """Refuse a model whose weights file lacks tensors of its class or holds others (diffusers would leave the
    missing ones randomly initialised, and only log it)."""
    missing, unexpected = list(info.get("missing_keys") or ()), list(info.get("unexpected_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return

    def some(keys: list[Any]) -> str:
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    parts = [f"missing {len(missing)} weight(s) ({some(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected ({some(unexpected)})"] if unexpected else []
    parts += [f"{len(mismatched)} of another shape ({some(mismatched)})"] if mismatched else []
    raise VAELoadError(
        f"Could not load VAE {model_name!r}: its weights do not fit a diffusers {class_name} of its config.json: "
        f"{'; '.join(parts)}; the weights file belongs to another model or is damaged."
    )


@functools.cache
def _accelerate_installed() -> bool:
    return importlib.util.find_spec("accelerate") is not None


class _HubNoticeFilter(logging.Filter):
    """Drops huggingface_hub's "Could not reach the Hub (...). Using cached commit hash for ..." records, and
    diffusers' records of a load that this library turns into a :class:`VAELoadError` anyway ("An error occurred
    while trying to fetch ...", "Some weights of ... were not used / newly initialized"), only those, and only
    from threads inside a load (other threads' records pass)."""

    _MESSAGE = re.compile(
        r"Could not reach the Hub \(.*\)\. Using cached commit hash for |An error occurred while trying to fetch "
        r"|Some weights of ",
        re.DOTALL,
    )
    # Where huggingface_hub logs it (hf_api in 2.x; file_download resolves revisions too), and diffusers' loader.
    # The message pattern alone decides what is dropped, so a logger that never emits it costs nothing.
    LOGGERS = ("huggingface_hub.hf_api", "huggingface_hub.file_download", "diffusers.models.modeling_utils")

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.threads: dict[int, int] = {}  # thread id -> loads in progress in it
        self.added_warning_filter = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread in self.threads and self._MESSAGE.match(record.getMessage()))


_HUB_NOTICES = _HubNoticeFilter()
# diffusers' load_config passes local_dir_use_symlinks="auto" to hf_hub_download, which huggingface_hub >= 1.0
# answers with this UserWarning on every load; nothing the caller can act on.
_SYMLINKS_MESSAGE, _SYMLINKS_MODULE = r"The `local_dir_use_symlinks` argument is deprecated", r"huggingface_hub\."
# The entry that warnings.filterwarnings("ignore", message=..., category=UserWarning, module=...) inserts.
_SYMLINKS_FILTER = ("ignore", re.compile(_SYMLINKS_MESSAGE, re.I), UserWarning, re.compile(_SYMLINKS_MODULE), 0)


@contextmanager
def _quiet_hub_notices() -> Iterator[None]:
    """Silence, for the duration of ``from_pretrained``, two known-irrelevant hub notices, and nothing else.

    - huggingface_hub's WARNING "Could not reach the Hub (...). Using cached commit hash": loading from the
      cache offline is what the caller asked for. A ``logging.Filter`` on the emitting loggers drops that
      message from loading threads only; levels and handlers are not touched.
    - the ``local_dir_use_symlinks`` deprecation ``UserWarning`` (see ``_SYMLINKS_FILTER``). The warning
      filters are process-wide (``warnings.catch_warnings`` saves and restores the whole list, which loses
      other threads' changes), so one entry matching only that message and module is inserted, and exactly
      that entry is removed afterwards.

    Both are installed when the first thread starts loading and removed when the last one is done.
    """
    flt, ident = _HUB_NOTICES, threading.get_ident()
    with flt.lock:
        if not flt.threads:
            for name in flt.LOGGERS:
                logging.getLogger(name).addFilter(flt)
            # Not when the caller has the same entry already: removing it afterwards would remove theirs.
            flt.added_warning_filter = _SYMLINKS_FILTER not in warnings.filters
            if flt.added_warning_filter:
                warnings.filterwarnings("ignore", _SYMLINKS_MESSAGE, UserWarning, _SYMLINKS_MODULE)
        flt.threads[ident] = flt.threads.get(ident, 0) + 1
    try:
        yield
    finally:
        with flt.lock:
            flt.threads[ident] -= 1
            if not flt.threads[ident]:
                del flt.threads[ident]
            if not flt.threads:
                for name in flt.LOGGERS:
                    logging.getLogger(name).removeFilter(flt)
                if flt.added_warning_filter:
                    with contextlib.suppress(ValueError):  # already gone if the caller reset the filters
                        cast("list[object]", warnings.filters).remove(_SYMLINKS_FILTER)


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _is_offline() -> bool:
    from huggingface_hub import constants

    if hasattr(constants, "is_offline_mode"):
        return bool(constants.is_offline_mode())
    return bool(constants.HF_HUB_OFFLINE)  # pragma: no cover - older huggingface_hub


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- keeping the token out of errors and logs ------------------------------------------------------

_hidden_token: contextvars.ContextVar[str | None] = contextvars.ContextVar("vae_toolkit_hidden_token", default=None)
_factory_lock = threading.Lock()
_FROM_PRETRAINED = threading.Lock()  # diffusers' from_pretrained, one at a time (see VAELoader._load)
_factory_installed = False


def _redact(text: str, token: str) -> str:
    return text.replace(token, "***")


def _redacting_record_factory(previous: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        token = _hidden_token.get()
        if token:
            message = record.getMessage()
            if token in message:
                record.msg, record.args = _redact(message, token), ()
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = _redact("".join(traceback.format_exception(record.exc_info[1])).rstrip(), token)
        return record

    return factory


@contextlib.contextmanager
def _token_hidden_from_logs(token: str | None) -> Iterator[None]:
    """While loading, log records created in this thread (diffusers, huggingface_hub, httpx, ...) have the token
    replaced by ``***``, even where a server echoes it back or redirects to a URL that carries it."""
    global _factory_installed
    if not token:
        yield
        return
    with _factory_lock:
        if not _factory_installed:  # wraps whatever factory is in place; inert outside a load with a token
            logging.setLogRecordFactory(_redacting_record_factory(logging.getLogRecordFactory()))
            _factory_installed = True
    reset = _hidden_token.set(token)
    try:
        yield
    finally:
        _hidden_token.reset(reset)


def _redact_chain(err: BaseException, token: str) -> None:
    """Replace the token in the arguments, notes and string attributes of ``err`` and every exception it chains,
    so that ``str``, ``repr`` and ``traceback.format_exception`` of the VAELoadError never show it."""
    for exc in _chain(err):
        exc.args = tuple(_redact(a, token) if isinstance(a, str) else a for a in exc.args)
        for name, value in list(vars(exc).items()):
            if isinstance(value, str) and token in value:
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(exc, name, _redact(value, token))
            elif name == "__notes__" and isinstance(value, list):
                value[:] = [_redact(n, token) if isinstance(n, str) else n for n in value]


def _load_error(model_name: str, config: dict[str, Any], token: str | None, err: Exception) -> VAELoadError:
    """Turn a diffusers / huggingface_hub failure into a VAELoadError that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub import utils as hf  # exports the error classes in every supported version

    if token:
        _redact_chain(err, token)
    repo_id: str = config["repo_id"]
    subfolder = config.get("subfolder")
    chain = _chain(err)

    def has(*types: type[BaseException]) -> bool:
        return any(isinstance(e, types) for e in chain)

    http_err = next((e for e in chain if isinstance(e, hf.HfHubHTTPError)), None)
    response = getattr(http_err, "response", None)
    status = getattr(response, "status_code", None)
    missing = re.search(r"file named ([\w.-]+)", " ".join(str(e) for e in chain))
    missing_file = missing.group(1).rstrip(".") if missing else None
    # a tensor of another shape: torch's load_state_dict error, or diffusers' own when accelerate is installed
    # ("Cannot load <file> because decoder.conv_in.bias expected shape ..., but got ...")
    text = "\n".join(str(e) for e in chain)
    reshaped = sorted(set(re.findall(r"size mismatch for ([\w.]+):|because ([\w.]+) expected shape", text)))
    reshaped = sorted({a or b for a, b in reshaped})
    folder = os.path.expanduser(repo_id)
    include = f" --include '{subfolder}/*'" if subfolder else ""
    download = f"`hf download {repo_id}{include}`"
    url = f"{constants.ENDPOINT}/{repo_id}"
    auth = "check that the token can read it" if token else "set HF_TOKEN (or pass token=...)"
    files_found = False  # the failure is about files the hub (or the cache) gave, not about getting them

    if not os.path.isdir(folder) and (has(hf.HFValidationError) or os.path.isabs(folder) or repo_id.startswith(".")):
        hint = f"the local folder {repo_id} does not exist; check the path registered with add_model_config"
    elif reshaped:
        files_found = True
        hint = (
            f"its weights do not fit the model its config.json describes: {len(reshaped)} of another shape "
            f"({', '.join(reshaped[:3])}{', ...' if len(reshaped) > 3 else ''}); the weights file belongs to another "
            "model or is damaged"
        )
    elif missing_file and missing_file.endswith(".safetensors") and not has(hf.LocalEntryNotFoundError):
        files_found = True
        hint = (
            f"no {missing_file} found. Only safetensors weights are loaded by default, because pickle (.bin) "
            "weights can run arbitrary code when loaded; convert the weights to safetensors, or, for a model you "
            f"trust, opt in with add_model_config({model_name!r}, {{..., 'use_safetensors': False}})"
        )
    elif os.path.isdir(folder):
        hint = (
            f"the local folder does not hold a diffusers autoencoder of a supported class "
            f"({', '.join(_supported_classes())}) ({_first_line(err)})"
        )
    elif has(hf.GatedRepoError):
        hint = f"the repo is gated: accept the license at {url} and " + (
            "check that this token's account has been granted access" if token else "set HF_TOKEN (or pass token=...)"
        )
    elif has(hf.RepositoryNotFoundError):
        hint = f"the repo was not found on the hub (HTTP {status}); check the repo id, or, if it is private or gated, "
        hint += auth
    elif status == 401:
        hint = "the hub rejected the token (HTTP 401); check HF_TOKEN or the token= argument"
    elif status == 403:
        hint = "the hub refused access (HTTP 403); check that the token has read permission for this repo"
    elif status is not None and status >= 500:
        hint = f"the hub answered HTTP {status}, a server error; try again later"
    elif http_err is not None and status is not None:
        hint = f"the hub answered HTTP {status} ({_first_line(http_err)})"
    elif has(hf.OfflineModeIsEnabled) or _is_offline():
        what = f"{missing_file} is" if missing_file else "the model is"
        hint = f"offline mode is on and {what} not in the local cache; set HF_HUB_OFFLINE=0 or pre-download with "
        hint += download
    elif has(hf.LocalEntryNotFoundError, ConnectionError, TimeoutError):
        hint = (
            f"the hub ({constants.ENDPOINT}) could not be reached and the model is not in the local cache; check the "
            f"network or proxy, or pre-download with {download} and set HF_HUB_OFFLINE=1"
        )
    else:
        hint = f"{type(err).__name__}: {_first_line(err)}"
    if (
        config.get("gated")
        and not token
        and not files_found
        and not os.path.isdir(folder)
        and not has(hf.GatedRepoError)
    ):
        # The files could not be had, and no token: whatever else went wrong, a download would need one.
        hint += (
            f"; {repo_id} is a gated repo: accept its license at {url} (logged in to the hub), then set HF_TOKEN to "
            "a read token of that account (or pass token=...)"
        )
    where = f"{repo_id}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    message = f"Could not load VAE {model_name!r} from {where}: {hint}."
    return VAELoadError(message.replace(token, "***") if token else message)
