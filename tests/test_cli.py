"""``python -m vae_toolkit``: env, models and roundtrip end to end (subprocesses against a tiny offline model),
argument errors and report details in-process through ``main([...])``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import write_hub_model
from PIL import Image

import vae_toolkit
from vae_toolkit import __main__ as cli
from vae_toolkit import list_available_models

GB = 1024**3


def _write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# --- end to end, in subprocesses (few, started together: each pays 2-6 s of imports) ----------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every CLI invocation of this section at once; map a label to (returncode, stdout, stderr, tmp)."""
    tmp = tmp_path_factory.mktemp("cli")
    hf_home = tmp / "hf"
    write_hub_model(hf_home, "CompVis/stable-diffusion-v1-4", "vae")
    folder = tmp / "folder"
    folder.mkdir()
    _write_image(folder / "a.png", 32, 32, seed=1)
    _write_image(folder / "b.jpg", 37, 33, seed=2)  # cropped to 32x32
    (folder / "notes.txt").write_text("not an image")
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "default",
        "OMP_NUM_THREADS": "1",
    }  # one thread each: the processes run side by side
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    commands = {
        "env": [],  # the default command
        "roundtrip-dir": ["roundtrip", "folder", "--model", "sd14", "--device", "cpu", "-o", "recs"],
    }
    procs = {
        label: subprocess.Popen(
            [sys.executable, "-m", "vae_toolkit", *args],
            cwd=tmp,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for label, args in commands.items()
    }
    results = {}
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        results[label] = (proc.returncode, out, err, tmp)
    return results


def test_env_text(runs):
    code, out, err, tmp = runs["env"]
    assert code == 0, err
    assert f"vae-toolkit {vae_toolkit.__version__}" in out
    for name, version in [("torch", torch.__version__), ("Python", sys.version.split()[0]), ("numpy", np.__version__)]:
        assert name in out and version in out
    for label in (
        "diffusers",
        "huggingface_hub",
        "Pillow",
        "platform",
        "CUDA available",
        "MPS available",
        "auto device",
        "system RAM",
        "HF cache",
        "HF offline mode",
    ):
        assert label in out
    assert str(tmp / "hf") in out
    assert "HF offline mode: on" in " ".join(out.split())


def test_roundtrip_directory(runs):
    code, out, err, tmp = runs["roundtrip-dir"]
    assert code == 0, err
    assert sorted(p.name for p in (tmp / "recs").iterdir()) == ["a.png", "b.png"]
    with Image.open(tmp / "recs" / "b.png") as img:
        assert img.size == (32, 32)
    assert [line.split()[0] for line in out.splitlines() if "PSNR" in line] == ["folder/a.png", "folder/b.jpg", "2"]
    assert "2 image(s) written to recs: mean PSNR" in out
    assert err == ""


# --- in-process ---------------------------------------------------------------------------------


def test_env_json(capsys, hf_home):
    assert cli.main(["--json"]) == 0  # env is the default command
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {
        "versions",
        "platform",
        "cuda",
        "mps_available",
        "gpus",
        "auto_device",
        "system_memory",
        "huggingface",
    }
    assert info["versions"]["vae-toolkit"] == vae_toolkit.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert info["auto_device"]["device"] == vae_toolkit.auto_select_device()
    assert info["auto_device"]["reason"]
    devices = vae_toolkit.list_devices()
    assert [g["device"] for g in info["gpus"]] == [d.device for d in devices if d.device.startswith("cuda:")]
    assert info["mps_available"] == any(d.device == "mps" for d in devices)
    assert info["huggingface"]["offline"] is True
    assert info["huggingface"]["cache"].startswith(str(hf_home))
    assert info["system_memory"]["total"] == psutil.virtual_memory().total


def test_models_lists_the_registry(capsys):
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:8] == ["name", "class", "repo", "subfolder", "channels", "factor", "scaling", "shift"]
    assert [line.split()[0] for line in lines[1:]] == list_available_models()
    flux = next(line for line in lines if line.startswith("flux-schnell")).split()
    assert flux[:8] == ["flux-schnell", "AutoencoderKL", "black-forest-labs/FLUX.1-schnell", "vae", "16", "8",
                        "0.3611", "0.1159"]  # fmt: skip
    dc = next(line for line in lines if line.startswith("sana-dc-ae")).split()
    assert dc[:6] == ["sana-dc-ae", "AutoencoderDC", "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", "-", "32", "32"]


