"""Shared fixtures: an offline Hugging Face cache holding a tiny real AutoencoderKL, and a faked torch.cuda.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported, so they are set here, before any
test module imports it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

_HF_HOME = Path(tempfile.mkdtemp(prefix="vae_toolkit_hf_"))
os.environ["HF_HOME"] = str(_HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
# The metrics' weight files are looked up in $TORCH_HOME/hub/checkpoints: an empty folder of the suite's own, so
# that no test sees (or downloads) a user's weights; tests that need weights plant seeded ones (metric_weights.py).
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="vae_toolkit_torch_")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_VAE_KWARGS = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    layers_per_block=1,
    sample_size=32,
)
REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_tiny_vae(**overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**{**TINY_VAE_KWARGS, **overrides}).eval()


def write_hub_model(hf_home: Path, repo_id: str, subfolder: str | None = "vae", **overrides) -> Path:
    """Save a tiny AutoencoderKL in hub-cache layout; return the snapshot folder."""
    org, name = repo_id.split("/")
    repo_dir = hf_home / "hub" / f"models--{org}--{name}"
    snapshot = repo_dir / "snapshots" / REVISION
    target = snapshot / subfolder if subfolder else snapshot
    make_tiny_vae(**overrides).save_pretrained(target, safe_serialization=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="session")
def hf_home() -> Path:
    """The session's HF_HOME, holding CompVis/stable-diffusion-v1-4 (vae/) as a tiny model."""
    write_hub_model(_HF_HOME, "CompVis/stable-diffusion-v1-4", "vae")
    yield _HF_HOME
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture
def registry():
    """Restore MODEL_CONFIGS after a test that registers models."""
    from vae_toolkit import model_config

    saved = {k: dict(v) for k, v in model_config.MODEL_CONFIGS.items()}
    yield model_config.MODEL_CONFIGS
    model_config.MODEL_CONFIGS.clear()
    model_config.MODEL_CONFIGS.update(saved)


# --- a fake torch.cuda and a fake NVML ------------------------------------------------------------


def gpu_uuid(physical: int) -> str:
    """NVML's UUID of physical GPU ``physical`` (``GPU-`` + 8-4-4-4-12 hex)."""
    return f"GPU-{physical:08x}-1111-2222-3333-444455556666"


def mig_uuid(physical: int, slot: int) -> str:
    """NVML's UUID of MIG instance ``slot`` on physical GPU ``physical`` (``MIG-`` + 8-4-4-4-12 hex)."""
    return f"MIG-{physical:08x}-{slot:04x}-2222-3333-444455556666"


class CudaUUID:
    """Stands in for torch's ``_CUuuid``: ``str()`` is the plain 8-4-4-4-12 hex, without NVML's prefix."""

    def __init__(self, nvml_uuid: str):
        self.text = nvml_uuid.split("-", 1)[1]

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"_CUuuid({self.text!r})"


@dataclass
class FakeProps:
    """``torch.cuda.get_device_properties(i)`` as real torch builds return it: with a ``uuid``."""

    name: str
    total_memory: int
    uuid: CudaUUID


@dataclass
class FakePropsWithoutUUID:
    """Properties of a torch build that has no ``uuid`` field (kept for the test of that fallback)."""

    name: str
    total_memory: int


# torch.cuda functions that take a device and may create a CUDA context on it; get_device_properties does not.
CONTEXT_CALLS = ("mem_get_info", "memory_allocated", "memory_reserved", "synchronize", "set_device")


class FakeCuda:
    """Several GPUs with given (free, total) memory; installed with monkeypatch on torch.cuda.

    ``physical[i]`` is the NVML (PCI bus) index of ``cuda:i`` (identity by default); ``uuids[i]`` the NVML
    UUID torch reports for it (``gpu_uuid(physical[i])`` by default; ``with_uuid=False`` fakes a torch build
    without the field). Every call that names a device is recorded in ``calls`` as ``(function, index)``.
    """

    GB = 1024**3

    def __init__(self, monkeypatch, gpus, current=0, failing=(), physical=None, uuids=None, with_uuid=True):
        self.gpus = list(gpus)  # [(free_bytes, total_bytes), ...]
        self.current = current
        self.failing = set(failing)
        self.physical = list(range(len(self.gpus))) if physical is None else list(physical)
        self.uuids = [gpu_uuid(p) for p in self.physical] if uuids is None else list(uuids)
        self.with_uuid = with_uuid
        self.calls: list[tuple[str, int]] = []
        self.synchronized: list[object] = []
        mp = monkeypatch
        mp.setattr(torch.cuda, "is_available", lambda: bool(self.gpus))
        mp.setattr(torch.cuda, "device_count", lambda: len(self.gpus))
        mp.setattr(torch.cuda, "current_device", lambda: self.current)
        mp.setattr(torch.cuda, "mem_get_info", self.mem_get_info)
        mp.setattr(torch.cuda, "get_device_properties", self.get_device_properties)
        mp.setattr(torch.cuda, "memory_allocated", lambda i=None: self._record("memory_allocated", i, 1 * self.GB))
        mp.setattr(torch.cuda, "memory_reserved", lambda i=None: self._record("memory_reserved", i, 2 * self.GB))
        mp.setattr(torch.cuda, "synchronize", self.synchronize)
        mp.setattr(torch.cuda, "set_device", lambda d: self._record("set_device", d, None))
        mp.setattr(torch.backends.mps, "is_available", lambda: False)

    @staticmethod
    def _index(i) -> int:
        if isinstance(i, torch.device):
            return i.index or 0
        if isinstance(i, str):
            return torch.device(i).index or 0
        return int(i)

    def _record(self, name, i, result):
        self.calls.append((name, self._index(self.current if i is None else i)))
        return result

    @property
    def mem_get_info_calls(self) -> list[int]:
        return [i for name, i in self.calls if name == "mem_get_info"]

    @property
    def context_devices(self) -> set[int]:
        """The devices on which a call that may create a CUDA context was made."""
        return {i for name, i in self.calls if name in CONTEXT_CALLS}

    def get_device_properties(self, i):
        i = self._index(i)
        self.calls.append(("get_device_properties", i))
        name, total = f"Fake GPU {i}", self.gpus[i][1]
        if not self.with_uuid:
            return FakePropsWithoutUUID(name, total)
        return FakeProps(name, total, CudaUUID(self.uuids[i]))

    def mem_get_info(self, i=None):
        i = self._index(self.current if i is None else i)
        self.calls.append(("mem_get_info", i))
        if i in self.failing:
            raise RuntimeError(f"CUDA error: device {i} unavailable")
        return self.gpus[i]

    def synchronize(self, d=None):
        self._record("synchronize", d, None)
        self.synchronized.append(d)


