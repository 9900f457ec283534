"""Device selection, validation, memory reporting and tensor movement.

The probes (``_cuda_available``, ``_free_memory``, ...) are small module functions so that
they can be replaced in tests.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["DeviceManager", "auto_select_device", "ACCEPTED_DEVICES"]

logger = logging.getLogger(__name__)

ACCEPTED_DEVICES = "'auto', 'cpu', 'mps', 'cuda', 'cuda:N' (N = 0, 1, ...) or a torch.device of those types"
_DEVICE_RE = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")
_GB = 1024**3


# --- probes -------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _cuda_device_count() -> int:
    return torch.cuda.device_count() if _cuda_available() else 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _visible_nvml_ids(count: int) -> list[int | str]:
    """NVML ids of the CUDA devices 0..count-1: physical indices or UUIDs from ``CUDA_VISIBLE_DEVICES``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return list(range(count))
    ids: list[int | str] = []
    for item in visible.split(","):
        item = item.strip()
        if not item:
            break
        ids.append(int(item) if item.isdigit() else item)
    return ids[:count]


def _nvml_memory(count: int) -> list[tuple[int, int] | None] | None:
    """(free, total) bytes per visible CUDA device from NVML, without creating CUDA contexts.

    Returns ``None`` when NVML is not installed or does not initialise; an entry is ``None``
    when that one device could not be queried.
    """
    try:
        import pynvml  # provided by the optional extra ``nvml`` (nvidia-ml-py)
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVMLError, missing driver library, ...
        logger.debug("NVML present but did not initialise (%s); using torch.cuda.mem_get_info", err)
        return None
    try:
        result: list[tuple[int, int] | None] = []
        for nvml_id in _visible_nvml_ids(count):
            try:
                if isinstance(nvml_id, int):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_id)
                else:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(nvml_id)
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                result.append((int(info.free), int(info.total)))
            except Exception as err:
                logger.debug("NVML could not query device %r: %s", nvml_id, err)
                result.append(None)
        if len(result) != count:
            logger.debug("NVML sees %d of %d CUDA devices; using torch.cuda.mem_get_info", len(result), count)
            return None
        return result
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # pragma: no cover - shutdown failures are harmless
            pass


