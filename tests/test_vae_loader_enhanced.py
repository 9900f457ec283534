"""VAELoader on the real diffusers path: the tiny offline sd14, local folders, devices, dtype, cache, threads.

The model is the tiny AutoencoderKL that conftest writes in hub-cache layout as CompVis/stable-diffusion-v1-4;
``from_pretrained`` is only ever wrapped (to see its arguments), never replaced.
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae

from vae_toolkit import DeviceManager, VAELoader, VAELoadError, VAEToolkitWarning, add_model_config
from vae_toolkit import vae_loader as vae_loader_module
from vae_toolkit.device_manager import ACCEPTED_DEVICES

TOKEN = "hf_SECRETfaketoken123"


class FromPretrainedSpy:
    """Records the arguments of each ``AutoencoderKL.from_pretrained`` call and runs the real one."""

    def __init__(self, monkeypatch, delay: float = 0.0):
        from diffusers import AutoencoderKL

        self.calls: list[tuple[tuple, dict]] = []
        self.delay = delay
        self._lock = threading.Lock()
        real = AutoencoderKL.from_pretrained  # bound to the class

        def spy(*args, **kwargs):
            with self._lock:
                self.calls.append((args, kwargs))
            if self.delay:
                time.sleep(self.delay)  # widen the window in which concurrent callers overlap
            return real(*args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, "from_pretrained", spy)

    @property
    def kwargs(self) -> dict:
        return self.calls[-1][1]


@pytest.fixture
def spy(monkeypatch, hf_home):
    return FromPretrainedSpy(monkeypatch)


@pytest.fixture
def library_logs():
    """Every log record at DEBUG, including diffusers' and huggingface_hub's (which do not propagate)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("", "diffusers", "huggingface_hub")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield records
    for lg, level in zip(loggers, saved, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def _roundtrip(vae) -> None:
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean
        y = vae.decode(latents).sample
    assert latents.shape == (1, 4, 16, 16)
    assert y.shape == x.shape
    assert torch.isfinite(latents).all() and torch.isfinite(y).all()


# --- loading "sd14" through the three entry points ----------------------------------------------------


def test_load_sd_vae_loads_the_cached_hub_model(hf_home, spy):
    vae, device = VAELoader().load_sd_vae("sd14", "cpu")

    from diffusers import AutoencoderKL

    assert isinstance(vae, AutoencoderKL)
    assert device == torch.device("cpu") and isinstance(device, torch.device)
    assert next(vae.parameters()).device == device
    assert not vae.training
    assert spy.calls[0][0] == ("CompVis/stable-diffusion-v1-4",)
    assert spy.kwargs["subfolder"] == "vae"
    _roundtrip(vae)


def test_load_sd_vae_simple_loads_without_cache(hf_home, cpu_only):
    vae1, device = VAELoader.load_sd_vae_simple("sd14")
    vae2, _ = VAELoader.load_sd_vae_simple("sd14", "cpu")
    assert device == torch.device("cpu")
    assert vae1 is not vae2
    _roundtrip(vae1)


def test_loader_with_device_manager_loads_on_its_device(hf_home, monkeypatch):
    dm = DeviceManager("cpu")
    # "auto" must mean the manager's device, not a fresh automatic choice.
    monkeypatch.setattr(DeviceManager, "auto_select_device", staticmethod(lambda: "cuda:3"))
    monkeypatch.setattr("vae_toolkit.device_manager.auto_select_device", lambda: "cuda:3")
    loader = VAELoader(device_manager=dm)
    assert loader.device_manager is dm

    vae, device = loader.load_sd_vae("sd14")

    assert device == dm.torch_device == torch.device("cpu")
    _roundtrip(vae)


def test_loader_logs_the_managers_memory_summary(hf_home, caplog):
    dm = DeviceManager("cpu")
    dm.get_memory_summary = lambda: "GPU memory: 1.25 GB allocated / 24.00 GB total"
    with caplog.at_level(logging.INFO, logger="vae_toolkit"):
        VAELoader(device_manager=dm).load_sd_vae("sd14")
    messages = [r.getMessage() for r in caplog.records if r.name == "vae_toolkit.vae_loader"]
    assert any("GPU memory: 1.25 GB allocated / 24.00 GB total" in m and "sd14" in m for m in messages), messages


def test_unknown_model_raises_value_error_listing_the_known_models(hf_home):
    with pytest.raises(ValueError, match=r"Unknown model: 'sd99'.*'sd14'.*'sd15'"):
        VAELoader().load_sd_vae("sd99", "cpu")
    with pytest.raises(ValueError, match=r"Unknown model: 'sd99'"):
        VAELoader.load_sd_vae_simple("sd99", "cpu")


# --- cache ----------------------------------------------------------------------------------------------


def test_cache_returns_the_same_object_for_the_same_model_and_device(hf_home, spy, cpu_only):
    loader = VAELoader()
    vae, _ = loader.load_sd_vae("sd14", "cpu")
    assert loader.load_sd_vae("sd14", "cpu")[0] is vae
    assert loader.load_sd_vae("sd14", torch.device("cpu"))[0] is vae  # same resolved device, same entry
    assert loader.load_sd_vae("sd14")[0] is vae  # "auto" is the CPU here
    assert len(spy.calls) == 1


def test_use_cache_false_and_clear_cache_give_new_objects(hf_home, spy):
    loader = VAELoader()
    vae, _ = loader.load_sd_vae("sd14", "cpu")

    fresh, _ = loader.load_sd_vae("sd14", "cpu", use_cache=False)
    assert fresh is not vae
    assert loader.load_sd_vae("sd14", "cpu")[0] is vae  # use_cache=False neither read nor replaced the cache

    loader.clear_cache()
    after_clear, _ = loader.load_sd_vae("sd14", "cpu")
    assert after_clear is not vae
    assert len(spy.calls) == 3


def test_cache_hit_is_fast(hf_home):
    loader = VAELoader(device_manager=DeviceManager("cpu"))
    loader.load_sd_vae("sd14")
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(200):
            loader.load_sd_vae("sd14")
        best = min(best, (time.perf_counter() - start) / 200)
    assert best < 50e-6, f"cache hit took {best * 1e6:.1f} µs"


# --- token ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "argument", "expected"),
    [
        ({}, TOKEN, TOKEN),
        ({"HF_TOKEN": TOKEN}, None, TOKEN),
        ({"HUGGING_FACE_HUB_TOKEN": TOKEN}, None, TOKEN),
        ({"HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": "hf_other"}, None, TOKEN),
        ({"HF_TOKEN": "hf_from_env"}, TOKEN, TOKEN),  # an explicit token wins
        ({}, None, None),
    ],
    ids=["argument", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN-first", "argument-wins", "none"],
)
@pytest.mark.parametrize("entry", ["load_sd_vae", "load_sd_vae_simple"])
def test_token_reaches_from_pretrained(hf_home, spy, monkeypatch, env, argument, expected, entry):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if entry == "load_sd_vae":
        VAELoader().load_sd_vae("sd14", "cpu", argument)
    else:
        VAELoader.load_sd_vae_simple("sd14", "cpu", argument)
    assert spy.kwargs["token"] == expected


def test_token_is_not_logged_warned_or_shown_in_reprs(hf_home, library_logs, recwarn):
    dm = DeviceManager("cpu")
    loader = VAELoader(device_manager=dm)
    vae, _ = loader.load_sd_vae("sd14", token=TOKEN)
    loader.load_sd_vae("sd14", token=TOKEN)  # cache hit path too

    assert library_logs, "expected the load to log something"
    texts = [r.getMessage() for r in library_logs] + [str(w.message) for w in recwarn]
    texts += [repr(loader), repr(dm), repr(vae), str(vae.config)]
    assert not [t for t in texts if TOKEN in t]


# --- local folders --------------------------------------------------------------------------------------


@pytest.mark.parametrize("subfolder", [None, "vae"])
def test_local_folder_registered_with_add_model_config_loads(hf_home, registry, tmp_path, subfolder):
    original = make_tiny_vae()
    with torch.no_grad():
        for p in original.parameters():
            p.add_(0.01)  # weights that differ from the cached sd14, to tell them apart
    original.save_pretrained(tmp_path / (subfolder or ""), safe_serialization=True)
    add_model_config("mine", {"repo_id": str(tmp_path), "subfolder": subfolder})

    vae, device = VAELoader().load_sd_vae("mine", "cpu")

    assert device == torch.device("cpu")
    loaded = vae.state_dict()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    _roundtrip(vae)


def test_local_folder_under_the_home_directory_loads(hf_home, registry, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_tiny_vae().save_pretrained(tmp_path / "myvae", safe_serialization=True)
    add_model_config("home", {"repo_id": "~/myvae", "subfolder": None})

    vae, _ = VAELoader().load_sd_vae("home", "cpu")

    _roundtrip(vae)


# --- devices --------------------------------------------------------------------------------------------


def test_get_optimal_device_is_a_staticmethod_with_the_010_signature():
    assert isinstance(inspect.getattr_static(VAELoader, "get_optimal_device"), staticmethod)
    params = list(inspect.signature(VAELoader.get_optimal_device).parameters.values())
    assert [(p.name, p.default) for p in params] == [("preferred_device", "auto")]


@pytest.mark.parametrize(
    "call",
    [
        lambda: VAELoader.get_optimal_device(),
        lambda: VAELoader.get_optimal_device("auto"),
        lambda: VAELoader().get_optimal_device("auto"),
    ],
)
def test_get_optimal_device_delegates_auto_to_device_manager(monkeypatch, call):
    calls = []

    def fake_auto_select():
        calls.append(1)
        return "cuda:3"

    monkeypatch.setattr(DeviceManager, "auto_select_device", staticmethod(fake_auto_select))
    assert call() == torch.device("cuda:3")
    assert calls == [1]


def test_get_optimal_device_picks_the_gpu_with_most_free_memory(fake_cuda):
    gb = 1024**3
    fake_cuda([(2 * gb, 24 * gb), (10 * gb, 16 * gb), (5 * gb, 80 * gb)])
    assert VAELoader.get_optimal_device() == torch.device("cuda:1")


@pytest.mark.parametrize(("request_", "expected"), [("cpu", "cpu"), (torch.device("cpu"), "cpu"), ("cpu:0", "cpu")])
def test_get_optimal_device_accepts_explicit_devices(request_, expected):
    assert VAELoader.get_optimal_device(request_) == torch.device(expected)


def test_get_optimal_device_falls_back_to_cpu_without_cuda(cpu_only):
    with pytest.warns(VAEToolkitWarning, match=r"(?i)cuda.* not available.*cpu"):
        assert VAELoader.get_optimal_device("cuda") == torch.device("cpu")


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ("gpu", ValueError),
        ("cuda:x", ValueError),
        ("", ValueError),
        ("CUDA", ValueError),
        (" cuda ", ValueError),
        (None, TypeError),
        (3, TypeError),
    ],
)
def test_get_optimal_device_rejects_malformed_requests(request_, error):
    accepted = re.escape(f"Accepted: {ACCEPTED_DEVICES}")
    with pytest.raises(error, match=accepted):
        VAELoader.get_optimal_device(request_)
    with pytest.raises(error, match=accepted):
        VAELoader().load_sd_vae("sd14", request_)


