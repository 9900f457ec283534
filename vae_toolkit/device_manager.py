"""Device selection, validation, memory reporting and tensor movement.

:func:`list_devices` is the one inventory of the visible devices (name, total and free memory, and where
the figures come from); :func:`auto_select_device`, :class:`DeviceManager` and ``python -m vae_toolkit env``
all read it. GPU memory comes from NVML (``nvidia-ml-py``, a dependency on Linux and Windows), which
opens no CUDA context. Without NVML it comes from ``torch.cuda.mem_get_info``, which creates a CUDA
context on every GPU it asks about, kept for the life of the process; that fallback is logged once.

The probes (``_cuda_available``, ``_free_memory``, ...) are small module functions so that
they can be replaced in tests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
import reprlib
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from ._warnings import VAEToolkitWarning, caller_stacklevel

__all__ = [
    "DeviceManager",
    "DeviceRecord",
    "auto_select_device",
    "list_devices",
    "local_rank",
    "resolve_device",
    "ACCEPTED_DEVICES",
]

logger = logging.getLogger(__name__)

ACCEPTED_DEVICES = "'auto', 'cpu', 'mps', 'cuda', 'cuda:N' (N = 0, 1, ...) or a torch.device of type cpu, mps or cuda"
# ASCII digits only: ``\d`` would also accept e.g. Arabic-Indic digits, which torch rejects.
_DEVICE_RE = re.compile(r"(auto|cpu|mps|cuda)(?::(0|[1-9][0-9]*))?", re.ASCII)
# The older MIG form of CUDA_VISIBLE_DEVICES: MIG-GPU-<parent uuid>/<GPU instance id>/<compute instance id>.
_LEGACY_MIG_RE = re.compile(r"MIG-(GPU-[0-9A-Fa-f-]+)/([0-9]+)/([0-9]+)", re.ASCII)
_GB = 1024**3

MemorySource = Literal["nvml", "torch", "psutil"]
"""Where :class:`DeviceRecord` memory figures come from: NVML (no CUDA context), ``torch.cuda.mem_get_info``
(creates a CUDA context on that GPU) or psutil (system RAM, for ``cpu``)."""

_fallback_lock = threading.Lock()
_fallback_logged = False


@dataclasses.dataclass(frozen=True)
class DeviceRecord:
    """One visible device, as :func:`list_devices` reports it.

    Attributes:
        device: ``'cuda:N'``, ``'mps'`` or ``'cpu'``.
        name: The device's name (GPU model, ``'Apple MPS'``, or the CPU).
        total_memory: Bytes; ``None`` when unknown (e.g. MPS).
        free_memory: Bytes free as the driver reports them (other processes count); ``None`` when unknown.
        memory_source: Where the memory figures come from: ``'nvml'``, ``'torch'`` (``mem_get_info``),
            ``'psutil'`` (system RAM, for ``cpu``), or ``None`` when no figure could be read.
        error: Why a figure is missing (``None`` when nothing failed).
    """

    device: str
    name: str | None
    total_memory: int | None
    free_memory: int | None
    memory_source: MemorySource | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


# --- probes -------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _cuda_device_count() -> int:
    return torch.cuda.device_count() if _cuda_available() else 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _cuda_uuid(index: int) -> str | None:
    """The UUID torch reports for CUDA device ``index`` (plain 8-4-4-4-12 hex); ``None`` if this torch has none.

    Reading the properties does not create a CUDA context on the device.
    """
    try:
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:
        return None
    text = "" if uuid is None else str(uuid).strip()
    return text or None


def _visible_devices() -> list[int | str] | None:
    """``CUDA_VISIBLE_DEVICES`` as physical indices, UUIDs or MIG ids, in CUDA's order; ``None`` when unset or empty.

    As CUDA does, the list ends at the first empty entry.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return None
    ids: list[int | str] = []
    for item in visible.split(","):
        item = item.strip()
        if not item:
            break
        ids.append(int(item) if item.isascii() and item.isdigit() else item)
    return ids


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _nvml_handle_by_uuid(nvml: Any, uuid: str) -> Any:
    """NVML handle of a GPU or MIG device given by UUID (``GPU-...``, ``MIG-...``, the legacy
    ``MIG-GPU-<uuid>/<gi>/<ci>``, a unique ``GPU-`` prefix as CUDA accepts, or torch's unprefixed hex)."""
    legacy = _LEGACY_MIG_RE.fullmatch(uuid)
    if legacy is not None:
        parent = _nvml_handle_by_uuid(nvml, legacy.group(1))
        gpu_instance, compute_instance = int(legacy.group(2)), int(legacy.group(3))
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(parent)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
            except Exception:  # an empty slot
                continue
            if (nvml.nvmlDeviceGetGpuInstanceId(mig), nvml.nvmlDeviceGetComputeInstanceId(mig)) == (
                gpu_instance,
                compute_instance,
            ):
                return mig
        raise LookupError(f"no MIG device {gpu_instance}/{compute_instance} on {legacy.group(1)}")
    # torch prints the UUID without NVML's prefix, which is GPU- for a whole GPU and MIG- for a MIG instance.
    candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    failure: Exception | None = None
    for candidate in candidates:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(candidate)
        except Exception as err:
            failure = err
    if uuid.startswith("GPU-"):  # CUDA_VISIBLE_DEVICES may name a GPU by a unique prefix of its UUID
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        matches = [h for h in handles if _text(nvml.nvmlDeviceGetUUID(h)).startswith(uuid)]
        if len(matches) == 1:
            return matches[0]
    raise LookupError(f"NVML knows no device {uuid!r} ({failure})")