def _free_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of CUDA device ``index`` as the driver reports them (all processes counted)."""
    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total)


def _distributed_local_rank() -> int | None:
    """``LOCAL_RANK`` when running under a distributed launcher with ``WORLD_SIZE`` > 1."""
    rank, world = os.environ.get("LOCAL_RANK"), os.environ.get("WORLD_SIZE")
    try:
        if rank is not None and world is not None and int(world) > 1:
            return int(rank)
    except ValueError:
        logger.warning("Ignoring LOCAL_RANK=%r / WORLD_SIZE=%r: not integers", rank, world)
    return None


# --- selection ----------------------------------------------------------------------------------


def _cuda_free_memory_all(count: int) -> dict[int, int]:
    """Free bytes per CUDA index; devices that fail to answer are left out with a warning."""
    nvml = _nvml_memory(count)
    free: dict[int, int] = {}
    for index in range(count):
        if nvml is not None and nvml[index] is not None:
            free[index] = nvml[index][0]  # type: ignore[index]
            continue
        try:
            free[index] = _free_memory(index)[0]
        except Exception as err:
            warnings.warn(
                f"Skipping cuda:{index} while choosing a device: querying its memory failed ({err}).",
                RuntimeWarning,
                stacklevel=3,
            )
    return free


def auto_select_device() -> str:
    """Pick the best device: the CUDA device with the most free memory, else ``'mps'``, else ``'cpu'``.

    Free memory is what the driver reports (other processes count). Under a distributed launcher
    (``LOCAL_RANK`` set and ``WORLD_SIZE`` > 1) each process takes ``cuda:LOCAL_RANK``.

    Example:
        >>> auto_select_device()  # doctest: +SKIP
        'cuda:1'
    """
    count = _cuda_device_count()
    if count > 0:
        rank = _distributed_local_rank()
        if rank is not None:
            index = rank % count
            logger.info("Distributed run (LOCAL_RANK=%d): using cuda:%d", rank, index)
            return f"cuda:{index}"
        if count == 1:
            return "cuda:0"
        free = _cuda_free_memory_all(count)
        if not free:
            warnings.warn("No CUDA device answered a memory query; using cuda:0.", RuntimeWarning, stacklevel=2)
            return "cuda:0"
        best = max(free, key=lambda i: (free[i], -i))
        logger.info("Selected cuda:%d (%.2f GB free)", best, free[best] / _GB)
        return f"cuda:{best}"
    if _mps_available():
        return "mps"
    return "cpu"


def resolve_device(request: str | torch.device) -> str:
    """Validate a device request and return a concrete device string (``'cpu'``, ``'mps'``, ``'cuda:N'``).

    Falls back with a warning: CUDA missing → ``'cpu'``; ``cuda:N`` out of range → ``'cuda:0'``;
    MPS missing → ``'cpu'``.

    Raises:
        TypeError: if ``request`` is neither a string nor a ``torch.device``.
        ValueError: if the string is not one of the accepted forms.
    """
    if isinstance(request, torch.device):
        kind, index = request.type, request.index
        if kind not in ("cpu", "mps", "cuda"):
            raise ValueError(f"Unsupported device {request!r}. Accepted: {ACCEPTED_DEVICES}.")
    elif isinstance(request, str):
        match = _DEVICE_RE.fullmatch(request)
        if match is None or (match.group(1) in ("auto", "cpu", "mps") and match.group(2) is not None):
            raise ValueError(f"Invalid device {request!r}. Accepted: {ACCEPTED_DEVICES}.")
        kind, index = match.group(1), None if match.group(2) is None else int(match.group(2))
    else:
        raise TypeError(f"device must be a str or torch.device, got {type(request).__name__} ({request!r}). "
                        f"Accepted: {ACCEPTED_DEVICES}.")

    if kind == "auto":
        return auto_select_device()
    if kind == "cpu":
        return "cpu"
    if kind == "mps":
        if _mps_available():
            return "mps"
        warnings.warn("MPS was requested but is not available; using CPU.", RuntimeWarning, stacklevel=3)
        return "cpu"
    count = _cuda_device_count()
    if count == 0:
        warnings.warn(
            f"{request!s} was requested but CUDA is not available; using CPU. "
            "Install a CUDA build of torch or pass device='cpu' to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return "cpu"
    if index is None:
        return f"cuda:{torch.cuda.current_device()}"
    if index >= count:
        warnings.warn(
            f"cuda:{index} was requested but only {count} CUDA device(s) are visible; using cuda:0.",
            RuntimeWarning,
            stacklevel=3,
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
        """Return ``tensor`` on this device (the same object when it is already there)."""
        return tensor.to(self.device, non_blocking=non_blocking)

    def move_batch_to_device(self, batch: Iterable[Any]) -> Any:
        """Move every tensor of a list/tuple (or the values of a mapping) to this device.

        Non-tensor items are kept as they are. Lists and tuples come back as lists.
        """
        if isinstance(batch, Mapping):
            return {k: self.move_to_device(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if isinstance(batch, torch.Tensor):
            return self.move_to_device(batch)
        return [self.move_to_device(t) if isinstance(t, torch.Tensor) else t for t in batch]

    def ensure_same_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Return the tensors on this device; those already there are returned as they are."""
        target = self.torch_device
        return [t if _same_device(t.device, target) else t.to(target) for t in tensors]

    def synchronize(self) -> None:
        """Wait for pending work on this device (no-op on CPU)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        elif self.device == "mps":
            torch.mps.synchronize()

    def get_device_info(self) -> dict[str, Any]:
        """Describe the device: type, CUDA counts, and on CUDA its name and memory (bytes); system RAM."""
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
            try:
                info["free_memory"] = _free_memory(index)[0]
            except Exception as err:
                logger.debug("mem_get_info(%d) failed: %s", index, err)
                info["free_memory"] = None
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