def test_load_sd_vae_resolves_devices_through_get_optimal_device(hf_home):
    """As in 0.1.0, a subclass that overrides get_optimal_device decides where load_sd_vae puts the model."""
    seen = []

    class PinnedLoader(VAELoader):
        @staticmethod
        def get_optimal_device(preferred_device="auto"):
            seen.append(preferred_device)
            return torch.device("cpu")

    vae, device = PinnedLoader().load_sd_vae("sd14", "cuda:7")
    assert device == torch.device("cpu")
    assert seen == ["cuda:7"]


# --- dtype ----------------------------------------------------------------------------------------------


def test_dtype_is_keyword_only_after_the_010_parameters():
    params = inspect.signature(VAELoader.load_sd_vae).parameters
    assert list(params)[:5] == ["self", "model_name", "device", "token", "use_cache"]
    assert params["dtype"].kind is inspect.Parameter.KEYWORD_ONLY and params["dtype"].default is None
    assert inspect.signature(VAELoader.load_sd_vae_simple).parameters["dtype"].kind is inspect.Parameter.KEYWORD_ONLY


def test_dtype_loads_weights_in_that_dtype_with_its_own_cache_entry(hf_home, spy):
    loader = VAELoader()
    vae16, _ = loader.load_sd_vae("sd14", "cpu", dtype=torch.float16)
    vae32, _ = loader.load_sd_vae("sd14", "cpu", dtype=torch.float32)

    assert {p.dtype for p in vae16.parameters()} == {torch.float16}
    assert {p.dtype for p in vae32.parameters()} == {torch.float32}
    assert vae16 is not vae32
    assert loader.load_sd_vae("sd14", "cpu", dtype=torch.float16)[0] is vae16
    assert loader.load_sd_vae("sd14", "cpu", dtype=torch.float32)[0] is vae32
    assert [kwargs.get("torch_dtype") for _, kwargs in spy.calls] == [torch.float16, torch.float32]

    simple, _ = VAELoader.load_sd_vae_simple("sd14", "cpu", dtype=torch.float16)
    assert next(simple.parameters()).dtype == torch.float16