def _nvml_handle(nvml: Any, index: int, visible: list[int | str] | None) -> Any:
    """The NVML handle of CUDA device ``index``.

    NVML numbers GPUs by PCI bus, while CUDA orders them fastest first unless
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (and ``CUDA_VISIBLE_DEVICES`` indices follow CUDA's order).
    The UUID torch reports for each device identifies it whatever the order, so it is used
    when available; otherwise the ``CUDA_VISIBLE_DEVICES`` entry (index, UUID or MIG id), where an
    index is exact with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or identical GPUs.
    """
    uuid = _cuda_uuid(index)
    if uuid is not None:
        return _nvml_handle_by_uuid(nvml, uuid)
    if visible is None:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    if index >= len(visible):
        raise LookupError(f"CUDA_VISIBLE_DEVICES lists only {len(visible)} device(s)")
    entry = visible[index]
    if isinstance(entry, int):
        return nvml.nvmlDeviceGetHandleByIndex(entry)
    return _nvml_handle_by_uuid(nvml, entry)


def _nvml_memory(indices: Iterable[int]) -> tuple[dict[int, tuple[int, int]], str | None]:
    """(free, total) bytes per CUDA index from NVML, without creating any CUDA context.

    Returns the figures NVML gave (a device it could not query is left out, with a debug log) and,
    when NVML cannot be used at all, the reason (not installed, no driver library, init failed).
    """
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return {}, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return {}, f"NVML did not initialise: {err}"
    memory: dict[int, tuple[int, int]] = {}
    try:
        visible = _visible_devices()
        for index in indices:
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(_nvml_handle(pynvml, index, visible))
                memory[index] = (int(info.free), int(info.total))
            except Exception as err:
                logger.debug("NVML could not query cuda:%d: %s", index, err)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # pragma: no cover - shutdown failures are harmless
            pass
    return memory, None


