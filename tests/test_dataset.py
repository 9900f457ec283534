"""Encoding folders to a latent store (``vae_toolkit.dataset``): values, resume, bad inputs, OOM, reading back.

The crash (SIGKILL) and torchrun tests are in test_dataset_processes.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

import vae_toolkit
from vae_toolkit import batching, latents, pil_to_tensor
from vae_toolkit._dist import ProcessGroup
from vae_toolkit.dataset import (
    INDEX_NAME,
    LatentStore,
    StoreMismatchError,
    check_store,
    encode_dataset,
    find_images,
    sample_generator,
)

# (width, height) of the test images: three sizes (one not a multiple of 8), in two sub-folders
SIZES = [(16, 16), (24, 16), (17, 35), (16, 16), (32, 24)]


def write_images(folder: Path, n: int = 10, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    keys = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        rel = Path(f"part{i % 2}") / f"img{i:03d}{'.png' if i % 3 else '.jpg'}"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / rel)
        keys.append(rel.as_posix())
    return sorted(keys)


def reference(vae, path: Path, size: int | None = None, **kwargs) -> torch.Tensor:
    """The latent of one image encoded alone, prepared as the store does."""
    with Image.open(path) as img:
        if size is not None:
            x = pil_to_tensor(img, target_size=size)
        else:
            w, h = img.size
            cw, ch = w - w % 8, h - h % 8
            left, top = (w - cw) // 2, (h - ch) // 2
            x = pil_to_tensor(img.crop((left, top, left + cw, top + ch)))
    with torch.no_grad():
        return latents.encode(vae, x, **kwargs)


def shard_keys(folder: Path) -> list[str]:
    """Every tensor name in every shard file (duplicates included)."""
    from safetensors import safe_open

    keys = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            keys += list(f.keys())
    return keys


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_images(folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped: hidden")
    (folder / ".cache").mkdir()
    Image.new("RGB", (16, 16)).save(folder / ".cache" / "x.png")
    return folder


@pytest.fixture(scope="module")
def store(vae, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    encode_dataset(vae, source, out, batch_size=3, progress=False, model="tiny")
    return out


# --- the values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, workers", [(1, 1), (3, 2), (8, 4)])
@pytest.mark.parametrize("size", [None, 16])
def test_every_latent_equals_encoding_that_image_alone(vae, source, tmp_path, batch_size, workers, size):
    summary = encode_dataset(vae, source, tmp_path, batch_size=batch_size, workers=workers, size=size, progress=False)
    assert summary.encoded == summary.total == 10 and not summary.failed
    with LatentStore(tmp_path) as s:
        assert len(s) == 10
        for key in s:
            expected = reference(vae, source / key, size)
            got = s[key]
            assert got.shape == expected.shape and got.dtype == torch.float32
            assert (got - expected).abs().max().item() <= 1e-5, key
            w, h = s.entry(key)["size"]
            assert (w * 1, h * 1) == ((size, size) if size else (expected.shape[-1] * 2, expected.shape[-2] * 2))


def test_latents_are_stored_scaled_with_the_models_factors(source, tmp_path):
    vae = make_tiny_vae(scaling_factor=0.5, shift_factor=0.25)
    encode_dataset(vae, source, tmp_path, progress=False)
    s = LatentStore(tmp_path)
    key = s.key(0)
    with torch.no_grad(), Image.open(source / key) as img:
        x = pil_to_tensor(img)
        mean = vae.encode(x.unsqueeze(0)).latent_dist.mean[0]
    torch.testing.assert_close(s[key], (mean - 0.25) * 0.5, atol=1e-5, rtol=0)
    assert s.metadata["scaling_factor"] == 0.5 and s.metadata["shift_factor"] == 0.25


def test_sampled_noise_depends_only_on_seed_and_key(vae, source, tmp_path):
    runs = {}
    for batch_size in (1, 4):
        out = tmp_path / f"b{batch_size}"
        encode_dataset(vae, source, out, batch_size=batch_size, sample=True, seed=7, progress=False)
        runs[batch_size] = LatentStore(out)
    for key in runs[1]:
        expected = reference(vae, source / key, sample=True, generator=sample_generator(7, key))
        assert (runs[1][key] - expected).abs().max().item() <= 1e-5
        assert (runs[4][key] - expected).abs().max().item() <= 1e-5
    mean = reference(vae, source / runs[1].key(0))
    assert (runs[1][runs[1].key(0)] - mean).abs().max().item() > 1e-3  # really sampled
    other = tmp_path / "seed8"
    encode_dataset(vae, source, other, sample=True, seed=8, progress=False)
    assert not torch.allclose(LatentStore(other)[runs[1].key(0)], runs[1][runs[1].key(0)])


def test_sample_generator_is_deterministic_and_key_specific():
    a = torch.randn(4, generator=sample_generator(1, "a.png"))
    assert torch.equal(a, torch.randn(4, generator=sample_generator(1, "a.png")))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(1, "b.png")))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(2, "a.png")))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_dtype(vae, source, tmp_path, dtype):
    encode_dataset(vae, source, tmp_path, dtype=dtype, progress=False)
    s = LatentStore(tmp_path)
    key = s.key(0)
    assert s[key].dtype == dtype and s.metadata["dtype"] == str(dtype).removeprefix("torch.")
    torch.testing.assert_close(s[key].float(), reference(vae, source / key), atol=2e-2, rtol=2e-2)


# --- listing and the index ------------------------------------------------------------------------


def test_keys_are_sorted_relative_paths_of_images_only(source):
    root, keys = find_images(source)
    assert root == source.absolute()
    assert keys == write_images(source.parent / "again")  # same names, sorted; .txt and hidden entries skipped
    assert all("/" in k and not k.startswith(".") for k in keys)


def test_a_list_of_files_is_keyed_relative_to_their_common_folder(vae, source, tmp_path):
    files = [source / "part1" / "img001.png", source / "part0" / "img000.jpg"]
    root, keys = find_images([str(f) for f in files])
    assert root == source.absolute() and keys == ["part0/img000.jpg", "part1/img001.png"]
    summary = encode_dataset(vae, files, tmp_path, progress=False)
    assert summary.total == 2 and list(LatentStore(tmp_path)) == keys


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda p: p / "missing", FileNotFoundError, "image folder not found"),
        (lambda p: p, ValueError, "no image files found"),
        (lambda p: [p / "missing.png"], FileNotFoundError, "image file not found"),
        (lambda p: [], ValueError, "no image files given"),
    ],
)
def test_find_images_errors(tmp_path, make, exc, match):
    with pytest.raises(exc, match=match):
        find_images(make(tmp_path))


def test_index_records_what_a_reader_needs(store, source):
    index = json.loads((store / INDEX_NAME).read_text())
    meta = index["metadata"]
    assert meta["model"] == "tiny" and meta["dtype"] == "float32" and meta["vae_dtype"] == "float32"
    assert meta["scaling_factor"] == 0.18215 and meta["shift_factor"] == 0.0 and meta["latent_channels"] == 4
    assert meta["vae_toolkit_version"] == vae_toolkit.__version__ and meta["size"] is None and meta["sample"] is False
    assert meta["format_version"] == 2 and meta["reader"] == "exact" and meta["source"] == str(source.absolute())
    assert meta["count"] == 10 and meta["total_size"] == sum(p.stat().st_size for p in store.glob("*.safetensors"))
    assert {s["file"] for s in index["shards"]} == {p.name for p in store.glob("*.safetensors")}
    for shard in index["shards"]:
        assert shard["bytes"] == (store / shard["file"]).stat().st_size
    table = store / index["table"]["file"]
    assert table.stat().st_size == index["table"]["bytes"] and list(store.glob("latents-table-*.bin")) == [table]
    assert "weight_map" not in index and "entries" not in index  # per-key data lives in the binary table
    s = LatentStore(store)
    assert list(s) == find_images(source)[1]
    for key in s:
        st = (source / key).stat()
        entry = s.entry(key)
        assert entry["source_bytes"] == st.st_size and entry["source_mtime_ns"] == st.st_mtime_ns
        assert len(entry["size"]) == 2
    assert index["failures"] == {}


def test_registered_model_records_its_repo(vae, source, tmp_path):
    encode_dataset(vae, source, tmp_path, model="sd15", progress=False)
    meta = LatentStore(tmp_path).metadata
    assert meta["model"] == "sd15" and meta["repo_id"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_shards_are_split_by_size_and_each_key_is_stored_once(vae, source, tmp_path):
    encode_dataset(vae, source, tmp_path, batch_size=2, max_shard_size=1, progress=False)
    keys = shard_keys(tmp_path)
    assert len(keys) == len(set(keys)) == 10
    assert len(list(tmp_path.glob("*.safetensors"))) == 10  # max_shard_size=1: one latent per shard


# --- resume ---------------------------------------------------------------------------------------


def test_second_run_encodes_nothing(vae, source, tmp_path):
    first = encode_dataset(vae, source, tmp_path, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = encode_dataset(vae, source, tmp_path, progress=False)
    assert (first.encoded, again.encoded, again.skipped, again.shards) == (10, 0, 10, 0)
    assert first.rank == again.rank == 0
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir() if p.name != INDEX_NAME}
    assert after == {k: v for k, v in before.items() if k != INDEX_NAME}


def test_changed_image_is_encoded_again_and_replaces_the_old_latent(vae, tmp_path):
    src = tmp_path / "src"
    keys = write_images(src, n=4)
    out = tmp_path / "out"
    encode_dataset(vae, src, out, max_shard_size=1, progress=False)
    changed = src / keys[1]
    Image.fromarray(np.full((16, 24, 3), 200, np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    summary = encode_dataset(vae, src, out, max_shard_size=1, progress=False)
    assert (summary.encoded, summary.skipped) == (1, 3)
    s = LatentStore(out)
    assert (s[keys[1]] - reference(vae, changed)).abs().max().item() <= 1e-5
    assert s.entry(keys[1])["source_mtime_ns"] == changed.stat().st_mtime_ns
    assert sorted(shard_keys(out)) == keys  # the shard holding only the old latent was removed


@pytest.mark.parametrize("keep_missing", [False, True])
def test_new_images_are_added_and_deleted_ones_removed_unless_kept(vae, tmp_path, keep_missing):
    src = tmp_path / "src"
    keys = write_images(src, n=4)
    out = tmp_path / "out"
    encode_dataset(vae, src, out, progress=False)
    Image.new("RGB", (16, 16), "red").save(src / "new.png")
    (src / keys[0]).unlink()
    summary = encode_dataset(vae, src, out, progress=False, keep_missing=keep_missing)
    assert (summary.total, summary.encoded, summary.skipped) == (4, 1, 3)
    assert summary.removed == (0 if keep_missing else 1)
    expected = keys + ["new.png"] if keep_missing else keys[1:] + ["new.png"]
    assert sorted(LatentStore(out)) == sorted(expected)
    if not keep_missing:
        assert "1 removed (source file gone)" in str(summary)


def test_a_list_of_files_never_removes_other_entries(vae, source, tmp_path):
    encode_dataset(vae, source, tmp_path, progress=False)
    files = [source / "part0" / "img000.jpg", source / "part1" / "img001.png"]
    summary = encode_dataset(vae, files, tmp_path, progress=False)
    assert summary.removed == 0 and len(LatentStore(tmp_path)) == 10


def test_leftover_temporary_files_are_removed(vae, source, tmp_path):
    (tmp_path / "latents-0123456789ab-r000-00000.safetensors.deadbeef.tmp").write_bytes(b"half a shard")
    (tmp_path / f"{INDEX_NAME}.0123abcd.tmp").write_bytes(b"half an index")
    (tmp_path / "keep.txt").write_text("not ours")
    encode_dataset(vae, source, tmp_path, progress=False)
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "keep.txt").read_text() == "not ours"


def test_a_corrupt_shard_is_ignored_and_its_images_encoded_again(vae, source, tmp_path, caplog):
    encode_dataset(vae, source, tmp_path, max_shard_size=1, progress=False)
    (tmp_path / INDEX_NAME).unlink()
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="vae_toolkit"):
        summary = encode_dataset(vae, source, tmp_path, max_shard_size=1, progress=False)
    assert summary.encoded == 1 and summary.skipped == 9
    warned = [r.getMessage() for r in caplog.records if victim.name in r.getMessage()]
    assert len(warned) == 1 and "moved it to" in warned[0] and f"{victim.name}.corrupt" in warned[0]
    assert (tmp_path / f"{victim.name}.corrupt").exists() and not victim.exists()
    assert len(LatentStore(tmp_path)) == 10
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vae_toolkit"):
        again = encode_dataset(vae, source, tmp_path, max_shard_size=1, progress=False)
    assert again.encoded == 0 and not caplog.records  # warned once, not on every later run


def test_the_index_is_rebuilt_from_the_shards(vae, source, tmp_path):
    encode_dataset(vae, source, tmp_path, progress=False)
    expected = json.loads((tmp_path / INDEX_NAME).read_text())
    (tmp_path / INDEX_NAME).write_text("{ truncated")
    summary = encode_dataset(vae, source, tmp_path, progress=False)
    assert summary.encoded == 0
    rebuilt = json.loads((tmp_path / INDEX_NAME).read_text())
    assert rebuilt["shards"] == expected["shards"] and rebuilt["metadata"]["count"] == 10
    with LatentStore(tmp_path) as s:
        assert list(s) == find_images(source)[1]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(size=16), "size: stored None, requested 16"),
        (dict(model="other"), "model: stored 'tiny', requested 'other'"),
        (dict(dtype=torch.float16), "dtype: stored 'float32', requested 'float16'"),
        (dict(sample=True), "sample: stored False, requested True"),
    ],
)
def test_a_store_with_other_settings_is_refused(vae, source, store, change, message):
    before = sorted(p.name for p in store.iterdir())
    kwargs = {"model": "tiny", **change}
    with pytest.raises(StoreMismatchError, match=message) as info:
        encode_dataset(vae, source, store, progress=False, **kwargs)
    assert "overwrite" in str(info.value) and isinstance(info.value, ValueError)
    assert sorted(p.name for p in store.iterdir()) == before


def test_overwrite_encodes_everything_again(vae, source, tmp_path):
    encode_dataset(vae, source, tmp_path, progress=False)
    (tmp_path / "keep.txt").write_text("not ours")
    summary = encode_dataset(vae, source, tmp_path, size=16, overwrite=True, progress=False)
    assert summary.encoded == 10 and LatentStore(tmp_path).metadata["size"] == 16
    assert (tmp_path / "keep.txt").exists()
    assert len(shard_keys(tmp_path)) == 10


def test_check_store(store, tmp_path):
    assert check_store(tmp_path / "none") is None
    assert check_store(store, model="tiny", size=None)["model"] == "tiny"
    with pytest.raises(StoreMismatchError, match="model: stored 'tiny', requested 'sd14'"):
        check_store(store, model="sd14")
    with pytest.raises(TypeError, match="unknown settings"):
        check_store(store, colour="red")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_store(tmp_path / "file")


# --- bad inputs -----------------------------------------------------------------------------------


def test_bad_images_are_skipped_recorded_and_the_rest_stored(vae, tmp_path, caplog):
    src = tmp_path / "src"
    keys = write_images(src, n=4)
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = src / keys[0]
    (src / "truncated.png").write_bytes(good.read_bytes()[:60])
    Image.new("RGB", (5, 40)).save(src / "tiny.png")  # narrower than 8 pixels
    with caplog.at_level(logging.WARNING, logger="vae_toolkit"):
        summary = encode_dataset(vae, src, tmp_path / "out", progress=False)
    bad = {"corrupt.png", "truncated.png", "tiny.png"}
    assert set(summary.failed) == bad and summary.encoded == 4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and all("\n" not in w for w in warned)
    assert {w.split(":")[0].removeprefix("skipped ") for w in warned} == bad
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert set(index["failures"]) == bad and "5x40" in index["failures"]["tiny.png"]
    assert sorted(LatentStore(tmp_path / "out")) == keys


def test_failed_images_are_tried_again_and_leave_the_failures_once_fixed(vae, tmp_path):
    src = tmp_path / "src"
    write_images(src, n=2)
    (src / "later.png").write_bytes(b"not yet")
    assert set(encode_dataset(vae, src, tmp_path / "out", progress=False).failed) == {"later.png"}
    Image.new("RGB", (16, 16), "blue").save(src / "later.png")
    summary = encode_dataset(vae, src, tmp_path / "out", progress=False)
    assert summary.encoded == 1 and not summary.failed
    assert json.loads((tmp_path / "out" / INDEX_NAME).read_text())["failures"] == {}


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(batch_size=2.0), TypeError, "batch_size must be an int"),
        (dict(size=12), ValueError, "size must be a multiple of 8"),
        (dict(size=4), ValueError, "size must be >= 8"),
        (dict(workers=0), ValueError, "workers must be >= 1"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
        (dict(dtype=torch.int8), ValueError, "dtype must be one of float32"),
        (dict(max_shard_size=0), ValueError, "max_shard_size must be >= 1"),
    ],
)
def test_bad_arguments(vae, source, tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        encode_dataset(vae, source, tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())


def test_output_that_is_a_file_is_refused(vae, source, tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        encode_dataset(vae, source, tmp_path / "out", progress=False)


# --- out of memory --------------------------------------------------------------------------------


def _oom_above(vae, monkeypatch, limit: int, calls: list[int]):
    real = vae.encode

    def encode(x, *args, **kwargs):
        calls.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for a batch of {x.shape[0]}")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", encode)


def test_out_of_memory_halves_the_batch_and_keeps_the_values(source, tmp_path, monkeypatch, caplog):
    vae, calls = make_tiny_vae(), []
    _oom_above(vae, monkeypatch, 1, calls)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(9):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="vae_toolkit"):
        summary = encode_dataset(vae, src, tmp_path / "out", batch_size=8, progress=False)
    assert summary.encoded == 9 and not summary.failed
    assert calls[:4] == [8, 4, 2, 1]  # halved down to 1, then kept at 1 for this size
    assert set(calls[4:]) == {1}
    messages = [r.getMessage() for r in caplog.records]
    assert "out of memory encoding a batch of 8 images of 16x16; retrying with batches of 4" in messages
    assert "out of memory encoding a batch of 2 images of 16x16; retrying with batches of 1" in messages
    monkeypatch.undo()
    s = LatentStore(tmp_path / "out")
    for key in s:
        assert (s[key] - reference(vae, src / key)).abs().max().item() <= 1e-5


def test_out_of_memory_on_a_single_image_is_a_failure(source, tmp_path, monkeypatch):
    vae, calls = make_tiny_vae(), []
    _oom_above(vae, monkeypatch, 0, calls)
    summary = encode_dataset(vae, source, tmp_path, batch_size=2, progress=False)
    assert summary.encoded == 0 and len(summary.failed) == 10
    assert all("out of memory" in reason and "--size" in reason for reason in summary.failed.values())


def test_an_interrupted_run_keeps_what_it_encoded(vae, source, tmp_path, monkeypatch):
    real, calls = vae.encode, []

    def encode(x, *args, **kwargs):
        calls.append(x.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(x, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", encode)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset(vae, source, tmp_path, batch_size=2, progress=False)
    assert not _helper_threads()  # the reading threads stopped with the run
    kept = shard_keys(tmp_path)
    assert len(kept) == sum(calls[:2]) > 0  # the two batches before Ctrl-C were written
    monkeypatch.undo()
    summary = encode_dataset(vae, source, tmp_path, batch_size=2, progress=False)
    assert (summary.encoded, summary.skipped) == (10 - len(kept), len(kept))


# --- feeding the model ------------------------------------------------------------------------------


def _helper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("vae_toolkit_batches", "vae_toolkit_read"))]


def test_batches_are_stacked_off_the_models_thread(vae, source, tmp_path, monkeypatch):
    """The model's thread only encodes: each batch arrives stacked by the helper (a GPU is not left idle)."""
    stacked: dict[int, str] = {}  # data_ptr of each stacked batch -> the thread that stacked it
    real_stack, real_encode = batching._stack, vae.encode
    seen: list[tuple[str, int]] = []

    def stack(images):
        out = real_stack(images)
        stacked[out.data_ptr()] = threading.current_thread().name
        return out

    def encode(x, *args, **kwargs):
        seen.append((threading.current_thread().name, x.data_ptr()))
        return real_encode(x, *args, **kwargs)

    monkeypatch.setattr(batching, "_stack", stack)
    monkeypatch.setattr(vae, "encode", encode)
    summary = encode_dataset(vae, source, tmp_path, batch_size=2, progress=False)
    assert summary.encoded == 10 and len(seen) >= 5
    main = threading.current_thread().name
    for thread, ptr in seen:
        assert thread == main
        assert stacked.get(ptr, "").startswith("vae_toolkit_batches")  # the model got the helper's tensor itself
    assert not _helper_threads()