@pytest.mark.parametrize("dtype", ["float16", 16, np.float16, torch.zeros(1)])
def test_dtype_must_be_a_torch_dtype(hf_home, dtype):
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype such as torch.float16, got"):
        VAELoader().load_sd_vae("sd14", "cpu", dtype=dtype)


# --- safetensors only by default ------------------------------------------------------------------------


def test_safetensors_are_required_by_default(hf_home, spy):
    VAELoader().load_sd_vae("sd14", "cpu")
    assert spy.kwargs["use_safetensors"] is True


def test_a_pickle_only_folder_is_refused_with_the_reason(hf_home, registry, tmp_path):
    make_tiny_vae().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    add_model_config("pickled", {"repo_id": str(tmp_path), "subfolder": None})

    expected = (
        r"(?s)Could not load VAE 'pickled' from .*: no diffusion_pytorch_model\.safetensors found\. "
        r"Only safetensors .* pickle \(\.bin\) weights can run arbitrary code .*"
        r"add_model_config\('pickled', \{\.\.\., 'use_safetensors': False\}\)"
    )
    with pytest.raises(VAELoadError, match=expected) as info:
        VAELoader().load_sd_vae("pickled", "cpu")
    assert isinstance(info.value, OSError)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)  # the diffusers error is chained


