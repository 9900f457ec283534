"""Device selection, validation, memory reporting and tensor movement.

The probes (``_cuda_available``, ``_free_memory``, ...) are small module functions so that
they can be replaced in tests.
"""

from __future__ import annotations

import logging
import os
import re
import reprlib
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ._stack import caller_stacklevel

__all__ = ["DeviceManager", "auto_select_device", "ACCEPTED_DEVICES"]

logger = logging.getLogger(__name__)

ACCEPTED_DEVICES = "'auto', 'cpu', 'mps', 'cuda', 'cuda:N' (N = 0, 1, ...) or a torch.device of type cpu, mps or cuda"
# ASCII digits only: ``\d`` would also accept e.g. Arabic-Indic digits, which torch rejects.
_DEVICE_RE = re.compile(r"(auto|cpu|mps|cuda)(?::(0|[1-9][0-9]*))?", re.ASCII)
_GB = 1024**3


# --- probes -------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _cuda_device_count() -> int:
    return torch.cuda.device_count() if _cuda_available() else 0


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _cuda_uuid(index: int) -> str | None:
    """NVML-style UUID (``GPU-...``) of CUDA device ``index`` from its properties; ``None`` if torch has none.

    Reading the properties does not create a CUDA context on the device.
    """
    try:
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except Exception:
        return None
    text = "" if uuid is None else str(uuid)
    if not text:
        return None
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _visible_devices() -> list[int | str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of physical indices or UUIDs; ``None`` when unset or empty."""
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


def _nvml_ids(count: int) -> list[int | str | None]:
    """The NVML id (UUID or physical index) of each CUDA device 0..count-1; ``None`` where unknown.

    NVML numbers GPUs by PCI bus, while CUDA orders them fastest first unless
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (and ``CUDA_VISIBLE_DEVICES`` indices follow CUDA's order).
    The UUID torch reports for each device identifies it whatever the order, so it is used
    when available; otherwise the physical index comes through ``CUDA_VISIBLE_DEVICES``,
    which is exact with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or identical GPUs.
    """
    visible = _visible_devices()
    ids: list[int | str | None] = []
    for index in range(count):
        uuid = _cuda_uuid(index)
        if uuid is not None:
            ids.append(uuid)
        elif visible is None:
            ids.append(index)
        else:
            ids.append(visible[index] if index < len(visible) else None)
    return ids


def _nvml_memory(count: int) -> list[tuple[int, int] | None] | None:
    """(free, total) bytes per CUDA device 0..count-1 from NVML, without creating CUDA contexts.

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
        for index, nvml_id in enumerate(_nvml_ids(count)):
            try:
                if nvml_id is None:
                    raise LookupError("not listed in CUDA_VISIBLE_DEVICES")
                if isinstance(nvml_id, int):
                    handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_id)
                else:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(nvml_id)
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                result.append((int(info.free), int(info.total)))
            except Exception as err:
                logger.debug("NVML could not query cuda:%d (NVML id %r): %s", index, nvml_id, err)
                result.append(None)
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
    if rank is None or world is None:
        return None
    try:
        local_rank, world_size = int(rank), int(world)
        if local_rank < 0:
            raise ValueError("negative LOCAL_RANK")
    except ValueError:
        warnings.warn(
            f"Ignoring LOCAL_RANK={rank!r} / WORLD_SIZE={world!r}: expected non-negative integers.",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )
        return None
    return local_rank if world_size > 1 else None


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
                stacklevel=caller_stacklevel(),
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
            if rank >= count:
                warnings.warn(
                    f"LOCAL_RANK={rank} but only {count} CUDA device(s) are visible; using cuda:{index}, which "
                    "another rank also uses. Launch at most one process per GPU, or set CUDA_VISIBLE_DEVICES "
                    "per rank.",
                    RuntimeWarning,
                    stacklevel=caller_stacklevel(),
                )
            logger.info("Distributed run (LOCAL_RANK=%d): using cuda:%d", rank, index)
            return f"cuda:{index}"
        if count == 1:
            return "cuda:0"
        free = _cuda_free_memory_all(count)
        if not free:
            warnings.warn(
                "No CUDA device answered a memory query; using cuda:0.", RuntimeWarning, stacklevel=caller_stacklevel()
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
            "MPS was requested but is not available; using CPU.", RuntimeWarning, stacklevel=caller_stacklevel()
        )
        return "cpu"
    count = _cuda_device_count()
    if count == 0:
        warnings.warn(
            f"{request!s} was requested but CUDA is not available; using CPU. "
            "Install a CUDA build of torch or pass device='cpu' to silence this.",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
        )
        return "cpu"
    if index is None:
        return f"cuda:{torch.cuda.current_device()}"
    if index >= count:
        warnings.warn(
            f"cuda:{index} was requested but only {count} CUDA device(s) are visible; using cuda:0.",
            RuntimeWarning,
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


def _check_tensor(obj: object, method: str) -> None:
    if not isinstance(obj, torch.Tensor):
        raise TypeError(
            f"{method} expects torch.Tensor arguments, got {type(obj).__name__}; "
            "use move_batch_to_device for lists, tuples and dicts."
        )