def _free_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of CUDA device ``index`` as the driver reports them (all processes counted).

    Creates a CUDA context on that device if the process has none there yet.
    """
    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total)


def _log_torch_fallback(reason: str) -> None:
    """State once per process that GPU memory is read through torch, and what that costs."""
    global _fallback_logged
    with _fallback_lock:
        if _fallback_logged:
            return
        _fallback_logged = True
    logger.warning(
        "NVML cannot be used (%s); GPU memory is read with torch.cuda.mem_get_info instead, which creates a CUDA "
        "context on each GPU it queries: a few hundred MB of that GPU's memory, held until the process exits. "
        "Install nvidia-ml-py (with the NVIDIA driver's libnvidia-ml) to avoid it, or request a device such as "
        "'cuda:0'.",
        reason,
    )


def local_rank() -> int | None:
    """``LOCAL_RANK`` when running under a distributed launcher with ``WORLD_SIZE`` > 1, else ``None``.

    Malformed values are ignored with a ``VAEToolkitWarning``.
    """
    rank, world = os.environ.get("LOCAL_RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    try:
        rank_value, world_size = int(rank), int(world)
        if rank_value < 0:
            raise ValueError("negative LOCAL_RANK")
    except ValueError:
        warnings.warn(
            f"Ignoring LOCAL_RANK={rank!r} / WORLD_SIZE={world!r}: expected non-negative integers.",
            VAEToolkitWarning,
            stacklevel=caller_stacklevel(),
        )
        return None
    return rank_value if world_size > 1 else None


# --- inventory ----------------------------------------------------------------------------------


def _gpu_records(indices: Iterable[int], *, log_fallback: bool = True) -> list[DeviceRecord]:
    indices = list(indices)
    nvml, unusable = _nvml_memory(indices) if indices else ({}, None)
    records = []
    for index in indices:
        name: str | None = None
        total: int | None = None
        free: int | None = None
        source: MemorySource | None = None
        error: str | None = None
        try:
            props = torch.cuda.get_device_properties(index)  # no CUDA context
            name, total = str(props.name), int(props.total_memory)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        if index in nvml:
            (free, total), source = nvml[index], "nvml"
        else:
            if unusable is not None and log_fallback:
                _log_torch_fallback(unusable)
            try:
                (free, total), source = _free_memory(index), "torch"
            except Exception as err:
                error = error or f"{type(err).__name__}: {err}"
        records.append(DeviceRecord(f"cuda:{index}", name, total, free, source, error))
    return records


def _cpu_record() -> DeviceRecord:
    name = f"CPU ({platform.machine() or 'unknown'}, {os.cpu_count()} logical cores)"
    try:
        import psutil

        vm = psutil.virtual_memory()
        return DeviceRecord("cpu", name, int(vm.total), int(vm.available), "psutil")
    except Exception as err:  # pragma: no cover - psutil is a dependency
        return DeviceRecord("cpu", name, None, None, None, f"{type(err).__name__}: {err}")


def list_devices() -> list[DeviceRecord]:
    """The visible devices: each CUDA GPU (``cuda:0``, ``cuda:1``, ...), then ``mps`` if available, then ``cpu``.

    GPU memory comes from NVML when it can be used, which creates no CUDA context; otherwise from
    ``torch.cuda.mem_get_info``, which creates one on every GPU (stated once per process in a log
    warning). A GPU whose figures cannot be read is still listed, with ``None`` figures and ``error`` set.
    ``cpu`` reports system RAM (psutil); ``mps`` has no memory figures.

    Example:
        >>> [(d.device, d.free_memory, d.memory_source) for d in list_devices()]  # doctest: +SKIP
        [('cuda:0', 20971520000, 'nvml'), ('cuda:1', 84557545472, 'nvml'), ('cpu', 61194452992, 'psutil')]
    """
    records = _gpu_records(range(_cuda_device_count()))
    if _mps_available():
        records.append(DeviceRecord("mps", "Apple MPS", None, None, None))
    records.append(_cpu_record())
    return records


# --- selection ----------------------------------------------------------------------------------


def auto_select_device() -> str:
    """Pick the best device: the CUDA device with the most free memory, else ``'mps'``, else ``'cpu'``.

    Free memory is what the driver reports (other processes count), read through :func:`list_devices`:
    with NVML no CUDA context is created on any GPU. Under a distributed launcher (``LOCAL_RANK`` set and
    ``WORLD_SIZE`` > 1) each process takes ``cuda:LOCAL_RANK``; a single GPU is taken without a query.

    Example:
        >>> auto_select_device()  # doctest: +SKIP
        'cuda:1'
    """
    count = _cuda_device_count()
    if count > 0:
        rank = local_rank()
        if rank is not None:
            index = rank % count
            if rank >= count:
                warnings.warn(
                    f"LOCAL_RANK={rank} but only {count} CUDA device(s) are visible; using cuda:{index}, which "
                    "another rank also uses. Launch at most one process per GPU, or set CUDA_VISIBLE_DEVICES "
                    "per rank.",
                    VAEToolkitWarning,
                    stacklevel=caller_stacklevel(),
                )
            logger.info("Distributed run (LOCAL_RANK=%d): using cuda:%d", rank, index)
            return f"cuda:{index}"
        if count == 1:
            return "cuda:0"
        free: dict[int, int] = {}
        for record in list_devices():
            if not record.device.startswith("cuda:"):
                continue
            index = int(record.device.split(":")[1])
            if record.free_memory is None:
                warnings.warn(
                    f"Skipping cuda:{index} while choosing a device: querying its memory failed ({record.error}).",
                    VAEToolkitWarning,
                    stacklevel=caller_stacklevel(),
                )
            else:
                free[index] = record.free_memory
        if not free:
            warnings.warn(
                "No CUDA device answered a memory query; using cuda:0.",
                VAEToolkitWarning,
                stacklevel=caller_stacklevel(),
            )
            return "cuda:0"
        best = max(free, key=lambda i: (free[i], -i))
        logger.info("Selected cuda:%d (%.2f GB free)", best, free[best] / _GB)
        return f"cuda:{best}"
    if _mps_available():
        return "mps"
    return "cpu"


def resolve_device(request: str | torch.device) -> str:
    """Validate a device request and return a concrete device string (``'cpu'``, ``'mps'``, ``'cuda:N'``).

    ``'cpu:0'`` / ``'mps:0'`` mean ``'cpu'`` / ``'mps'``. Falls back with a warning: CUDA missing →
    ``'cpu'``; ``cuda:N`` out of range → ``'cuda:0'``; MPS missing → ``'cpu'``.

    Raises:
        TypeError: if ``request`` is neither a string nor a ``torch.device``.
        ValueError: if the string is not one of the accepted forms.
    """
    index: int | None
    if isinstance(request, torch.device):
        kind, index = request.type, request.index
        if kind not in ("cpu", "mps", "cuda") or (kind != "cuda" and index not in (None, 0)):
            raise ValueError(f"Unsupported device {request!r}. Accepted: {ACCEPTED_DEVICES}.")
    elif isinstance(request, str):
        match = _DEVICE_RE.fullmatch(request)
        # 'cpu:0' / 'mps:0' are torch's spellings of 'cpu' / 'mps'; other indices exist only on CUDA.
        kind, number = (match.group(1), match.group(2)) if match else ("", None)
        if match is None or (number is not None and (kind == "auto" or (kind != "cuda" and number != "0"))):
            raise ValueError(f"Invalid device {reprlib.repr(request)}. Accepted: {ACCEPTED_DEVICES}.")
        index = None if number is None else int(number)
    else:
        raise TypeError(
            f"device must be a str or torch.device, got {type(request).__name__} "
            f"({reprlib.repr(request)}). "
            f"Accepted: {ACCEPTED_DEVICES}."
        )

    if kind == "auto":
        return auto_select_device()
    if kind == "cpu":
        return "cpu"
    if kind == "mps":
        if _mps_available():
            return "mps"
        warnings.warn(
            "MPS was requested but is not available; using CPU.", VAEToolkitWarning, stacklevel=caller_stacklevel()
        )
        return "cpu"
    count = _cuda_device_count()
    if count == 0:
        warnings.warn(
            f"{request!s} was requested but CUDA is not available; using CPU. "
            "Install a CUDA build of torch or pass device='cpu' to silence this.",
            VAEToolkitWarning,
            stacklevel=caller_stacklevel(),
        )
        return "cpu"
    if index is None:
        return f"cuda:{torch.cuda.current_device()}"
    if index >= count:
        warnings.warn(
            f"cuda:{index} was requested but only {count} CUDA device(s) are visible; using cuda:0.",
            VAEToolkitWarning,
            stacklevel=caller_stacklevel(),
        )
        return "cuda:0"
    return f"cuda:{index}"


class DeviceManager:
    """Chooses and validates a device, reports its memory and moves tensors to it.

    Args:
        device: ``'auto'`` (most free CUDA memory, else MPS, else CPU), ``'cpu'``, ``'mps'``,
            ``'cuda'`` (the current CUDA device), ``'cuda:N'`` or a ``torch.device``.

    Raises:
        TypeError, ValueError: for a request that is not one of the accepted forms.

    Example:
        >>> dm = DeviceManager()            # doctest: +SKIP
        >>> x = dm.move_to_device(torch.zeros(3))
        >>> dm.get_memory_summary()         # None off CUDA
    """

    def __init__(self, device: str | torch.device = "auto") -> None:
        self.device: str = resolve_device(device)
        logger.info("DeviceManager using %s", self.device)

    def __repr__(self) -> str:
        return f"DeviceManager(device={self.device!r})"

    @property
    def torch_device(self) -> torch.device:
        """This manager's device as a ``torch.device``."""
        return torch.device(self.device)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @staticmethod
    def auto_select_device() -> str:
        """Same as the module function :func:`auto_select_device`."""
        return auto_select_device()

    def get_optimal_device(self, preferred: str | torch.device = "auto") -> torch.device:
        """``'auto'`` → this manager's device; anything else → the validated request."""
        if isinstance(preferred, str) and preferred == "auto":
            return self.torch_device
        return torch.device(resolve_device(preferred))

    def move_to_device(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Return ``tensor`` on this device (the same object when it is already there).

        A ``torch.nn.Module`` is accepted too and, as ``Module.to`` does, moved in place.

        Raises:
            TypeError: if ``tensor`` is neither a ``torch.Tensor`` nor a ``torch.nn.Module``.
        """
        if not isinstance(tensor, torch.nn.Module):
            _check_tensor(tensor, "move_to_device")
        return tensor.to(self.device, non_blocking=non_blocking)

    def move_batch_to_device(self, batch: Iterable[Any]) -> Any:
        """Move every tensor of a batch to this device, through nested lists, tuples and mappings.

        Lists stay lists, tuples (and named tuples) stay tuples, mappings become dicts, other
        iterables become lists; non-tensor items are kept as they are. The input is not modified.
        """
        if isinstance(batch, (torch.Tensor, Mapping, list, tuple, str, bytes)):
            return self._move_nested(batch)
        return [self._move_nested(item) for item in batch]

    def _move_nested(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device)
        if isinstance(obj, Mapping):
            return {key: self._move_nested(value) for key, value in obj.items()}
        if isinstance(obj, list):
            return [self._move_nested(item) for item in obj]
        if isinstance(obj, tuple):
            items = [self._move_nested(item) for item in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        return obj

    def ensure_same_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Return the tensors on this device; those already there are returned as they are.

        Raises:
            TypeError: if an argument is not a ``torch.Tensor``.
        """
        target = self.torch_device
        for tensor in tensors:
            _check_tensor(tensor, "ensure_same_device")
        return [t if _same_device(t.device, target) else t.to(target) for t in tensors]

    def synchronize(self) -> None:
        """Wait for pending work on this device (no-op on CPU)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        elif self.device == "mps":
            torch.mps.synchronize()

    def get_device_info(self) -> dict[str, Any]:
        """Describe the device: type, CUDA counts, and on CUDA its name and memory (bytes); system RAM.

        Free memory comes from NVML when it can be used (``memory_source`` says which), so that no
        CUDA context is created; otherwise ``torch.cuda.mem_get_info`` on this device only.
        """
        cuda_available = _cuda_available()
        info: dict[str, Any] = {
            "device": self.device,
            "device_type": self.device.split(":")[0],
            "cuda_available": cuda_available,
            "cuda_device_count": _cuda_device_count() if cuda_available else 0,
            "mps_available": _mps_available(),
        }
        if self.is_cuda:
            index = torch.device(self.device).index or 0
            props = torch.cuda.get_device_properties(index)
            info["device_name"] = props.name
            info["total_memory"] = int(props.total_memory)
            info["memory_allocated"] = int(torch.cuda.memory_allocated(index))
            info["memory_reserved"] = int(torch.cuda.memory_reserved(index))
            # NVML when it can be used; otherwise mem_get_info on this device only (its own context).
            record = _gpu_records([index], log_fallback=False)[0]
            info["free_memory"] = record.free_memory
            info["memory_source"] = record.memory_source
            if record.free_memory is None:
                logger.debug("Free memory of %s unknown: %s", self.device, record.error)
        try:
            import psutil

            vm = psutil.virtual_memory()
            info["system_memory_total"] = int(vm.total)
            info["system_memory_available"] = int(vm.available)
        except Exception as err:  # pragma: no cover - psutil is a dependency
            logger.debug("psutil unavailable: %s", err)
        return info

    def get_memory_summary(self) -> str | None:
        """One line of this CUDA device's memory in GB; ``None`` when not on CUDA."""
        if not self.is_cuda:
            return None
        info = self.get_device_info()
        free = info.get("free_memory")
        free_txt = f", {free / _GB:.2f} GB free" if free is not None else ""
        return (
            f"{self.device} ({info['device_name']}): {info['memory_allocated'] / _GB:.2f} GB allocated, "
            f"{info['memory_reserved'] / _GB:.2f} GB reserved{free_txt}, {info['total_memory'] / _GB:.2f} GB total"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return (a.index or 0) == (b.index or 0)


def _check_tensor(obj: object, method: str) -> None:
    if not isinstance(obj, torch.Tensor):
        raise TypeError(
            f"{method} expects torch.Tensor arguments, got {type(obj).__name__}; "
            "use move_batch_to_device for lists, tuples and dicts."
        )