def test_a_config_can_opt_into_pickle_with_a_logged_warning(hf_home, registry, tmp_path, spy, caplog):
    make_tiny_vae().save_pretrained(tmp_path, safe_serialization=False)
    add_model_config("pickled", {"repo_id": str(tmp_path), "subfolder": None, "use_safetensors": False})

    with caplog.at_level(logging.WARNING, logger="vae_toolkit"):
        vae, _ = VAELoader().load_sd_vae("pickled", "cpu")

    assert spy.kwargs["use_safetensors"] is False
    warnings_logged = [
        r for r in caplog.records if r.name == "vae_toolkit.vae_loader" and r.levelno == logging.WARNING
    ]
    assert len(warnings_logged) == 1
    assert "'pickled'" in warnings_logged[0].getMessage()
    assert "unpickling runs code from the file" in warnings_logged[0].getMessage()
    _roundtrip(vae)


# --- accelerate notice ----------------------------------------------------------------------------------


def test_no_accelerate_notice_on_load_without_accelerate(hf_home, spy, library_logs, monkeypatch):
    monkeypatch.setattr(vae_loader_module, "_accelerate_installed", lambda: False)
    VAELoader().load_sd_vae("sd14", "cpu")
    assert spy.kwargs["low_cpu_mem_usage"] is False
    assert not [r for r in library_logs if "accelerate" in r.getMessage()]