class NVMLError(Exception):
    pass


class FakeNvml(types.ModuleType):
    """``pynvml`` with GPUs numbered by PCI bus: ``gpus[physical] = (free, total)``.

    ``mig[physical] = [(gpu_instance_id, compute_instance_id, free, total), ...]`` adds MIG instances
    (UUIDs ``mig_uuid(physical, slot)``). Every handle lookup is recorded in ``handles``.
    """

    def __init__(self, gpus, init_error=None, failing=(), mig=None):
        super().__init__("pynvml")
        self.gpus = list(gpus)
        self.init_error = init_error
        self.failing = set(failing)
        self.mig = dict(mig or {})
        self.inits = 0
        self.shutdowns = 0
        self.handles: list[int | str] = []
        self.memory_queries: list[object] = []

    def nvmlInit(self):
        self.inits += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self.handles.append(index)
        if not 0 <= index < len(self.gpus):
            raise NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.handles.append(uuid)
        for physical in range(len(self.gpus)):
            if gpu_uuid(physical) == uuid:
                return physical
            for slot in range(len(self.mig.get(physical, []))):
                if mig_uuid(physical, slot) == uuid:
                    return ("mig", physical, slot)
        raise NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, handle):
        return gpu_uuid(handle) if isinstance(handle, int) else mig_uuid(handle[1], handle[2])

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, slot):
        if slot >= len(self.mig.get(handle, [])):
            raise NVMLError("Not Found")
        return ("mig", handle, slot)

    def nvmlDeviceGetGpuInstanceId(self, handle):
        return self.mig[handle[1]][handle[2]][0]

    def nvmlDeviceGetComputeInstanceId(self, handle):
        return self.mig[handle[1]][handle[2]][1]

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.memory_queries.append(handle)
        if handle in self.failing:
            raise NVMLError("GPU is lost")
        if isinstance(handle, tuple):
            free, total = self.mig[handle[1]][handle[2]][2:]
        else:
            free, total = self.gpus[handle]
        return SimpleNamespace(free=free, total=total, used=total - free)


@pytest.fixture
def fake_nvml(monkeypatch):
    """Factory: ``fake_nvml([(free, total), ...], init_error=None, failing=(), mig=None)`` installed as ``pynvml``."""

    def make(gpus, init_error=None, failing=(), mig=None):
        nvml = FakeNvml(gpus, init_error, failing, mig)
        monkeypatch.setitem(sys.modules, "pynvml", nvml)
        return nvml

    return make


@pytest.fixture
def fake_cuda(monkeypatch):
    """Factory: ``fake_cuda([(free, total), ...], current=0, failing=(), physical=None, with_uuid=True)``.

    Real NVML is kept out (``import pynvml`` raises ImportError) unless a test installs ``fake_nvml``,
    and the once-per-process NVML fallback notice is re-armed.
    """
    for var in ("LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)
    if not isinstance(sys.modules.get("pynvml"), FakeNvml):
        monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr("vae_toolkit.device_manager._fallback_logged", False)

    def make(gpus, current=0, failing=(), physical=None, uuids=None, with_uuid=True):
        return FakeCuda(monkeypatch, gpus, current, failing, physical, uuids, with_uuid)

    return make


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def mps_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def inception_home(tmp_path_factory) -> Path:
    """A TORCH_HOME holding seeded Inception (FID) weights in the real file's layout (metric_weights.py)."""
    import metric_weights as mw

    home = tmp_path_factory.mktemp("inception_torch_home")
    mw.plant(home / "hub" / "checkpoints", (mw.FID_INCEPTION,))
    return home


@pytest.fixture
def inception_torch_home(inception_home, monkeypatch) -> Path:
    """``TORCH_HOME`` pointed at :func:`inception_home`, offline, for one test."""
    monkeypatch.setenv("TORCH_HOME", str(inception_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return inception_home
