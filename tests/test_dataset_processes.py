"""The dataset store across processes: SIGKILL mid-run then the same run again, and torchrun with two ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_vae, write_hub_model
from test_dataset import reference, shard_keys, write_images

from vae_toolkit import latents
from vae_toolkit.buckets import prepare_image
from vae_toolkit.dataset import INDEX_NAME, LatentStore, find_images, sample_generator

TESTS = Path(__file__).parent
N_IMAGES = 40

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_vae
    from vae_toolkit import store_files
    from vae_toolkit.dataset import encode_dataset

    source, output, delay, kill_on_replace = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {{}}
    vae = make_tiny_vae()
    if delay:
        real = vae.encode
        def slow(x, *args, **kwargs):
            time.sleep(delay)
            return real(x, *args, **kwargs)
        vae.encode = slow
    if kill_on_replace:  # SIGKILL between writing a temporary file and renaming it into place
        calls = [0]
        real_replace = os.replace
        def replace(src, dst):
            calls[0] += 1
            if calls[0] == kill_on_replace:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        store_files.os.replace = replace
    s = encode_dataset(vae, source, output, batch_size=2, max_shard_size=1, workers=2, progress=False, **options)
    print(json.dumps({{"encoded": s.encoded, "skipped": s.skipped, "failed": s.failed}}))
    """
)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "encode.py"
    path.write_text(DRIVER.format(tests=str(TESTS)))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    write_images(folder, n=N_IMAGES)
    return folder


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the children import this checkout's vae_toolkit, not another installed copy
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS.parent), env.get("PYTHONPATH")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(driver: Path, source: Path, out: Path, delay: float = 0.0, kill_on_replace: int = 0, options=None):
    cmd = [sys.executable, str(driver), str(source), str(out), str(delay), str(kill_on_replace)]
    cmd.append(json.dumps(options or {}))
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_complete(out: Path, source: Path, vae, options=None) -> None:
    keys = find_images(source)[1]
    stored = shard_keys(out)  # also proves every shard file is a complete safetensors file
    assert sorted(stored) == keys, "every image present exactly once"
    assert not list(out.glob("*.tmp"))
    with LatentStore(out) as s:
        assert list(s) == keys
        assert s.flips == bool((options or {}).get("flip")) and s.distributions == bool(
            (options or {}).get("distribution")
        )
        for key in keys[::7]:
            assert (s[key] - reference(vae, source / key)).abs().max().item() <= 1e-5
            if s.flips:  # the latent of the mirrored image
                with torch.no_grad():
                    mirrored = latents.encode(vae, prepare_image(source / key).image.flip(-1)[None])[0]
                assert (s.get(key, flipped=True) - mirrored).abs().max().item() <= 1e-5


# label -> (kill once this many shards exist, kill at the n-th os.replace: a shard's or the index's rename)
SCENARIOS = {
    "after 2 shards": (2, 0),
    "after 14 shards": (14, 0),
    "before the first rename": (0, 1),
    "before the 6th rename": (0, 6),
    "before the index rename": (0, N_IMAGES + 1),
    "after 2 shards, flip + distribution": (2, 0),
    "before the 6th rename, flip + distribution": (0, 6),
}
OPTIONS = {label: {"flip": True, "distribution": True} for label in SCENARIOS if label.endswith("distribution")}


