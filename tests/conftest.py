"""Shared fixtures: an offline Hugging Face cache holding a tiny real AutoencoderKL, and a faked torch.cuda.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported, so they are set here, before any
test module imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

_HF_HOME = Path(tempfile.mkdtemp(prefix="vae_toolkit_hf_"))
os.environ["HF_HOME"] = str(_HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
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


# --- a fake torch.cuda --------------------------------------------------------------------------


@dataclass
class FakeProps:
    name: str
    total_memory: int


class FakeCuda:
    """Several GPUs with given (free, total) memory; installed with monkeypatch on torch.cuda."""

    GB = 1024**3

    def __init__(self, monkeypatch, gpus, current: int = 0, failing: tuple[int, ...] = ()):
        self.gpus = list(gpus)  # [(free_bytes, total_bytes), ...]
        self.current = current
        self.failing = set(failing)
        self.mem_get_info_calls: list[int] = []
        self.synchronized: list[object] = []
        mp = monkeypatch
        mp.setattr(torch.cuda, "is_available", lambda: bool(self.gpus))
        mp.setattr(torch.cuda, "device_count", lambda: len(self.gpus))
        mp.setattr(torch.cuda, "current_device", lambda: self.current)
        mp.setattr(torch.cuda, "mem_get_info", self.mem_get_info)
        mp.setattr(
            torch.cuda,
            "get_device_properties",
            lambda i: FakeProps(f"Fake GPU {self._index(i)}", self.gpus[self._index(i)][1]),
        )
        mp.setattr(torch.cuda, "memory_allocated", lambda i=None: 1 * self.GB)
        mp.setattr(torch.cuda, "memory_reserved", lambda i=None: 2 * self.GB)
        mp.setattr(torch.cuda, "synchronize", lambda d=None: self.synchronized.append(d))
        mp.setattr(torch.backends.mps, "is_available", lambda: False)

    @staticmethod
    def _index(i) -> int:
        if isinstance(i, torch.device):
            return i.index or 0
        if isinstance(i, str):
            return torch.device(i).index or 0
        return int(i)

    def mem_get_info(self, i=None):
        i = self._index(0 if i is None else i)
        self.mem_get_info_calls.append(i)
        if i in self.failing:
            raise RuntimeError(f"CUDA error: device {i} unavailable")
        return self.gpus[i]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Factory: ``fake_cuda([(free, total), ...], current=0, failing=())``."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def make(gpus, current=0, failing=()):
        return FakeCuda(monkeypatch, gpus, current, failing)

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
