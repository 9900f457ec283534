"""The metrics' weight files and cached networks under hostile conditions.

- A validation pass under ``torch.inference_mode()`` must not leave inference tensors in a cached network or an
  FID accumulator, so that a later training loss through ``metrics.lpips`` still backpropagates.
- A shared, read-only checkpoint folder missing a file: a metric on by default becomes a note of the report, a
  metric asked for by name stops ``evaluate`` with the one-line "download X and put it in Y" message.
- A downloaded file keeps the umask's mode (as torch.hub's), and a file another user cannot read is said to be
  unreadable, not truncated.
- The hidden part file a killed download leaves is removed by the next download of the same file; the part file
  of a download still running is not.

The tests run as root here, for whom ``chmod`` refuses nothing: folders and files are chmod-ed as a user would
meet them, and the refusal the kernel would give a user is simulated at the system call (as in test_store.py).
Nothing is downloaded: ``_weights._urlopen`` serves bytes.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import metric_weights as mw
import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

from vae_toolkit import __main__ as cli
from vae_toolkit import _weights, metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def planted_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub/checkpoints holds every weight file as seeded random tensors."""
    home = tmp_path_factory.mktemp("torch_home")
    mw.plant(home / "hub" / "checkpoints")
    return home


@pytest.fixture(autouse=True)
def _fresh(planted_home, monkeypatch):
    """The planted weights, offline, and no network cached by an earlier test."""
    monkeypatch.setenv("TORCH_HOME", str(planted_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(metrics, "_LPIPS_CACHE", {})
    monkeypatch.setattr(metrics, "_INCEPTION_CACHE", {})


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME without weight files; returns its checkpoint folder (not created)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def _saved(name: str) -> bytes:
    buffer = io.BytesIO()
    torch.save(mw.state_dict(name), buffer)
    return buffer.getvalue()


def _serve(monkeypatch, payload: bytes) -> list[str]:
    """Serve ``payload`` for any address, online; returns the addresses opened."""
    opened: list[str] = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    def urlopen(url, timeout):
        opened.append(url)
        return Response(payload)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(_weights, "_urlopen", urlopen)
    return opened


def _served_spec(monkeypatch, name: str = mw.LPIPS_ALEX) -> _weights.WeightsFile:
    """The heads' WeightsFile with the SHA-256 of the planted tensors, which :func:`_serve` then serves."""
    payload = _saved(name)
    _serve(monkeypatch, payload)
    return replace(_weights.LPIPS_ALEX, sha256=hashlib.sha256(payload).hexdigest())


# --- inference mode ------------------------------------------------------------------------------------------


def _inference_tensors(module: torch.nn.Module) -> list[str]:
    return [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_inference()]


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_first_called_under_inference_mode_still_trains(net):
    """A validation pass under inference_mode, then metrics.lpips as the training loss, in one process."""
    x, y = mw.lpips_images(3, n=2)
    with torch.inference_mode():
        validation = metrics.lpips(x, y, net)
    source = x.clone().requires_grad_(True)
    loss = metrics.lpips(source, y, net)
    loss.mean().backward()
    assert source.grad is not None and bool(source.grad.abs().sum() > 0)
    torch.testing.assert_close(loss.detach(), validation, rtol=0, atol=0)
    with torch.inference_mode():  # and validation again after training: the same cached module
        torch.testing.assert_close(metrics.lpips(x, y, net), validation, rtol=0, atol=0)


def test_an_lpips_module_built_under_inference_mode_still_trains():
    with torch.inference_mode():
        module = metrics.LPIPS("alex")
    assert _inference_tensors(module) == []
    x, y = mw.lpips_images(4, n=1)
    source = x.clone().requires_grad_(True)
    module(source, y).sum().backward()
    assert source.grad is not None


def test_no_cached_network_holds_inference_tensors():
    x, y = mw.lpips_images(5, n=1)
    with torch.inference_mode():
        metrics.lpips(x, y)
        metrics.load_networks(fid=True)
    cached = [*metrics._LPIPS_CACHE.values(), *metrics._INCEPTION_CACHE.values()]
    assert len(cached) == 2
    assert [_inference_tensors(module) for module in cached] == [[], []]


def test_fid_accumulated_partly_under_inference_mode_goes_on_outside_it():
    real, fake = mw.fid_sets(4)
    fid = metrics.FrechetInceptionDistance(64)
    with torch.inference_mode():
        fid.update(real[:2], real=True)
        fid.update(fake[:2], real=False)
    fid.update(real[2:], real=True)  # an in-place update of the running sums, outside inference mode
    fid.update(fake[2:], real=False)
    merged = metrics.FrechetInceptionDistance(64).merge(fid)
    merged.update(real[:1], real=True)
    one_pass = metrics.FrechetInceptionDistance(64)
    one_pass.update(real, real=True)
    one_pass.update(fake, real=False)
    assert fid.num_real == fid.num_fake == 4 and merged.num_real == 5
    assert fid.compute(warn=False) == pytest.approx(one_pass.compute(warn=False), rel=1e-9)


def test_an_fid_copy_made_under_inference_mode_goes_on_outside_it():
    real, fake = mw.fid_sets(3)
    fid = metrics.FrechetInceptionDistance(64)
    fid.update(real, real=True)
    with torch.inference_mode():
        copy = fid.all_reduce()
    copy.update(fake, real=False)
    copy.update(real[:1], real=True)
    assert copy.num_real == 4 and copy.num_fake == 3


# --- a read-only checkpoint folder -------------------------------------------------------------------------


@pytest.fixture
def read_only_checkpoints(tmp_path, monkeypatch) -> Path:
    """A shared TORCH_HOME whose hub/checkpoints (chmod 0555) holds no weight file, online.

    The kernel refuses a user any file created there (EACCES); root is refused nothing, so the refusal is made at
    the system calls that create files (``os.open``, ``open``, ``mkdir``), as test_store.py's ``read_only``.
    """
    home = tmp_path / "shared_torch"
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    real_os_open, real_open, real_mkdir = os.open, builtins.open, Path.mkdir

    def refused(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder)

    def denied(path) -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def builtin_open(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and refused(path) and any(c in mode for c in "wax+"):
            raise denied(path)
        return real_open(path, mode, *args, **kwargs)

    def mkdir(self, *args, **kwargs):
        if refused(self) and self != folder and not self.exists():
            raise denied(self)
        return real_mkdir(self, *args, **kwargs)

    def urlopen(url, timeout):
        pytest.fail(f"downloaded {url} although it cannot be saved")

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", builtin_open)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(_weights, "_urlopen", urlopen)
    yield folder
    folder.chmod(0o755)


@pytest.fixture(scope="module")
def photos_and_model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    make_tiny_vae().save_pretrained(root / "model", safe_serialization=True)
    return root / "photos", root / "model"


def test_evaluate_with_a_read_only_checkpoint_folder_makes_the_report_with_notes(
    read_only_checkpoints, photos_and_model, tmp_path, capsys
):
    photos, model = photos_and_model
    out = tmp_path / "report"
    code = cli.main(["evaluate", str(photos), "-o", str(out), "--no-progress", "--model", str(model)])
    err = capsys.readouterr().err
    assert code == 0, err
    notes = json.loads((out / "summary.json").read_text())["notes"]
    assert [n.split(":")[0] for n in notes] == ["LPIPS left out", "rFID left out"]
    folder = read_only_checkpoints
    assert all(f"put it in {folder}" in n and "Permission denied" in n and "TORCH_HOME" in n for n in notes)
    assert "note: LPIPS left out: alexnet-owt-7be5be79.pth" in err and "Traceback" not in err
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "file"),
    [
        pytest.param(["--lpips", "vgg", "--no-fid"], "vgg16-397923af.pth", id="lpips-vgg"),
        pytest.param(["--lpips", "none", "--fid"], "pt_inception-2015-12-05-6726825d.pth", id="fid"),
    ],
)
def test_evaluate_asked_for_a_metric_with_a_read_only_checkpoint_folder_says_where_to_put_the_file(
    read_only_checkpoints, photos_and_model, tmp_path, capsys, monkeypatch, flags, file
):
    photos, model = photos_and_model
    monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("loaded"))
    out = tmp_path / "report"
    code = cli.main(["evaluate", str(photos), "-o", str(out), "--no-progress", "--model", str(model), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    folder = read_only_checkpoints
    assert file in err[0] and "https://" in err[0] and f"put it in {folder} as {file}" in err[0]
    assert "Permission denied" in err[0] and "TORCH_HOME" in err[0]
    assert not (out / "metrics.csv").exists()


def test_a_read_only_checkpoint_folder_is_a_weights_unavailable_error(read_only_checkpoints):
    with pytest.raises(metrics.WeightsUnavailableError, match=r"cannot be downloaded .*Permission denied") as info:
        metrics.FrechetInceptionDistance()
    assert isinstance(info.value.__cause__, PermissionError)


# --- file modes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_downloaded_file_has_the_umasks_mode(empty_home, monkeypatch, umask, mode):
    spec = _served_spec(monkeypatch)
    old = os.umask(umask)
    try:
        path = _weights.locate(spec)
    finally:
        os.umask(old)
    assert path.is_file() and oct(path.stat().st_mode & 0o777) == oct(mode)


@pytest.mark.parametrize(
    ("build", "file"),
    [
        pytest.param(lambda: metrics.LPIPS("alex"), mw.ALEXNET, id="lpips-backbone"),
        pytest.param(lambda: metrics.lpips(*mw.lpips_images(0)), mw.LPIPS_ALEX, id="lpips-heads"),
        pytest.param(lambda: metrics.load_networks(fid=True), mw.FID_INCEPTION, id="fid"),
    ],
)
def test_a_file_another_user_cannot_read_is_said_so_not_truncated(tmp_path, monkeypatch, build, file):
    """Another user's private file (0600, as earlier downloads were): the reader is refused with EACCES, which
    root is not, so the refusal is made at ``open``."""
    home = tmp_path / "shared"
    folder = home / "hub" / "checkpoints"
    mw.plant(folder)
    private = folder / file
    private.chmod(0o600)
    real_open = builtins.open

    def builtin_open(path, mode="r", *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and Path(os.fsdecode(path)) == private:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", builtin_open)
    monkeypatch.setenv("TORCH_HOME", str(home))
    with pytest.raises(metrics.InvalidWeightsError) as info:
        build()
    message = str(info.value)
    assert message.startswith(f"cannot read {private}: permission denied; ask its owner to make it readable or "
                              "point TORCH_HOME elsewhere"), message  # fmt: skip
    assert "truncated" not in message and "delete" not in message and "\n" not in message
    assert isinstance(info.value.__cause__, PermissionError)


# --- part files of killed downloads --------------------------------------------------------------------------

_STALLED_DOWNLOAD = textwrap.dedent(
    """
    import io, sys, time
    from vae_toolkit import _weights

    class Stalled(io.RawIOBase):
        headers = {}
        sent = False

        def read(self, n=-1):
            if not self.sent:
                self.sent = True
                return b"x" * 1000
            print("writing", flush=True)
            time.sleep(600)
            return b""

    _weights._urlopen = lambda url, timeout: Stalled()
    _weights.locate(_weights.LPIPS_ALEX)
    """
)


def _stalled_download(env: dict[str, str]) -> subprocess.Popen:
    """A process downloading lpips-v0.1-alex.pth that has written part of it and waits for the rest."""
    child = subprocess.Popen(
        [sys.executable, "-c", _STALLED_DOWNLOAD], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != b"writing":
        child.kill()
        pytest.fail(f"the download did not start: {child.communicate()[1].decode()[-2000:]}")
    return child


def _parts(folder: Path, name: str = mw.LPIPS_ALEX) -> set[Path]:
    return set(folder.glob(f".{name}.*.part"))


def test_a_download_removes_the_part_files_killed_downloads_left_and_keeps_a_running_ones(empty_home, monkeypatch):
    empty_home.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_OFFLINE")
    running = _stalled_download(env)
    try:
        running_part = _parts(empty_home)
        killed = _stalled_download(env)  # a second download of the same file, which must not take the first's
        killed_part = _parts(empty_home) - running_part
        killed.send_signal(signal.SIGKILL)  # as the OOM killer or a lost job: no clean-up of its own
        killed.communicate()
        assert len(killed_part) == 1 and len(running_part) == 1 and killed_part <= _parts(empty_home)
        day_ago = time.time() - 86400 * 2  # age does not make a running download's file removable
        for part in (*killed_part, *running_part):
            os.utime(part, (day_ago, day_ago))
        spec = _served_spec(monkeypatch)
        path = _weights.locate(spec)
        assert _parts(empty_home) == running_part
        assert path.read_bytes() == _saved(mw.LPIPS_ALEX)
        assert running.poll() is None
    finally:
        running.kill()
        running.communicate()


def test_part_files_without_a_writer_lock_are_removed_only_when_old(empty_home, monkeypatch):
    """Part files named as earlier versions named them (no lock to ask): removed after a day without a write;
    another file's part files are never touched."""
    empty_home.mkdir(parents=True)
    old, fresh = empty_home / f".{mw.LPIPS_ALEX}.k3j_h5q9.part", empty_home / f".{mw.LPIPS_ALEX}.z9y8x7w6.part"
    other = empty_home / f".{mw.ALEXNET}.a1b2c3d4.part"
    for part in (old, fresh, other):
        part.write_bytes(b"x" * 100)
    two_days_ago = time.time() - 2 * 86400
    for part in (old, other):
        os.utime(part, (two_days_ago, two_days_ago))
    _weights.locate(_served_spec(monkeypatch))
    assert _parts(empty_home) == {fresh}
    assert other.exists()
