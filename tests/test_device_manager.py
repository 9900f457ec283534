"""DeviceManager and auto_select_device (SPEC §4), against a faked torch.cuda and a fake NVML.

The ``fake_cuda`` / ``cpu_only`` / ``mps_only`` fixtures come from conftest.py. Real NVML is kept out
of every test but the ``gpu`` ones, so results never depend on the machine running them.
"""

from __future__ import annotations

import ast
import collections
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import NVMLError, gpu_uuid, mig_uuid

import vae_toolkit
from vae_toolkit import DeviceManager, VAELoader, VAEToolkitWarning, auto_select_device
from vae_toolkit import device_manager as dm_module
from vae_toolkit.device_manager import DeviceRecord

GB = 1024**3
LOGGER = "vae_toolkit.device_manager"
ACCEPTED = r"Accepted: 'auto', 'cpu', 'mps', 'cuda', 'cuda:N'"


@pytest.fixture(autouse=True)
def _isolated(request, monkeypatch):
    """No real NVML (``import pynvml`` raises ImportError) and no launcher variables, except in gpu tests."""
    for var in ("LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(var, raising=False)
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setitem(sys.modules, "pynvml", None)


def g(*free_total):
    """``g((2, 8), (6, 8))`` → ``[(2 GB, 8 GB), (6 GB, 8 GB)]``."""
    return [(int(free * GB), int(total * GB)) for free, total in free_total]


def fallback_notices(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and "NVML cannot be used" in r.getMessage()]


# --- auto selection without NVML (torch.cuda.mem_get_info on every GPU) ----------------------------


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        pytest.param(g((2, 8), (6, 8), (4, 8)), "cuda:1", id="most-free-wins"),
        pytest.param(g((10, 80), (12, 24)), "cuda:1", id="larger-but-busier-loses"),
        pytest.param(g((1, 8), (1, 8), (1, 8), (7, 8)), "cuda:3", id="last-index"),
        pytest.param(g((5, 8), (5, 8)), "cuda:0", id="tie-lowest-index"),
        pytest.param(g((3, 8), (5, 8), (5, 8)), "cuda:1", id="tie-among-best"),
    ],
)
def test_auto_picks_the_gpu_with_most_free_memory(fake_cuda, gpus, expected):
    cuda = fake_cuda(gpus)
    assert auto_select_device() == expected
    assert DeviceManager.auto_select_device() == expected
    assert DeviceManager().device == expected
    assert DeviceManager("auto").device == expected
    assert VAELoader.get_optimal_device() == torch.device(expected)
    assert sorted(set(cuda.mem_get_info_calls)) == list(range(len(gpus)))


def test_single_gpu_is_cuda_0_without_probing(fake_cuda):
    cuda = fake_cuda(g((1, 8)))
    assert DeviceManager().device == "cuda:0"
    assert cuda.context_devices == set()