def _batch(keys, value=0.0, shape=(3, 4, 5)):
    return [(k, (i, i), torch.full(shape, value + i)) for i, k in enumerate(keys)]


def test_assembled_keeps_order_stacks_once_and_passes_failures_through():
    err = ValueError("bad file")
    source = [_batch(["a", "b"]), ("c", err), _batch(["d"], 10.0, (3, 2, 2)), _batch(["e", "f", "g"], 20.0)]
    out = list(batching.stacked_batches(iter(source)))
    assert len(out) == 4
    assert out[1] == ("c", err)
    for got, want in zip([out[0], out[2], out[3]], [source[0], source[2], source[3]], strict=True):
        items, x = got
        assert [i.key for i in items] == [k for k, _, _ in want]
        assert [i.stat for i in items] == [s for _, s, _ in want]
        assert torch.equal(x, torch.stack([t for _, _, t in want]))
        for i, item in enumerate(items):  # views into the batch: its memory is held once
            assert item.image.data_ptr() == x[i].data_ptr()
    assert not _helper_threads()


def test_an_error_of_the_reader_is_raised_in_the_models_thread():
    def batches():
        yield _batch(["a"])
        raise RuntimeError("disk gone")

    got = batching.stacked_batches(batches())
    items, _ = next(got)
    assert items[0].key == "a"
    with pytest.raises(RuntimeError, match="disk gone"):
        next(got)
    assert not _helper_threads()