def test_low_cpu_mem_usage_left_to_diffusers_when_accelerate_is_installed(hf_home, spy, monkeypatch):
    monkeypatch.setattr(vae_loader_module, "_accelerate_installed", lambda: True)
    VAELoader().load_sd_vae("sd14", "cpu")
    assert "low_cpu_mem_usage" not in spy.kwargs


# --- threads --------------------------------------------------------------------------------------------


def _run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a loading thread hung"
    return errors


def test_concurrent_loads_load_once_and_share_the_model(hf_home, monkeypatch, cpu_only):
    spy = FromPretrainedSpy(monkeypatch, delay=0.05)
    loader = VAELoader()
    barrier = threading.Barrier(8)
    results = []

    def load():
        barrier.wait()
        results.append(loader.load_sd_vae("sd14"))

    assert _run_threads([load] * 8) == []
    assert len(spy.calls) == 1
    assert len(results) == 8
    assert all(vae is results[0][0] and device == torch.device("cpu") for vae, device in results)


def test_clear_cache_while_others_load_does_not_crash(hf_home, monkeypatch):
    from diffusers import AutoencoderKL

    spy = FromPretrainedSpy(monkeypatch, delay=0.01)
    loader = VAELoader()
    results = []

    def load():
        for dtype in (None, torch.float32, None):
            results.append(loader.load_sd_vae("sd14", "cpu", dtype=dtype)[0])

    def clear():
        for _ in range(30):
            loader.clear_cache()
            time.sleep(0.002)

    assert _run_threads([load] * 4 + [clear] * 2) == []
    assert len(results) == 12 and all(isinstance(v, AutoencoderKL) for v in results)
    assert 2 <= len(spy.calls) <= 12
    # The loader still works and caches afterwards.
    loader.clear_cache()
    vae, _ = loader.load_sd_vae("sd14", "cpu")
    assert loader.load_sd_vae("sd14", "cpu")[0] is vae


# --- a clean load is quiet -------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["load_sd_vae", "load_sd_vae_simple", "with_device_manager"])
def test_a_clean_load_emits_no_warning_and_no_log_record_at_warning(hf_home, library_logs, entry):
    from vae_toolkit.vae_loader import _HubNoticeFilter

    watched = [logging.getLogger(name) for name in _HubNoticeFilter.LOGGERS]
    filters_before = [list(lg.filters) for lg in watched]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warning_filters_before = list(warnings.filters)
        if entry == "load_sd_vae":
            VAELoader().load_sd_vae("sd14", "cpu")
        elif entry == "load_sd_vae_simple":
            VAELoader.load_sd_vae_simple("sd14", "cpu")
        else:
            VAELoader(device_manager=DeviceManager("cpu")).load_sd_vae("sd14")
        assert warnings.filters == warning_filters_before  # the caller's warning filters, as they were
    assert [str(w.message) for w in caught] == []
    assert [f"{r.name}: {r.getMessage()}" for r in library_logs if r.levelno >= logging.WARNING] == []
    assert [list(lg.filters) for lg in watched] == filters_before  # the logging filters are gone again


def test_only_the_cached_revision_notice_of_the_loading_thread_is_dropped():
    from vae_toolkit.vae_loader import _quiet_hub_notices

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    hub = logging.getLogger("huggingface_hub.hf_api")
    handler = Collect(logging.DEBUG)
    hub.addHandler(handler)
    notice = "Could not reach the Hub (offline mode is enabled). Using cached commit hash for 'org/name'."
    try:
        with _quiet_hub_notices():
            hub.warning(notice)  # dropped: this thread is loading
            hub.warning("Could not reach the Hub (timeout).")  # another message: kept
            other = threading.Thread(target=hub.warning, args=(notice,))  # another thread: kept
            other.start()
            other.join()
        hub.warning(notice)  # after the load: kept
    finally:
        hub.removeHandler(handler)
    assert records == ["Could not reach the Hub (timeout).", notice, notice]