@pytest.fixture(scope="module")
def killed(driver, source, tmp_path_factory):
    """Run every scenario at once: SIGKILL each run, count what it stored, run it again; label -> results."""
    tmp = tmp_path_factory.mktemp("killed")
    outs = {label: tmp / str(i) for i, label in enumerate(SCENARIOS)}
    procs = {
        label: _run(
            driver,
            source,
            outs[label],
            delay=0.1 if shards else 0.0,
            kill_on_replace=replace,
            options=OPTIONS.get(label),
        )  # fmt: skip
        for label, (shards, replace) in SCENARIOS.items()
    }
    deadline = time.monotonic() + 120
    waiting = {label for label, (shards, _) in SCENARIOS.items() if shards}
    while waiting and time.monotonic() < deadline:
        for label in list(waiting):
            out, proc = outs[label], procs[label]
            if proc.poll() is not None or (
                out.is_dir() and len(list(out.glob("*.safetensors"))) >= SCENARIOS[label][0]
            ):
                proc.send_signal(signal.SIGKILL)
                waiting.discard(label)
        time.sleep(0.005)
    first = {label: (*proc.communicate(timeout=120), proc.returncode) for label, proc in procs.items()}
    stored = {label: len(shard_keys(outs[label])) for label in SCENARIOS}
    temporary = {label: len(list(outs[label].glob("*.tmp"))) for label in SCENARIOS}
    assert not any((out / INDEX_NAME).exists() for out in outs.values())  # every run was killed before the end
    reruns = {label: _run(driver, source, outs[label], options=OPTIONS.get(label)) for label in SCENARIOS}
    second = {label: (*proc.communicate(timeout=120), proc.returncode) for label, proc in reruns.items()}
    return outs, first, stored, temporary, second


@pytest.mark.parametrize("label", list(SCENARIOS))
def test_sigkill_then_the_same_run_again_completes_without_recomputing(killed, source, label):
    outs, first, stored, temporary, second = killed
    shards, replace = SCENARIOS[label]
    assert first[label][2] == -signal.SIGKILL, f"not killed: {first[label]}"
    if shards:
        assert shards <= stored[label] < N_IMAGES
    else:  # killed with the temporary file written and not yet renamed
        assert stored[label] == min(replace - 1, N_IMAGES) and temporary[label] == 1
    stdout, stderr, returncode = second[label]
    assert returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result == {"encoded": N_IMAGES - stored[label], "skipped": stored[label], "failed": {}}
    _check_complete(outs[label], source, make_tiny_vae(), OPTIONS.get(label))