def test_leaving_early_stops_the_helper_and_closes_the_reader():
    closed = threading.Event()

    def batches():
        try:
            for i in range(1000):
                yield _batch([f"k{i}"])
        finally:
            closed.set()

    got = batching.stacked_batches(batches())
    next(got)
    got.close()
    assert closed.is_set()
    assert not _helper_threads()


def test_the_helper_stays_one_batch_ahead():
    """Memory stays bounded: while the model works on a batch, the helper holds one more and waits with a third."""
    pulled = []

    def batches():
        for i in range(1000):
            pulled.append(i)
            yield _batch([f"k{i}"])

    got = batching.stacked_batches(batches())
    next(got)
    deadline = time.monotonic() + 5
    while len(pulled) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # time enough to run ahead, were it not bounded
    assert len(pulled) == 3  # the one given out, the one queued, the one waiting to be queued
    got.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_stack_equals_torch_stack(dtype):
    images = [torch.randn(3, 5, 7).to(dtype) for _ in range(4)]
    out = batching._stack(images)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, torch.stack(images))


# --- reading back ---------------------------------------------------------------------------------


def test_store_is_a_read_only_mapping(store, source):
    s = LatentStore(store)
    keys = find_images(source)[1]
    assert len(s) == 10 and list(s) == keys and list(s.keys()) == keys
    assert keys[0] in s and "nope.png" not in s and 0 not in s
    assert s.get("nope.png") is None
    assert isinstance(s[keys[0]], torch.Tensor)
    with pytest.raises(KeyError, match=r"'nope.png' is not in the latent store .* \(10 latents\)"):
        s["nope.png"]
    with pytest.raises(TypeError):
        s["x"] = torch.zeros(1)  # type: ignore[index]
    with pytest.raises(TypeError, match="keys are str"):
        s[1.5]  # type: ignore[index]
    assert "10 latents" in repr(s) and "tiny" in repr(s)