def test_roundtrip_one_image(capsys, tmp_path, hf_home):
    src = _write_image(tmp_path / "photo.png", 48, 40)
    assert cli.main(["roundtrip", str(src), "--model", "sd14", "-o", str(tmp_path / "out" / "rec.png")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    with Image.open(tmp_path / "out" / "rec.png") as img:
        assert img.size == (48, 40) and img.mode == "RGB"
    model_line, line = captured.out.splitlines()
    assert model_line.startswith("model sd14 on cpu (float32): loaded in")
    assert "PSNR" in line and " dB" in line
    for step in ("load", "encode", "decode", "save"):
        assert f"{step} " in line


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["roundtrip", "--model", "sd14"], "the following arguments are required: IMAGE"),
        (["roundtrip", "x.png"], "required: --model"),
        (["roundtrip", "x.png", "--model", "sd14", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        (["roundtrip", "x.png", "--model", "nope"], "invalid model 'nope'"),
        (["roundtrip", "x.png", "--model", "sd14", "--device", "gpu"], "argument --device: Invalid device 'gpu'"),
        (["roundtrip", "x.png", "--model", "sd14", "--size", "30"], "multiple of 8"),
        (["models", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, match):
    assert cli.main(argv) == 2
    line = _one_line_error(capsys)
    assert "error:" in line and match in line


def test_unknown_model_lists_the_known_ones(capsys):
    assert cli.main(["roundtrip", "x.png", "--model", "sd99"]) == 2
    line = _one_line_error(capsys)
    assert all(name in line for name in list_available_models())


def test_missing_image_exits_1(capsys, tmp_path):
    assert cli.main(["roundtrip", str(tmp_path / "missing.png"), "--model", "sd14"]) == 1
    assert "image file not found" in _one_line_error(capsys)


def test_corrupt_image_exits_1_before_loading_the_model(capsys, tmp_path, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("loaded"))
    assert cli.main(["roundtrip", str(bad), "--model", "sd14"]) == 1
    assert f"Failed to load image {bad}: not an image PIL can read" in _one_line_error(capsys)


def test_empty_directory_exits_1(capsys, tmp_path):
    assert cli.main(["roundtrip", str(tmp_path), "--model", "sd14"]) == 1
    assert "no image files found" in _one_line_error(capsys)


@pytest.mark.parametrize(("output", "match"), [("out.xyz", "use a suffix like .png"), ("in.png", "overwrite")])
def test_bad_output_exits_2(capsys, tmp_path, output, match):
    src = _write_image(tmp_path / "in.png", 16, 16)
    assert cli.main(["roundtrip", str(src), "--model", "sd14", "-o", str(tmp_path / output)]) == 2
    assert match in _one_line_error(capsys)


def test_model_missing_offline_exits_1(capsys, tmp_path, hf_home):
    src = _write_image(tmp_path / "in.png", 16, 16)
    assert cli.main(["roundtrip", str(src), "--model", "sdxl"]) == 1
    line = _one_line_error(capsys)
    assert "stabilityai/sdxl-vae" in line and "offline" in line.lower()


def test_roundtrip_in_process_default_output_and_size(capsys, tmp_path, hf_home):
    src = _write_image(tmp_path / "big.png", 60, 44)
    assert cli.main(["roundtrip", str(src), "--model", "sd14", "--size", "32"]) == 0
    out = capsys.readouterr().out
    dst = tmp_path / "big-roundtrip.png"
    with Image.open(dst) as img:
        assert img.size == (32, 32)
    assert f"-> {dst}" in out and "(32x32)" in out


def test_roundtrip_directory_reports_failures(capsys, tmp_path, hf_home):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _write_image(folder / "good.png", 16, 16)
    (folder / "bad.jpg").write_bytes(b"broken")
    assert cli.main(["roundtrip", str(folder), "--model", "sd14"]) == 1
    captured = capsys.readouterr()
    assert (tmp_path / "imgs-roundtrip" / "good.png").is_file()
    assert "skipped" in captured.err and "bad.jpg" in captured.err
    assert "1 of 2 image(s) failed" in captured.err
    assert captured.out.count("PSNR") == 2  # the image line and the summary


def test_models_json(capsys):
    assert cli.main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == list_available_models()
    assert data["sd14"]["scaling_factor"] == 0.18215
    assert data["flux-schnell"]["shift_factor"] == 0.1159
    assert data["sd14"]["input_size"] == [512, 512]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vae-toolkit {vae_toolkit.__version__}"


def test_env_reports_every_gpu_and_the_pick_without_nvml(fake_cuda, caplog):
    cuda = fake_cuda([(3 * GB, 8 * GB), (6 * GB, 8 * GB)])
    info = cli.collect_env()
    assert [g["device"] for g in info["gpus"]] == ["cuda:0", "cuda:1"]
    assert [g["free_memory"] for g in info["gpus"]] == [3 * GB, 6 * GB]
    assert {g["memory_source"] for g in info["gpus"]} == {"torch"}
    assert info["gpus"][1]["name"] == "Fake GPU 1"
    assert info["auto_device"]["device"] == "cuda:1"
    assert "most free memory" in info["auto_device"]["reason"]
    assert sorted(set(cuda.mem_get_info_calls)) == [0, 1]  # the documented cost of the fallback ...
    notices = [r.getMessage() for r in caplog.records if "NVML cannot be used" in r.getMessage()]
    assert len(notices) == 1 and "nvidia-ml-py is not installed" in notices[0]  # ... stated once
    text = cli.format_env(info)
    assert "GPU cuda:1:" in text and "6.0 GB free (torch)" in text
    json.dumps(info)


def test_env_with_nvml_creates_no_cuda_context(fake_cuda, fake_nvml):
    cuda = fake_cuda([(3 * GB, 8 * GB), (3 * GB, 8 * GB), (3 * GB, 8 * GB)])
    fake_nvml([(5 * GB, 16 * GB), (9 * GB, 16 * GB), (1 * GB, 16 * GB)])
    info = cli.collect_env()
    assert [(g["free_memory"], g["total_memory"], g["memory_source"]) for g in info["gpus"]] == [
        (5 * GB, 16 * GB, "nvml"),
        (9 * GB, 16 * GB, "nvml"),
        (1 * GB, 16 * GB, "nvml"),
    ]
    assert info["auto_device"] == {
        "device": "cuda:1",
        "reason": "most free memory of 3 CUDA devices, 9.0 GB",
        "warnings": [],
    }
    assert cuda.mem_get_info_calls == [] and cuda.context_devices == set()
    assert "GPU cuda:1:" in cli.format_env(info) and "9.0 GB free (nvml)" in cli.format_env(info)


def test_env_single_gpu(fake_cuda, fake_nvml):
    fake_cuda([(3 * GB, 8 * GB)])
    fake_nvml([(5 * GB, 16 * GB)])
    info = cli.collect_env()
    assert info["gpus"][0]["free_memory"] == 5 * GB
    assert info["gpus"][0]["memory_source"] == "nvml"
    assert info["auto_device"] == {"device": "cuda:0", "reason": "the only visible CUDA device", "warnings": []}


def test_env_on_cpu_explains_the_pick(cpu_only):
    info = cli.collect_env()
    assert info["gpus"] == []
    assert info["auto_device"]["device"] == "cpu"
    assert "no CUDA or MPS" in info["auto_device"]["reason"]


def test_env_never_shows_the_token(capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    assert cli.main(["env", "--json"]) == 0
    out = capsys.readouterr().out
    assert "hf_secretvalue123" not in out
    assert json.loads(out)["huggingface"]["token"] == "set (HF_TOKEN)"


# --- roundtrip never replaces a file it did not just create; -o DIR/ ------------------------------------


class TestRoundtripOutputs:
    @staticmethod
    def run(*argv: str | Path) -> int:
        return cli.main(["roundtrip", *map(str, argv), "--model", "sd14", "--device", "cpu"])

    def test_an_earlier_output_is_not_replaced(self, capsys, tmp_path, hf_home):
        _write_image(tmp_path / "photo.png", 16, 16, seed=1)
        _write_image(tmp_path / "photo.jpg", 16, 16, seed=2)
        assert self.run(tmp_path / "photo.png") == 0
        dst = tmp_path / "photo-roundtrip.png"
        first = dst.read_bytes()
        capsys.readouterr()
        assert self.run(tmp_path / "photo.jpg") == 2  # same default output name
        line = _one_line_error(capsys)
        assert f"{dst} already exists; pass --overwrite to replace it" in line
        assert dst.read_bytes() == first

    def test_overwrite_replaces_it(self, capsys, tmp_path, hf_home):
        src = _write_image(tmp_path / "photo.png", 16, 16)
        dst = tmp_path / "out.png"
        dst.write_bytes(b"old")
        assert self.run(src, "-o", dst, "--overwrite") == 0
        with Image.open(dst) as img:
            assert img.size == (16, 16)

    def test_directory_mode_refuses_before_writing_anything(self, capsys, tmp_path, hf_home, monkeypatch):
        folder = tmp_path / "imgs"
        folder.mkdir()
        for name in ("a.png", "b.png", "c.png"):
            _write_image(folder / name, 16, 16)
        out = tmp_path / "recs"
        out.mkdir()
        (out / "b.png").write_bytes(b"keep")
        (out / "c.png").write_bytes(b"keep")
        monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("loaded"))
        assert self.run(folder, "-o", out) == 2
        line = _one_line_error(capsys)
        assert f"{out / 'b.png'} (and 1 more) already exists; pass --overwrite" in line
        assert sorted(p.name for p in out.iterdir()) == ["b.png", "c.png"]
        assert (out / "b.png").read_bytes() == b"keep"

    def test_directory_mode_with_overwrite_replaces(self, capsys, tmp_path, hf_home):
        folder = tmp_path / "imgs"
        folder.mkdir()
        _write_image(folder / "a.png", 16, 16)
        out = tmp_path / "recs"
        out.mkdir()
        (out / "a.png").write_bytes(b"old")
        assert self.run(folder, "-o", out, "--overwrite") == 0
        with Image.open(out / "a.png") as img:
            assert img.size == (16, 16)

    def test_inputs_are_never_replaced_even_with_overwrite(self, capsys, tmp_path, hf_home):
        folder = tmp_path / "imgs"
        folder.mkdir()
        src = _write_image(folder / "a.png", 16, 16)
        before = src.read_bytes()
        assert self.run(folder, "-o", folder, "--overwrite") == 2
        assert f"refusing to overwrite the input image {src}" in _one_line_error(capsys)
        assert src.read_bytes() == before

    def test_a_file_that_appears_during_the_run_is_not_replaced(self, capsys, tmp_path, hf_home, monkeypatch):
        from vae_toolkit.vae_loader import VAELoader

        src = _write_image(tmp_path / "photo.png", 16, 16)
        dst = tmp_path / "photo-roundtrip.png"
        real = VAELoader.load_sd_vae

        def load_then_someone_writes(self, *args, **kwargs):
            dst.write_bytes(b"theirs")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(VAELoader, "load_sd_vae", load_then_someone_writes)
        assert self.run(src) == 1
        assert f"{dst} appeared while running; not replaced" in _one_line_error(capsys)
        assert dst.read_bytes() == b"theirs"

    @pytest.mark.parametrize("suffix", sorted({"/", os.sep}))
    def test_output_ending_in_a_separator_is_a_new_directory(self, capsys, tmp_path, hf_home, suffix):
        src = _write_image(tmp_path / "photo.png", 16, 16)
        assert self.run(src, "-o", f"{tmp_path / 'out' / 'newdir'}{suffix}") == 0
        dst = tmp_path / "out" / "newdir" / "photo-roundtrip.png"
        with Image.open(dst) as img:
            assert img.size == (16, 16)
        assert f"-> {dst}" in capsys.readouterr().out

    def test_output_without_suffix_or_separator_still_asks_for_one(self, capsys, tmp_path):
        src = _write_image(tmp_path / "photo.png", 16, 16)
        assert self.run(src, "-o", tmp_path / "newdir") == 2
        assert "use a suffix like .png, or end it with / for a directory" in _one_line_error(capsys)


def test_cuda_fallback_hint_names_the_command_line_option(capsys, tmp_path, hf_home, cpu_only):
    src = _write_image(tmp_path / "photo.png", 16, 16)
    assert cli.main(["roundtrip", str(src), "--model", "sd14", "--device", "cuda"]) == 0
    err = capsys.readouterr().err
    assert "cuda was requested but CUDA is not available; using CPU" in err
    assert "--device cpu" in err and "device='cpu'" not in err


# --- PSNR: the printed value against an independent computation ------------------------------------


def _psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _printed_psnrs(out: str) -> list[str]:
    return re.findall(r"PSNR (\S+) dB", out)


def test_roundtrip_psnr_equals_an_independent_computation_on_the_files(capsys, tmp_path, hf_home):
    src = _write_image(tmp_path / "in.png", 32, 24, seed=3)
    dst = tmp_path / "rec.png"
    assert cli.main(["roundtrip", str(src), "--model", "sd14", "-o", str(dst)]) == 0
    with Image.open(src) as a, Image.open(dst) as b:
        expected = _psnr_db(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    assert 0 < expected < 60
    assert _printed_psnrs(capsys.readouterr().out) == [f"{expected:.2f}"]


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(16, 240, (16, 16, 3), dtype=np.uint8)


def _offset(step: int, every: int):
    """A decode that returns its input with ``step`` levels added to every ``every``-th value (known MSE)."""
    delta = torch.zeros(1, 3, 16, 16)
    delta.view(-1)[::every] = step / 127.5
    return lambda vae, z, **kwargs: z + delta


@pytest.mark.parametrize(
    ("step", "every", "expected"),
    [
        pytest.param(4, 4, "42.11", id="mse-4"),  # 192 of 768 values off by 4: MSE 4, 10*log10(255**2/4)
        pytest.param(1, 1, "48.13", id="mse-1"),  # every value off by 1: MSE 1
        pytest.param(15, 3, "29.38", id="mse-75"),  # 256 of 768 values off by 15: MSE 75
        pytest.param(0, 1, "inf", id="identical"),
    ],
)
def test_roundtrip_psnr_of_a_known_mse(capsys, tmp_path, hf_home, monkeypatch, step, every, expected):
    arr = _pixels(0)
    src = tmp_path / "in.png"
    Image.fromarray(arr).save(src)
    monkeypatch.setattr("vae_toolkit.latents.encode", lambda vae, x, **kwargs: x)  # latents = the image itself
    monkeypatch.setattr("vae_toolkit.latents.decode", _offset(step, every))
    assert cli.main(["roundtrip", str(src), "--model", "sd14", "-o", str(tmp_path / "rec.png")]) == 0
    with Image.open(tmp_path / "rec.png") as rec:
        got = np.asarray(rec)
    diff = got.astype(np.int64) - arr
    assert float(np.mean(diff**2)) == (step**2 / every if step else 0.0)  # the pair really has that MSE
    assert f"{_psnr_db(arr, got):.2f}" == expected
    assert _printed_psnrs(capsys.readouterr().out) == [expected]


def test_roundtrip_directory_mean_psnr_of_known_mses(capsys, tmp_path, hf_home, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        Image.fromarray(_pixels(seed)).save(folder / name)
    decodes = iter([_offset(4, 4), _offset(1, 1), _offset(0, 1)])  # MSE 4, 1, identical (sorted order)
    monkeypatch.setattr("vae_toolkit.latents.encode", lambda vae, x, **kwargs: x)
    monkeypatch.setattr("vae_toolkit.latents.decode", lambda vae, z, **kwargs: next(decodes)(vae, z))
    assert cli.main(["roundtrip", str(folder), "--model", "sd14"]) == 0
    # the mean is over the finite values: (42.11 + 48.13) / 2, computed before rounding
    mean = (10 * np.log10(255.0**2 / 4) + 10 * np.log10(255.0**2)) / 2
    assert _printed_psnrs(capsys.readouterr().out) == ["42.11", "48.13", "inf", f"{mean:.2f}"]


def test_roundtrip_of_an_image_smaller_than_8_pixels(capsys, tmp_path, hf_home):
    src = _write_image(tmp_path / "thin.png", 5, 40)
    assert cli.main(["roundtrip", str(src), "--model", "sd14", "--device", "cpu"]) == 1
    assert "image is 5x40; it needs at least 8x8 pixels" in _one_line_error(capsys)