# --- torchrun -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """Two torchrun encodes (2 ranks, gloo) started together: the mean with a bad file, and --sample."""
    tmp = tmp_path_factory.mktemp("torchrun")
    hf_home = tmp / "hf"
    write_hub_model(hf_home, "CompVis/stable-diffusion-v1-4", "vae")
    src = tmp / "src"
    write_images(src, n=13)
    (src / "part1" / "broken.png").write_bytes(b"broken")
    env = {**_env(), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    base += ["-m", "vae_toolkit", "encode", str(src), "--model", "sd14", "--batch-size", "3", "--no-progress"]
    commands = {"mean": ["-o", str(tmp / "mean")], "sample": ["-o", str(tmp / "sample"), "--sample", "--seed", "5"]}
    commands["training"] = ["-o", str(tmp / "training"), *TRAINING_ARGS]
    procs = {
        label: subprocess.Popen(base + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for label, args in commands.items()
    }
    single = base[:1] + base[5:] + ["-o", str(tmp / "single"), "--batch-size", "5"]  # one process, other batches
    procs["single"] = subprocess.Popen(single, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {label: (*proc.communicate(timeout=180), proc.returncode) for label, proc in procs.items()}
    return tmp, src, results


def _tiny_sd14(hf_home: Path):
    from diffusers import AutoencoderKL

    snapshot = next((hf_home / "hub" / "models--CompVis--stable-diffusion-v1-4" / "snapshots").iterdir())
    return AutoencoderKL.from_pretrained(snapshot / "vae").eval()


@pytest.mark.parametrize("label", ["mean", "sample"])
def test_torchrun_two_ranks_match_one_process(torchrun_runs, label):
    tmp, src, results = torchrun_runs
    stdout, stderr, returncode = results[label]
    vae = _tiny_sd14(tmp / "hf")
    keys = find_images(src)[1]
    good = [k for k in keys if k != "part1/broken.png"]
    shards = sorted(p.name for p in (tmp / label).glob("*.safetensors"))
    assert {name.split("-")[2] for name in shards} == {"r000", "r001"}, "each rank writes its own shards"
    assert sorted(shard_keys(tmp / label)) == good, "disjoint parts, nothing twice"
    s = LatentStore(tmp / label)
    assert list(s) == good
    for key in good:
        kwargs = dict(sample=True, generator=sample_generator(5, key)) if label == "sample" else {}
        assert (s[key] - reference(vae, src / key, **kwargs)).abs().max().item() <= 1e-5, key
    if label == "mean":  # the same keys and latents as the single-process run of the same command
        one = LatentStore(tmp / "single")
        assert list(one) == list(s)
        assert max((one[key] - s[key]).abs().max().item() for key in good) <= 1e-5
        assert one.metadata["model"] == s.metadata["model"] == "sd14"
    assert set(s.failures) == {"part1/broken.png"}  # a failure on one rank reaches rank 0's index
    assert returncode == 1, stderr
    assert stdout.count("encode: 14 images: 13 encoded, 0 already stored, 1 failed") == 1  # rank 0 reports
    assert stderr.count("skipped part1/broken.png") == 1


TRAINING_ARGS = ["--flip", "--distribution", "--buckets", "24", "--bucket-step", "8"]


def test_torchrun_flip_distribution_buckets_match_one_process(torchrun_runs, tmp_path):
    from vae_toolkit.dataset import encode_dataset

    tmp, src, results = torchrun_runs
    stdout, stderr, returncode = results["training"]
    assert returncode == 1 and "13 encoded" in stdout, stderr  # 1: the broken file
    vae = _tiny_sd14(tmp / "hf")
    one = tmp_path / "one"
    encode_dataset(vae, src, one, model="sd14", batch_size=5, progress=False, buckets=24, bucket_step=8, flip=True,
                   distribution=True)  # fmt: skip
    a, b = LatentStore(tmp / "training"), LatentStore(one)
    assert list(a) == list(b) and len(a) == 13 and a.flips and a.distributions
    assert {name.split("-")[2] for name in (p.name for p in (tmp / "training").glob("*.safetensors"))} == {
        "r000",
        "r001",
    }
    for key in a:
        for flipped in (False, True):
            for x, y in zip(a.distribution(key, flipped=flipped), b.distribution(key, flipped=flipped), strict=True):
                assert (x - y).abs().max().item() <= 1e-5, key
        assert a.entry(key) == b.entry(key)
    rerun = encode_dataset(vae, src, tmp / "training", model="sd14", progress=False, buckets=24, bucket_step=8,
                           flip=True, distribution=True)  # fmt: skip
    assert (rerun.encoded, rerun.skipped) == (0, 13)


def test_torchrun_store_is_resumed_by_a_single_process(torchrun_runs, tmp_path):
    from vae_toolkit.dataset import encode_dataset

    tmp, src, _ = torchrun_runs
    vae = _tiny_sd14(tmp / "hf")
    summary = encode_dataset(vae, src, tmp / "mean", model="sd14", batch_size=3, progress=False)
    assert (summary.encoded, summary.skipped, list(summary.failed)) == (0, 13, ["part1/broken.png"])
    assert torch.is_tensor(LatentStore(tmp / "mean")[0])


# --- SIGTERM ------------------------------------------------------------------------------------------


def test_sigterm_flushes_exits_143_and_the_rerun_completes(driver, source, tmp_path):
    """SLURM preemption and torchrun teardown send SIGTERM: the open shard is written, then exit 143."""
    out = tmp_path / "out"
    big = [sys.executable, "-c", DRIVER.format(tests=str(TESTS)).replace("max_shard_size=1", "max_shard_size=2**30")]
    proc = subprocess.Popen(big + [str(source), str(out), "0.1", "0"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not (out / "latents.lock").exists():
        time.sleep(0.01)
    time.sleep(1.5)  # some batches encoded, none written: a 1 GB shard is far from full
    assert not list(out.glob("*.safetensors"))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    stored = len(shard_keys(out))
    assert 0 < stored < N_IMAGES, "the open shard was written on SIGTERM"
    rerun = _run(driver, source, out)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1]) == {
        "encoded": N_IMAGES - stored,
        "skipped": stored,
        "failed": {},
    }
    _check_complete(out, source, make_tiny_vae())