def test_store_is_a_dataset(store):
    s = LatentStore(store)
    assert isinstance(s, torch.utils.data.Dataset)
    assert torch.equal(s[0], s[s.key(0)]) and torch.equal(s[-1], s[s.key(9)])
    with pytest.raises(IndexError, match="index 10 out of range for a store of 10 latents"):
        s[10]
    same_size = [i for i in range(len(s)) if s[i].shape == s[0].shape]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(s, same_size), batch_size=2)
    batch = next(iter(loader))
    assert batch.shape == (2, *s[0].shape)


def test_store_pickles_for_dataloader_workers(store):
    s = LatentStore(store)
    first = s[0]  # opens a shard handle, which cannot be pickled
    clone = pickle.loads(pickle.dumps(s))
    assert torch.equal(clone[0], first) and len(clone) == len(s)


def test_opening_parses_no_shard_and_a_read_opens_only_its_shard(store, monkeypatch):
    import safetensors

    parsed, opened = [], []
    real_safe_open, real_open = safetensors.safe_open, os.open
    monkeypatch.setattr(
        safetensors, "safe_open", lambda path, *a, **k: parsed.append(path) or real_safe_open(path, *a, **k)
    )

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    s = LatentStore(store)
    assert opened == [] and len(s) == 10
    s[s.key(0)]
    s[s.key(0)]
    monkeypatch.undo()
    shards = {p.name for p in store.glob("*.safetensors")}
    assert len(opened) == 1 and opened[0] in shards and parsed == []  # read at its offset, no header parsed
    s.close()