@pytest.mark.parametrize(
    ("local_rank", "world_size", "expected"),
    [
        pytest.param("1", "4", "cuda:1", id="rank-1"),
        pytest.param("0", "2", "cuda:0", id="rank-0"),
        pytest.param("2", "1", "cuda:3", id="world-1-ignored"),
        pytest.param("2", None, "cuda:3", id="no-world-size-ignored"),
        pytest.param(None, "4", "cuda:3", id="no-local-rank-ignored"),
    ],
)
def test_distributed_rank_takes_its_own_gpu(fake_cuda, monkeypatch, local_rank, world_size, expected):
    cuda = fake_cuda(g((1, 8), (2, 8), (3, 8), (7, 8)))
    for var, value in (("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        if value is not None:
            monkeypatch.setenv(var, value)
    assert auto_select_device() == expected
    assert DeviceManager().device == expected
    if expected != "cuda:3":  # a rank's own GPU is chosen without probing any GPU
        assert cuda.context_devices == set()
        assert dm_module.local_rank() == int(local_rank)
    else:
        assert dm_module.local_rank() is None


def test_rank_beyond_the_visible_gpus_wraps_with_a_warning(fake_cuda, monkeypatch):
    fake_cuda(g((1, 8), (2, 8), (3, 8), (7, 8)))
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.warns(VAEToolkitWarning, match=r"LOCAL_RANK=5 but only 4 CUDA device\(s\) are visible; using cuda:1"):
        assert auto_select_device() == "cuda:1"


@pytest.mark.parametrize(
    ("local_rank", "world_size"),
    [("x", "4"), ("1", "four"), ("-1", "4"), ("", "2"), ("1.0", "2")],
)
def test_malformed_launcher_variables_warn_and_are_ignored(fake_cuda, monkeypatch, local_rank, world_size):
    fake_cuda(g((1, 8), (2, 8), (7, 8)))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.warns(VAEToolkitWarning, match=r"Ignoring LOCAL_RANK=.*expected non-negative integers"):
        assert auto_select_device() == "cuda:2"


def test_mps_only_selects_mps(mps_only):
    assert auto_select_device() == "mps"
    assert DeviceManager().device == "mps"


def test_cpu_only_selects_cpu(cpu_only):
    assert auto_select_device() == "cpu"
    assert DeviceManager().device == "cpu"


def test_gpu_failing_its_probe_is_skipped_with_a_warning(fake_cuda):
    fake_cuda(g((8, 16), (2, 16), (4, 16)), failing=(0,))
    with pytest.warns(
        VAEToolkitWarning, match=r"Skipping cuda:0 .*memory failed \(RuntimeError: CUDA error: device 0 unavailable\)"
    ):
        assert auto_select_device() == "cuda:2"


def test_all_probes_failing_warns_and_uses_cuda_0(fake_cuda):
    fake_cuda(g((8, 16), (2, 16)), failing=(0, 1))
    with pytest.warns(VAEToolkitWarning) as record:
        assert auto_select_device() == "cuda:0"
    messages = [str(w.message) for w in record]
    assert any(m.startswith("Skipping cuda:1") for m in messages)
    assert any("No CUDA device answered a memory query; using cuda:0" in m for m in messages)


@pytest.mark.parametrize(
    ("install", "reason"),
    [
        pytest.param(None, "nvidia-ml-py is not installed", id="not-installed"),
        pytest.param(
            NVMLError("NVML Shared Library Not Found"),
            "NVML did not initialise: NVML Shared Library Not Found",
            id="no-lib",
        ),
        pytest.param(NVMLError("Driver Not Loaded"), "NVML did not initialise: Driver Not Loaded", id="init-fails"),
    ],
)
def test_without_nvml_the_fallback_and_its_cost_are_logged_once_per_process(
    fake_cuda, fake_nvml, caplog, install, reason
):
    cuda = fake_cuda(g((2, 16), (5, 16), (1, 16)))
    if install is not None:
        nvml = fake_nvml(g((9, 16), (1, 16), (1, 16)), init_error=install)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert auto_select_device() == "cuda:1"  # torch's figures, not the fake NVML's
        assert DeviceManager().device == "cuda:1"
        dm_module.list_devices()
    assert sorted(set(cuda.mem_get_info_calls)) == [0, 1, 2]
    notices = fallback_notices(caplog)
    assert len(notices) == 1, [r.getMessage() for r in notices]
    message = notices[0].getMessage()
    assert notices[0].levelno == logging.WARNING
    assert reason in message
    assert "creates a CUDA context on each GPU" in message and "Install nvidia-ml-py" in message
    if install is not None:
        assert nvml.shutdowns == 0


def test_the_fallback_notice_is_not_logged_when_nvml_works(fake_cuda, fake_nvml, caplog):
    fake_cuda(g((2, 16), (5, 16)))
    fake_nvml(g((2, 16), (5, 16)))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        auto_select_device()
        dm_module.list_devices()
    assert fallback_notices(caplog) == []


# --- NVML: no CUDA context on a GPU that is not chosen -----------------------------------------------


@pytest.mark.parametrize("with_uuid", [True, False], ids=["uuid", "torch-without-uuid"])
def test_nvml_selection_creates_no_cuda_context_and_touches_only_the_chosen_gpu(fake_cuda, fake_nvml, with_uuid):
    cuda = fake_cuda(g((9, 16), (1, 16), (1, 16)), with_uuid=with_uuid)  # torch alone would pick cuda:0
    nvml = fake_nvml(g((1, 16), (1, 16), (9, 16)))
    assert auto_select_device() == "cuda:2"
    assert VAELoader.get_optimal_device() == torch.device("cuda:2")
    dm = DeviceManager()
    assert dm.device == "cuda:2"
    assert cuda.mem_get_info_calls == []
    assert cuda.context_devices == set()
    info = dm.get_device_info()
    assert (info["free_memory"], info["memory_source"]) == (9 * GB, "nvml")
    assert dm.get_memory_summary().endswith("9.00 GB free, 16.00 GB total")
    dm.synchronize()
    assert cuda.mem_get_info_calls == []
    assert cuda.context_devices == {2}  # what the user asked of the chosen device, nothing else
    assert nvml.inits == nvml.shutdowns > 0
    expected = [gpu_uuid(i) for i in range(3)] if with_uuid else [0, 1, 2]
    assert nvml.handles[:3] == expected


@pytest.mark.parametrize("with_uuid", [True, False], ids=["uuid", "torch-without-uuid"])
@pytest.mark.parametrize(
    ("visible", "physical"),
    [
        pytest.param("2,0", [2, 0], id="indices"),
        pytest.param(" 2 , 0 ", [2, 0], id="indices-with-spaces"),
        pytest.param(f"{gpu_uuid(2)},{gpu_uuid(0)}", [2, 0], id="uuids"),
        pytest.param(f"{gpu_uuid(2)[:12]},{gpu_uuid(0)[:12]}", [2, 0], id="uuid-prefixes"),
        pytest.param(f"2,{gpu_uuid(0)}", [2, 0], id="mixed"),
    ],
)
def test_cuda_visible_devices_maps_each_cuda_index_to_its_nvml_gpu(
    fake_cuda, fake_nvml, monkeypatch, visible, physical, with_uuid
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    cuda = fake_cuda(g((1, 16), (1, 16)), physical=physical, with_uuid=with_uuid)
    # Physical GPU 1 is the freest but not visible; cuda:0 is physical 2 (8 GB) and cuda:1 physical 0 (2 GB).
    fake_nvml(g((2, 16), (20, 16), (8, 16)))
    assert auto_select_device() == "cuda:0"
    gpus = [r for r in dm_module.list_devices() if r.device.startswith("cuda")]
    assert [(r.device, r.free_memory, r.memory_source) for r in gpus] == [
        ("cuda:0", 8 * GB, "nvml"),
        ("cuda:1", 2 * GB, "nvml"),
    ]
    assert cuda.context_devices == set()


MIG = {0: [(1, 0, 10 * GB, 20 * GB), (2, 0, 3 * GB, 20 * GB)], 1: [(1, 0, 7 * GB, 40 * GB)]}


@pytest.mark.parametrize("with_uuid", [True, False], ids=["uuid", "torch-without-uuid"])
@pytest.mark.parametrize(
    "visible",
    [
        pytest.param(f"{mig_uuid(0, 1)},{mig_uuid(1, 0)},{mig_uuid(0, 0)}", id="mig-uuids"),
        pytest.param(f"MIG-{gpu_uuid(0)}/2/0,MIG-{gpu_uuid(1)}/1/0,MIG-{gpu_uuid(0)}/1/0", id="legacy-mig-ids"),
    ],
)
def test_cuda_visible_devices_with_mig_ids_maps_to_the_mig_instances(
    fake_cuda, fake_nvml, monkeypatch, visible, with_uuid
):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    # torch reports the MIG instance's UUID (plain hex, no MIG- prefix) for each device.
    cuda = fake_cuda(
        g((1, 80), (1, 80), (1, 80)), uuids=[mig_uuid(0, 1), mig_uuid(1, 0), mig_uuid(0, 0)], with_uuid=with_uuid
    )
    nvml = fake_nvml(g((50, 80), (60, 80)), mig=MIG)  # the whole GPUs' figures must not be used
    gpus = [r for r in dm_module.list_devices() if r.device.startswith("cuda")]
    assert [(r.free_memory, r.total_memory, r.memory_source) for r in gpus] == [
        (3 * GB, 20 * GB, "nvml"),
        (7 * GB, 40 * GB, "nvml"),
        (10 * GB, 20 * GB, "nvml"),
    ]
    assert auto_select_device() == "cuda:2"
    assert cuda.context_devices == set()
    assert all(isinstance(handle, tuple) for handle in nvml.memory_queries)


UUID_HEX = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.mark.parametrize("with_uuid", [True, False], ids=["real-torch", "build-without-uuid"])
def test_the_fake_properties_look_like_torchs(fake_cuda, with_uuid):
    """What the NVML tests rely on: real torch gives a ``uuid`` whose str() is plain 8-4-4-4-12 hex."""
    fake_cuda(g((1, 8), (1, 8)), physical=[1, 0], with_uuid=with_uuid)
    props = torch.cuda.get_device_properties(0)
    assert (props.name, props.total_memory) == ("Fake GPU 0", 8 * GB)
    if with_uuid:
        assert re.fullmatch(UUID_HEX, str(props.uuid)) and f"GPU-{props.uuid}" == gpu_uuid(1)
        assert dm_module._cuda_uuid(0) == str(props.uuid)
    else:
        assert not hasattr(props, "uuid") and dm_module._cuda_uuid(0) is None


def test_nvml_matches_devices_by_the_uuid_torch_reports(fake_cuda, fake_nvml):
    """CUDA orders GPUs fastest first, NVML by PCI bus: the UUID ties each CUDA index to its GPU."""
    cuda = fake_cuda(g((1, 16), (1, 16)), physical=[1, 0])  # cuda:0 is physical 1, cuda:1 is physical 0
    nvml = fake_nvml(g((3, 16), (9, 16)))
    assert auto_select_device() == "cuda:0"  # by index alone it would be cuda:1
    assert nvml.handles == [gpu_uuid(1), gpu_uuid(0)]
    assert cuda.context_devices == set()


def test_nvml_failing_to_initialise_falls_back_to_torch(fake_cuda, fake_nvml):
    cuda = fake_cuda(g((2, 16), (5, 16)))
    nvml = fake_nvml(g((9, 16), (1, 16)), init_error=NVMLError("Driver Not Loaded"))
    assert auto_select_device() == "cuda:1"
    assert sorted(cuda.mem_get_info_calls) == [0, 1]
    assert nvml.shutdowns == 0


def test_a_device_nvml_cannot_query_falls_back_to_torch_for_that_device(fake_cuda, fake_nvml, caplog):
    cuda = fake_cuda(g((1, 16), (12, 16), (1, 16)))
    nvml = fake_nvml(g((4, 16), (1, 16), (6, 16)), failing=(1,))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert auto_select_device() == "cuda:1"  # torch's 12 GB for cuda:1 beats NVML's 6 GB for cuda:2
    assert cuda.mem_get_info_calls == [1]
    assert nvml.shutdowns == 1
    assert any("NVML could not query cuda:1" in r.getMessage() for r in caplog.records)
    assert fallback_notices(caplog) == []  # NVML works; one device did not answer


def test_a_device_missing_from_cuda_visible_devices_falls_back_to_torch(fake_cuda, fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # shorter than what CUDA reports (faked)
    cuda = fake_cuda(g((1, 16), (12, 16)), with_uuid=False)
    fake_nvml(g((4, 16), (3, 16)))
    assert auto_select_device() == "cuda:1"
    assert cuda.mem_get_info_calls == [1]


def test_nvml_is_not_touched_on_a_single_gpu(fake_cuda, fake_nvml):
    fake_cuda(g((1, 16)))
    nvml = fake_nvml(g((1, 16)))
    assert auto_select_device() == "cuda:0"
    assert nvml.inits == 0


# --- the device inventory ----------------------------------------------------------------------------


def test_list_devices_reports_every_gpu_then_cpu(fake_cuda, fake_nvml):
    fake_cuda(g((1, 16), (1, 24)))
    fake_nvml(g((3, 16), (5, 24)))
    records = dm_module.list_devices()
    assert all(isinstance(r, DeviceRecord) for r in records)
    assert [r.device for r in records] == ["cuda:0", "cuda:1", "cpu"]
    assert records[1] == DeviceRecord("cuda:1", "Fake GPU 1", 24 * GB, 5 * GB, "nvml", None)
    cpu = records[-1]
    assert (cpu.total_memory, cpu.memory_source) == (psutil.virtual_memory().total, "psutil")
    assert 0 < cpu.free_memory <= cpu.total_memory
    json.dumps([r.to_dict() for r in records])


def test_list_devices_keeps_a_gpu_whose_memory_cannot_be_read(fake_cuda):
    fake_cuda(g((1, 16), (1, 24)), failing=(0,))
    records = dm_module.list_devices()
    assert records[0] == DeviceRecord(
        "cuda:0", "Fake GPU 0", 16 * GB, None, None, "RuntimeError: CUDA error: device 0 unavailable"
    )
    assert records[1].memory_source == "torch"


@pytest.mark.parametrize(("fixture", "devices"), [("cpu_only", ["cpu"]), ("mps_only", ["mps", "cpu"])])
def test_list_devices_without_cuda(request, fixture, devices):
    request.getfixturevalue(fixture)
    records = dm_module.list_devices()
    assert [r.device for r in records] == devices
    assert records[0].name


def test_list_devices_is_public():
    assert dm_module.list_devices is vae_toolkit.list_devices
    assert DeviceRecord is vae_toolkit.DeviceRecord
    assert {"list_devices", "DeviceRecord", "local_rank"} <= set(dm_module.__all__)


def test_no_module_imports_another_modules_private_names():
    """Each module uses only the public names of the others (the CLI included)."""
    offenders = []
    for path in sorted(Path(vae_toolkit.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                offenders += [f"{path.name}: from .{node.module} import {name}" for name in private]
    # The roundtrip command's image opener is the one left; it belongs to the roundtrip/image_utils owners.
    assert offenders == [], offenders


# --- device requests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ("cpu", "cpu"),
        ("cpu:0", "cpu"),
        (torch.device("cpu"), "cpu"),
        (torch.device("cpu", 0), "cpu"),
        ("cuda", "cuda:1"),  # the current device
        (torch.device("cuda"), "cuda:1"),
        ("cuda:0", "cuda:0"),
        ("cuda:2", "cuda:2"),
        (torch.device("cuda", 0), "cuda:0"),
        (torch.device("cuda:2"), "cuda:2"),
        ("auto", "cuda:2"),
    ],
    ids=repr,
)
def test_device_requests_on_cuda(fake_cuda, request_, expected):
    fake_cuda(g((1, 8), (2, 8), (5, 8)), current=1)
    dm = DeviceManager(request_)
    assert dm.device == expected
    assert isinstance(dm.device, str)
    assert VAELoader.get_optimal_device(request_) == torch.device(expected)
    managers_own = "cpu" if request_ == "auto" else expected  # 'auto' means the manager's device
    assert DeviceManager("cpu").get_optimal_device(request_) == torch.device(managers_own)


def test_default_request_is_auto(fake_cuda):
    fake_cuda(g((1, 8), (5, 8)))
    assert DeviceManager().device == "cuda:1"
    assert VAELoader.get_optimal_device() == torch.device("cuda:1")
    assert VAELoader().get_optimal_device() == torch.device("cuda:1")


@pytest.mark.parametrize("request_", ["mps", "mps:0", torch.device("mps")], ids=repr)
def test_mps_request(mps_only, request_):
    assert DeviceManager(request_).device == "mps"
    assert VAELoader.get_optimal_device(request_) == torch.device("mps")


@pytest.mark.parametrize(
    "request_", ["cuda", "cuda:0", "cuda:3", torch.device("cuda"), torch.device("cuda", 1)], ids=repr
)
def test_cuda_requested_without_cuda_warns_and_uses_cpu(cpu_only, request_):
    with pytest.warns(VAEToolkitWarning, match=r"CUDA is not available; using CPU") as record:
        assert DeviceManager(request_).device == "cpu"
    assert record[0].filename == __file__  # the warning points at the caller
    with pytest.warns(VAEToolkitWarning, match=r"CUDA is not available; using CPU"):
        assert VAELoader.get_optimal_device(request_) == torch.device("cpu")
    with pytest.warns(VAEToolkitWarning, match=r"CUDA is not available; using CPU"):
        assert DeviceManager("cpu").get_optimal_device(request_) == torch.device("cpu")


@pytest.mark.parametrize("request_", ["cuda:2", "cuda:99999999999999999999", torch.device("cuda", 7)], ids=repr)
def test_cuda_index_out_of_range_warns_and_uses_cuda_0(fake_cuda, request_):
    fake_cuda(g((1, 8), (5, 8)), current=1)
    with pytest.warns(VAEToolkitWarning, match=r"only 2 CUDA device\(s\) are visible; using cuda:0"):
        assert DeviceManager(request_).device == "cuda:0"
    with pytest.warns(VAEToolkitWarning, match=r"only 2 CUDA device\(s\) are visible; using cuda:0"):
        assert VAELoader.get_optimal_device(request_) == torch.device("cuda:0")


@pytest.mark.parametrize("request_", ["mps", torch.device("mps")], ids=repr)
def test_mps_requested_without_mps_warns_and_uses_cpu(cpu_only, request_):
    with pytest.warns(VAEToolkitWarning, match=r"MPS was requested but is not available; using CPU"):
        assert DeviceManager(request_).device == "cpu"


MALFORMED = [
    "gpu",
    "cuda:x",
    "",
    "CUDA",
    "Cpu",
    " cuda ",
    "cuda ",
    "cuda:-1",
    "cuda:+1",
    "cuda:01",
    "cuda:0:1",
    "cuda:",
    ":0",
    "cuda 0",
    "cuda:1\n",
    "cuda:\u0663",
    "auto:1",
    "auto:0",
    "cpu:1",
    "mps:1",
    "xpu",
    "meta",
    "cuda,cpu",
    torch.device("meta"),
    torch.device("xpu"),
    torch.device("cpu", 1),
    torch.device("mps", 1),
]
WRONG_TYPES = [None, 3, 0, 1.5, True, b"cuda", ["cuda"], ("cuda",), {"device": "cuda"}, torch.zeros(1)]
ENTRY_POINTS = {
    "DeviceManager": DeviceManager,
    "VAELoader.get_optimal_device": VAELoader.get_optimal_device,
    "DeviceManager.get_optimal_device": lambda d: DeviceManager("cpu").get_optimal_device(d),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
@pytest.mark.parametrize("request_", MALFORMED, ids=repr)
def test_malformed_device_raises_value_error_naming_the_accepted_forms(fake_cuda, entry, request_):
    fake_cuda(g((1, 8), (5, 8)))
    with pytest.raises(ValueError, match=rf"device .*{ACCEPTED}") as excinfo:
        entry(request_)
    assert repr(request_)[:20] in str(excinfo.value) or str(request_)[:20] in str(excinfo.value)


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
@pytest.mark.parametrize("request_", WRONG_TYPES, ids=repr)
def test_wrong_type_raises_type_error_naming_the_accepted_forms(cpu_only, entry, request_):
    with pytest.raises(
        TypeError,
        match=rf"device must be a str or torch.device, got {type(request_).__name__} "
        rf".*{ACCEPTED}",
    ):
        entry(request_)


def test_long_bad_request_is_abbreviated_in_the_message(cpu_only):
    with pytest.raises(TypeError) as excinfo:
        DeviceManager(list(range(100_000)))
    assert len(str(excinfo.value)) < 400
    with pytest.raises(ValueError) as excinfo:
        DeviceManager("x" * 100_000)
    assert len(str(excinfo.value)) < 400


def test_get_optimal_device_auto_is_the_managers_device(fake_cuda):
    cuda = fake_cuda(g((1, 8), (5, 8)))
    dm = DeviceManager("cuda:0")
    cuda.gpus = g((1, 8), (7, 8))  # cuda:1 has more free memory, but the manager keeps its choice
    assert dm.get_optimal_device() == torch.device("cuda:0")
    assert dm.get_optimal_device("auto") == torch.device("cuda:0")
    assert dm.torch_device == torch.device("cuda:0")
    assert VAELoader.get_optimal_device("auto") == torch.device("cuda:1")


# --- info and memory summary ---------------------------------------------------------------------


def test_device_info_on_cuda_reports_the_drivers_numbers(fake_cuda):
    fake_cuda(g((3, 16), (5, 24)))
    info = DeviceManager("cuda:1").get_device_info()
    assert info["device"] == "cuda:1"
    assert info["cuda_available"] is True
    assert info["cuda_device_count"] == 2
    assert info["device_name"] == "Fake GPU 1"
    assert info["total_memory"] == 24 * GB
    assert info["memory_allocated"] == 1 * GB
    assert info["memory_reserved"] == 2 * GB
    assert info["free_memory"] == 5 * GB
    assert info["system_memory_total"] == psutil.virtual_memory().total
    assert 0 < info["system_memory_available"] <= info["system_memory_total"]
    json.dumps(info)  # plain values, ready to log or paste


CUDA_KEYS = ("device_name", "total_memory", "memory_allocated", "memory_reserved", "free_memory")


@pytest.mark.parametrize(("fixture", "device"), [("cpu_only", "cpu"), ("mps_only", "mps")])
def test_device_info_off_cuda_has_no_cuda_keys(request, fixture, device):
    request.getfixturevalue(fixture)
    info = DeviceManager().get_device_info()
    assert (info["device"], info["cuda_available"], info["cuda_device_count"]) == (device, False, 0)
    assert not set(CUDA_KEYS) & set(info)
    assert info["system_memory_total"] == psutil.virtual_memory().total


def test_memory_summary_on_cuda_is_one_line_in_gb(fake_cuda):
    fake_cuda(g((3, 16), (5.5, 24)))
    summary = DeviceManager("cuda:1").get_memory_summary()
    assert summary == ("cuda:1 (Fake GPU 1): 1.00 GB allocated, 2.00 GB reserved, 5.50 GB free, 24.00 GB total")


def test_memory_summary_without_free_memory_when_the_query_fails(fake_cuda):
    fake_cuda(g((3, 16), (5, 24)), failing=(1,))
    dm = DeviceManager("cuda:1")
    assert dm.get_device_info()["free_memory"] is None
    assert dm.get_memory_summary() == "cuda:1 (Fake GPU 1): 1.00 GB allocated, 2.00 GB reserved, 24.00 GB total"


@pytest.mark.parametrize("fixture", ["cpu_only", "mps_only"])
def test_memory_summary_is_none_off_cuda(request, fixture):
    request.getfixturevalue(fixture)
    assert DeviceManager().get_memory_summary() is None


# --- moving tensors ------------------------------------------------------------------------------


@pytest.fixture
def meta_manager(cpu_only):
    """A manager pointed at the meta device, so that a CPU-only test sees tensors really move."""
    dm = DeviceManager("cpu")
    dm.device = "meta"
    return dm


def test_move_to_device_returns_the_same_tensor_when_already_there(cpu_only):
    t = torch.arange(4.0)
    assert DeviceManager("cpu").move_to_device(t) is t


def test_move_to_device_moves_without_touching_the_input(meta_manager):
    t = torch.arange(4.0)
    moved = meta_manager.move_to_device(t)
    assert moved.device == torch.device("meta") and moved.shape == t.shape and moved.dtype == t.dtype
    assert t.device == torch.device("cpu") and torch.equal(t, torch.arange(4.0))


def test_move_to_device_accepts_a_module(cpu_only):
    module = torch.nn.Linear(2, 2)
    assert DeviceManager("cpu").move_to_device(module) is module


@pytest.mark.parametrize("obj", [[torch.zeros(1)], 3, "x", None, {"a": torch.zeros(1)}], ids=repr)
def test_move_to_device_rejects_non_tensors(cpu_only, obj):
    with pytest.raises(TypeError, match=r"move_to_device expects torch.Tensor arguments, got .*move_batch_to_device"):
        DeviceManager("cpu").move_to_device(obj)


Pair = collections.namedtuple("Pair", "image label")


def test_move_batch_to_device_keeps_containers_and_non_tensor_items(meta_manager):
    x, y = torch.ones(2), torch.zeros(3)
    batch = {"image": x, "label": 7, "name": "a.png", "extra": [y, (x, "k")], "pair": Pair(x, 1)}
    snapshot = repr(batch)
    out = meta_manager.move_batch_to_device(batch)
    assert type(out) is dict and set(out) == set(batch)
    assert out["image"].device.type == "meta"
    assert (out["label"], out["name"]) == (7, "a.png")
    assert type(out["extra"]) is list and out["extra"][0].device.type == "meta"
    assert type(out["extra"][1]) is tuple and out["extra"][1][0].device.type == "meta" and out["extra"][1][1] == "k"
    assert type(out["pair"]) is Pair and out["pair"].image.device.type == "meta" and out["pair"].label == 1
    assert repr(batch) == snapshot and batch["image"] is x and batch["extra"][0] is y  # input untouched


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda t: [t, "keep", 3], list),
        (lambda t: (t, "keep", 3), tuple),
        (lambda t: (x for x in [t, "keep", 3]), list),
    ],
    ids=["list", "tuple", "generator"],
)
def test_move_batch_to_device_sequences(meta_manager, make, kind):
    t = torch.ones(2)
    out = meta_manager.move_batch_to_device(make(t))
    assert type(out) is kind
    assert out[0].device.type == "meta" and list(out[1:]) == ["keep", 3]
    assert t.device.type == "cpu"


def test_move_batch_to_device_on_the_same_device_keeps_tensor_objects(cpu_only):
    t = torch.ones(2)
    batch = [t, {"k": t}]
    out = DeviceManager("cpu").move_batch_to_device(batch)
    assert out is not batch and out[0] is t and out[1]["k"] is t


def test_ensure_same_device_returns_tensors_already_there_as_they_are(meta_manager):
    on_cpu, on_meta = torch.ones(2), torch.empty(3, device="meta")
    out = meta_manager.ensure_same_device(on_cpu, on_meta)
    assert isinstance(out, list) and len(out) == 2
    assert out[0].device.type == "meta" and on_cpu.device.type == "cpu"
    assert out[1] is on_meta


def test_ensure_same_device_on_cpu(cpu_only):
    a, b = torch.ones(1), torch.zeros(2)
    out = DeviceManager("cpu").ensure_same_device(a, b)
    assert out[0] is a and out[1] is b
    assert DeviceManager("cpu").ensure_same_device() == []


def test_ensure_same_device_rejects_non_tensors(cpu_only):
    with pytest.raises(TypeError, match=r"ensure_same_device expects torch.Tensor arguments, got list"):
        DeviceManager("cpu").ensure_same_device(torch.ones(1), [1, 2])


def test_synchronize_is_a_no_op_off_cuda(cpu_only, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(d))
    DeviceManager("cpu").synchronize()
    assert calls == []


def test_synchronize_waits_on_the_managers_cuda_device(fake_cuda):
    cuda = fake_cuda(g((1, 8), (5, 8)))
    DeviceManager("cuda:1").synchronize()
    assert cuda.synchronized == ["cuda:1"]


# --- API surface, logging, weight ---------------------------------------------------------------


def test_public_names_and_repr(cpu_only):
    assert vae_toolkit.DeviceManager is DeviceManager
    assert vae_toolkit.auto_select_device is dm_module.auto_select_device
    assert isinstance(DeviceManager.__dict__["auto_select_device"], staticmethod)
    assert repr(DeviceManager("cpu")) == "DeviceManager(device='cpu')"


def test_logs_through_the_module_logger_and_never_prints(fake_cuda, caplog, capsys):
    fake_cuda(g((1, 8), (5, 8)))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        dm = DeviceManager()
        dm.get_device_info()
        dm.get_memory_summary()
        dm.synchronize()
    assert any(r.name == LOGGER and "Selected cuda:1 (5.00 GB free)" in r.getMessage() for r in caplog.records)
    assert any(r.name == LOGGER and "DeviceManager using cuda:1" in r.getMessage() for r in caplog.records)
    assert capsys.readouterr() == ("", "")


def test_library_code_has_no_print_call():
    tree = ast.parse(Path(dm_module.__file__).read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
    assert calls == []


def test_manager_and_device_info_are_light():
    """DeviceManager() + get_device_info() add < 1 MB RSS and import nothing heavy (fresh interpreter)."""
    code = (
        "import gc, sys, psutil, vae_toolkit\n"
        "from vae_toolkit import DeviceManager\n"
        "gc.collect(); p = psutil.Process(); before = p.memory_info().rss; mods = set(sys.modules)\n"
        "DeviceManager().get_device_info()\n"
        "gc.collect(); print(p.memory_info().rss - before, sorted(set(sys.modules) - mods))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=True
    )
    growth, new_modules = done.stdout.split(" ", 1)
    assert int(growth) < 1024**2
    heavy = {"diffusers", "huggingface_hub", "transformers"}
    assert not heavy & {m.split(".")[0] for m in ast.literal_eval(new_modules)}


# --- a real GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
class TestRealGPU:
    def test_auto_picks_a_cuda_device(self):
        dm = DeviceManager()
        assert dm.device.startswith("cuda:") and int(dm.device.split(":")[1]) < torch.cuda.device_count()

    def test_memory_summary_is_a_string(self):
        summary = DeviceManager().get_memory_summary()
        assert isinstance(summary, str) and " GB " in summary and "\n" not in summary

    def test_move_to_device(self):
        dm = DeviceManager()
        t = dm.move_to_device(torch.ones(3))
        assert t.device == dm.torch_device
        assert dm.ensure_same_device(t)[0] is t
        dm.synchronize()

    def test_torch_reports_a_plain_hex_uuid_as_the_fakes_do(self):
        for index in range(torch.cuda.device_count()):
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            if uuid is None:
                pytest.skip("this torch build has no uuid in its device properties")
            assert re.fullmatch(UUID_HEX, str(uuid)), str(uuid)

    def test_nvml_and_torch_agree_on_free_memory(self):
        pytest.importorskip("pynvml")
        count = torch.cuda.device_count()
        nvml, unusable = dm_module._nvml_memory(range(count))
        if unusable is not None:
            pytest.skip(f"NVML cannot be used here: {unusable}")
        torch_free = [dm_module._free_memory(i)[0] for i in range(count)]
        for index, free in enumerate(torch_free):
            assert index in nvml, f"NVML could not query cuda:{index}"
            assert abs(nvml[index][0] - free) <= 0.05 * free, (index, nvml[index], free)

    def test_selection_creates_no_context_on_other_gpus(self):
        """In a fresh process, choosing a device with NVML leaves no CUDA context anywhere."""
        pytest.importorskip("pynvml")
        code = (
            "import pynvml, os, torch, vae_toolkit\n"
            "device = vae_toolkit.auto_select_device(); vae_toolkit.list_devices()\n"
            "pynvml.nvmlInit(); pid = os.getpid(); used = []\n"
            "for i in range(pynvml.nvmlDeviceGetCount()):\n"
            "    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i))\n"
            "    used += [i for p in procs if p.pid == pid]\n"
            "print(device, used)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == "[]", done.stdout