def test_the_callers_own_identical_warning_filter_survives_a_load(hf_home):
    message = r"The `local_dir_use_symlinks` argument is deprecated"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message, UserWarning, r"huggingface_hub\.")
        before = list(warnings.filters)
        VAELoader.load_sd_vae_simple("sd14", "cpu")
        assert warnings.filters == before


def test_the_symlinks_warning_is_shown_again_outside_a_load():
    from huggingface_hub.utils._validators import smoothly_deprecate_legacy_arguments

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smoothly_deprecate_legacy_arguments("hf_hub_download", {"local_dir_use_symlinks": "auto"})
    assert [w.category for w in caught] == [UserWarning]


# --- fallback warnings point at the caller's line ----------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        "DeviceManager",
        "DeviceManager.get_optimal_device",
        "VAELoader.get_optimal_device",
        "load_sd_vae",
        "load_sd_vae_simple",
        "load_sd_vae with a device manager",
    ],
)
def test_cuda_fallback_warning_points_at_the_callers_line(hf_home, cpu_only, entry):
    calls = {
        "DeviceManager": lambda: DeviceManager("cuda"),
        "DeviceManager.get_optimal_device": lambda: DeviceManager("cpu").get_optimal_device("cuda:1"),
        "VAELoader.get_optimal_device": lambda: VAELoader.get_optimal_device("cuda"),
        "load_sd_vae": lambda: VAELoader().load_sd_vae("sd14", "cuda"),
        "load_sd_vae_simple": lambda: VAELoader.load_sd_vae_simple("sd14", "cuda"),
        "load_sd_vae with a device manager": lambda: VAELoader(DeviceManager("cpu")).load_sd_vae("sd14", "cuda:0"),
    }
    with pytest.warns(VAEToolkitWarning, match="was requested but CUDA is not available; using CPU") as record:
        calls[entry]()
    assert [(w.filename, w.category) for w in record] == [(__file__, VAEToolkitWarning)]


def test_auto_select_device_warning_points_at_the_callers_line(fake_cuda, monkeypatch):
    from vae_toolkit import auto_select_device

    fake_cuda([(1, 2), (1, 2)])
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.warns(VAEToolkitWarning, match="LOCAL_RANK=3 but only 2 CUDA device") as record:
        assert VAELoader.get_optimal_device() == torch.device("cuda:1")
    with pytest.warns(VAEToolkitWarning, match="LOCAL_RANK=3 but only 2 CUDA device") as record2:
        auto_select_device()
    assert {w.filename for w in [*record, *record2]} == {__file__}


def test_concurrent_loads_of_other_models_leave_torch_modules_as_they_were(tmp_path, hf_home):
    """With accelerate installed, diffusers builds a model inside accelerate's init_empty_weights, which swaps
    torch.nn.Module.register_parameter for the whole process. Loads of other models at the same time (other
    threads, other loaders) once left the swap in place: every module made afterwards had meta parameters."""
    pytest.importorskip("accelerate")
    original = torch.nn.Module.register_parameter
    folders = []
    for i in range(6):
        make_tiny_vae(scaling_factor=0.1 + i).save_pretrained(tmp_path / f"m{i}", safe_serialization=True)
        folders.append(str(tmp_path / f"m{i}"))
    for _ in range(4):  # the race needs a few tries to show without the lock
        barrier = threading.Barrier(len(folders))

        def load(folder, barrier=barrier):
            barrier.wait()
            VAELoader().load_sd_vae(folder, "cpu")

        assert _run_threads([lambda f=f: load(f) for f in folders]) == []
        assert torch.nn.Module.register_parameter is original
        assert torch.nn.Linear(2, 2).weight.device == torch.device("cpu")