def test_missing_store_errors(vae, source, tmp_path):
    with pytest.raises(FileNotFoundError, match="no latent store at"):
        LatentStore(tmp_path)
    encode_dataset(vae, source, tmp_path, progress=False)
    (tmp_path / INDEX_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="did not finish; run the same encode command again"):
        LatentStore(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{}")
    with pytest.raises(ValueError, match="not a vae-toolkit latent index"):
        LatentStore(tmp_path)


def test_entry_and_failures(store, source):
    s = LatentStore(store)
    entry = s.entry(s.key(0))
    assert entry["source_bytes"] == (source / s.key(0)).stat().st_size
    entry["size"] = None
    assert s.entry(s.key(0))["size"] is not None  # a copy
    assert s.failures == {}
    with pytest.raises(KeyError):
        s.entry("nope.png")


# --- the process group ----------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda:1", "nccl")])
def test_process_group_backend_follows_the_vae_device(monkeypatch, device, backend):
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs["backend"])))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy", None)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    group = ProcessGroup.from_env(torch.device(device))
    assert (group.rank, group.world_size, group.owns_group) == (1, 2, True)
    group.close()
    expected = [("set_device", device)] if backend == "nccl" else []
    assert calls == expected + [("init", backend), ("destroy", None)]


def test_no_process_group_for_one_process(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: pytest.fail("initialised"))
    group = ProcessGroup.from_env(torch.device("cpu"))
    assert (group.rank, group.world_size, group.owns_group) == (0, 1, False)
    group.close()
