"""``python -m vae_toolkit encode`` / ``decode`` through ``main([...])`` against the tiny offline sd14."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_dataset import write_images

from vae_toolkit import VAELoader, latents, store_files, tensor_to_pil
from vae_toolkit import __main__ as cli
from vae_toolkit.dataset import INDEX_NAME, LatentStore


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    write_images(folder, n=6)
    return folder


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def encode(capsys, src, out, *extra):
    return run(
        capsys, "encode", str(src), "-o", str(out), "--model", "sd14", "--device", "cpu", "--no-progress", *extra
    )


def test_encode_then_again(hf_home, capsys, src, tmp_path):
    code, out, err = encode(capsys, src, tmp_path / "out", "--batch-size", "4")
    assert code == 0, err
    assert out.startswith("encode: 6 images: 6 encoded, 0 already stored, 0 failed -> ")
    assert "images/s" in out
    meta = LatentStore(tmp_path / "out").metadata
    assert meta["model"] == "sd14" and meta["repo_id"] == "CompVis/stable-diffusion-v1-4"
    code, out, err = encode(capsys, src, tmp_path / "out", "--batch-size", "4")
    assert code == 0 and "6 images: 0 encoded, 6 already stored, 0 failed" in out


def test_encode_with_a_bad_image_finishes_the_rest_and_exits_1(hf_home, capsys, src, tmp_path):
    (src / "part0" / "zz-bad.png").write_bytes(b"garbage")
    code, out, err = encode(capsys, src, tmp_path / "out")
    assert code == 1
    assert "7 images: 6 encoded, 0 already stored, 1 failed" in out
    lines = err.strip().splitlines()
    assert lines[0].startswith("python -m vae_toolkit: warning: skipped part0/zz-bad.png: Failed to load image ")
    assert "1 of 7 image(s) failed" in lines[-1] and INDEX_NAME in lines[-1]
    assert len(LatentStore(tmp_path / "out")) == 6


def test_a_store_of_another_model_is_refused_before_loading(hf_home, capsys, src, tmp_path):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    # sd15 is not in the offline cache: loading it would fail with exit status 1
    code, out, err = run(capsys, "encode", str(src), "-o", str(tmp_path / "out"), "--model", "sd15", "--no-progress")
    assert code == 2 and out == ""
    assert "model: stored 'sd14', requested 'sd15'" in err and "--overwrite" in err


def test_overwrite_starts_again(hf_home, capsys, src, tmp_path):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    code, out, err = encode(capsys, src, tmp_path / "out", "--size", "16", "--overwrite")
    assert code == 0 and "6 encoded" in out
    assert LatentStore(tmp_path / "out").metadata["size"] == 16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "invalid value 0: expected a positive integer"),
        (["--size", "12"], "expected a positive multiple of 8"),
        (["--seed", "-1"], "expected an integer >= 0"),
        (["--device", "gpu"], "argument --device"),
        (["--dtype", "int8"], "argument --dtype"),
    ],
)
def test_encode_bad_arguments_exit_2(capsys, src, tmp_path, args, message):
    code, out, err = encode(capsys, src, tmp_path / "out", *args)
    assert code == 2 and message in err and not (tmp_path / "out").exists()


def test_encode_missing_source_and_file_output_exit_2(hf_home, capsys, src, tmp_path):
    code, _, err = encode(capsys, tmp_path / "missing", tmp_path / "out")
    assert code == 2 and "missing does not exist" in err
    (tmp_path / "file").write_text("x")
    code, _, err = encode(capsys, src, tmp_path / "file")
    assert code == 2 and "is a file" in err
    (tmp_path / "empty").mkdir()
    code, _, err = encode(capsys, tmp_path / "empty", tmp_path / "out")
    assert code == 2 and "no image files found" in err


def test_decode_writes_what_was_stored(hf_home, capsys, src, tmp_path):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    store = LatentStore(tmp_path / "out")
    code, out, err = run(capsys, "decode", str(tmp_path / "out"), "-o", str(tmp_path / "png"), "--no-progress")
    assert code == 0, err
    assert out.startswith("decode: 6 of 6 latents -> ")
    vae, _ = VAELoader().load_sd_vae("sd14", "cpu")
    for key in store:
        png = tmp_path / "png" / key.rsplit(".", 1)[0]
        png = png.with_name(png.name + ".png")
        with torch.no_grad():
            expected = np.asarray(tensor_to_pil(latents.decode(vae, store[key])))
        with Image.open(png) as img:
            assert np.array_equal(np.asarray(img), expected), key
            assert img.size == tuple(store.entry(key)["size"])


def test_decode_limit_and_overwrite(hf_home, capsys, src, tmp_path):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    args = ["decode", str(tmp_path / "out"), "-o", str(tmp_path / "png"), "--limit", "2", "--no-progress"]
    code, out, _ = run(capsys, *args)
    assert code == 0 and out.startswith("decode: 2 of 6 latents")
    assert len(list((tmp_path / "png").rglob("*.png"))) == 2
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "png").rglob("*.png")}
    code, _, err = run(capsys, *args)
    assert code == 2 and "refusing to overwrite" in err and "and 1 more" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "png").rglob("*.png")} == before
    assert run(capsys, *args, "--overwrite")[0] == 0


def test_decode_never_replaces_a_file_that_appears_during_the_run(hf_home, capsys, src, tmp_path, monkeypatch):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    first = LatentStore(tmp_path / "out").key(0)
    target = (tmp_path / "png" / first).with_suffix(".png")
    real = VAELoader.load_sd_vae

    def load_then_someone_writes(self, *args, **kwargs):
        target.parent.mkdir(parents=True)
        target.write_bytes(b"theirs")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VAELoader, "load_sd_vae", load_then_someone_writes)
    code, out, err = run(capsys, "decode", str(tmp_path / "out"), "-o", str(tmp_path / "png"), "--no-progress")
    assert code == 1 and out.startswith("decode: 5 of 6 latents")
    assert f"{target} appeared while running; not replaced" in err
    assert target.read_bytes() == b"theirs"
    assert len(list((tmp_path / "png").rglob("*.png"))) == 6


def test_decode_names_that_would_collide(hf_home, capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (16, 16), "red").save(src / "a.jpg")
    Image.new("RGB", (16, 16), "blue").save(src / "a.png")
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    assert run(capsys, "decode", str(tmp_path / "out"), "-o", str(tmp_path / "png"), "--no-progress")[0] == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["a.png", "a.png.png"]


def test_decode_bad_store_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "decode", str(tmp_path), "-o", str(tmp_path / "png"))
    assert code == 2 and "no latent store at" in err


def test_decode_of_an_unregistered_model_needs_model(hf_home, capsys, src, tmp_path):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    index["metadata"]["model"] = "my-own-vae"
    store_files.write_index(tmp_path / "out", index)  # as a store of that model (with the index's checksum)
    code, _, err = run(capsys, "decode", str(tmp_path / "out"), "-o", str(tmp_path / "png"))
    assert code == 2 and "'my-own-vae', which is not registered here; pass --model NAME" in err
    args = ["decode", str(tmp_path / "out"), "-o", str(tmp_path / "png"), "--model", "sd14", "--no-progress"]
    assert run(capsys, *args)[0] == 0


# --- what a long run relies on ---------------------------------------------------------------------


def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(VAELoader, "load_sd_vae", fail)


@pytest.mark.parametrize("value", ["inf", "0", "-1", "nan", "big"])
def test_shard_size_is_checked_in_megabytes_before_the_model_loads(capsys, src, tmp_path, monkeypatch, value):
    no_loading(monkeypatch)
    code, out, err = encode(capsys, src, tmp_path / "out", "--shard-size", value)
    assert code == 2 and f"argument --shard-size: invalid shard size {value!r}" in err
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_nothing_to_do_loads_no_model(hf_home, capsys, src, tmp_path, monkeypatch):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    no_loading(monkeypatch)
    code, out, err = encode(capsys, src, tmp_path / "out")
    assert code == 0 and "6 images: 0 encoded, 6 already stored" in out, err


def test_an_empty_source_is_reported_before_the_model_loads(capsys, tmp_path, monkeypatch):
    no_loading(monkeypatch)
    (tmp_path / "empty").mkdir()
    code, _, err = encode(capsys, tmp_path / "empty", tmp_path / "out")
    assert code == 2 and "no image files found" in err


def test_a_second_writer_exits_2_naming_the_first(hf_home, capsys, src, tmp_path, monkeypatch):
    from vae_toolkit.store_files import WriterLock

    (tmp_path / "out").mkdir()
    lock = WriterLock(tmp_path / "out").acquire()
    lock.claim()
    no_loading(monkeypatch)
    try:
        code, out, err = encode(capsys, src, tmp_path / "out")
    finally:
        lock.release()
    assert code == 2 and "another encode run is writing" in err and "PID" in err and "started" in err


@pytest.mark.parametrize("change", [["--size", "16"], ["--latent-dtype", "float16"], ["--sample"]])
def test_refusals_name_command_line_flags_only(hf_home, capsys, src, tmp_path, change):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    code, out, err = encode(capsys, src, tmp_path / "out", *change)
    assert code == 2 and "--overwrite" in err and "overwrite=True" not in err and "-o" in err


def test_float64_latents(hf_home, capsys, src, tmp_path):
    code, out, err = encode(capsys, src, tmp_path / "out", "--latent-dtype", "float64")
    assert code == 0, err
    s = LatentStore(tmp_path / "out")
    assert s.metadata["dtype"] == "float64" and s[s.key(0)].dtype == torch.float64


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_decode_never_writes_into_the_source_folder(hf_home, capsys, src, tmp_path, overwrite):
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    for target in (src, src / "part0"):
        code, out, err = run(capsys, "decode", str(tmp_path / "out"), "-o", str(target), "--no-progress", *overwrite)
        assert code == 2 and "refusing to decode into" in err and "the folder the store was encoded from" in err
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before


def test_decode_goes_on_after_a_file_it_cannot_write(hf_home, capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.jpg"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / name)
    assert encode(capsys, src, tmp_path / "out")[0] == 0
    dec = tmp_path / "dec"
    dec.mkdir()
    (dec / "a.png").mkdir()  # a folder where a.png must go: that one file cannot be written
    code, out, err = run(capsys, "decode", str(tmp_path / "out"), "-o", str(dec), "--no-progress", "--overwrite")
    assert code == 1
    assert "decode: 2 of 3 latents" in out and "1 latent(s) not written" in err and "a.png" in err
    assert (dec / "b.png").is_file() and (dec / "c.png").is_file()


def test_decode_reports_a_damaged_shard_in_one_line_and_goes_on(hf_home, capsys, src, tmp_path):
    assert encode(capsys, src, tmp_path / "out", "--shard-size", "0.000001")[0] == 0
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    victim = tmp_path / "out" / index["shards"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-8])
    code, out, err = run(capsys, "decode", str(tmp_path / "out"), "-o", str(tmp_path / "dec"), "--no-progress")
    assert code == 1 and "decode: 5 of 6 latents" in out
    damaged = [line for line in err.splitlines() if victim.name in line]
    assert len(damaged) == 1 and "is damaged" in damaged[0] and "Traceback" not in err
