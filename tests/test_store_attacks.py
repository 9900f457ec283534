"""The store under attack: damaged tables, indexes and shards, replaced model weights, and the repairs that the
messages advise, each run as advised (``python -m vae_toolkit encode ...`` through ``main``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import torch
from conftest import REVISION, make_tiny_vae
from PIL import Image
from test_dataset import reference, write_images

from vae_toolkit import __main__ as cli
from vae_toolkit import store_files
from vae_toolkit.dataset import (
    INDEX_NAME,
    LatentStore,
    StoreDamagedError,
    StoreMismatchError,
    encode_dataset,
    find_images,
)
from vae_toolkit.vae_loader import VAELoader


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()  # the weights of the offline sd14 in conftest's hub cache


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    write_images(folder, n=6)
    return folder


def encode(capsys, src, out, *extra, model="sd14"):
    code = cli.main(["encode", str(src), "-o", str(out), "--model", str(model), "--device", "cpu", "--no-progress",
                     *extra])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def assert_serves_the_right_latents(out, src, vae):
    with LatentStore(out) as store:
        assert list(store) == find_images(src)[1]
        for key in store:
            assert (store[key] - reference(vae, src / key)).abs().max().item() <= 1e-5, key


def read_index(out):
    return json.loads((out / INDEX_NAME).read_text())


def table_column_position(table, column, row):
    """The byte position of ``column``'s value for ``row`` in a table file."""
    data = table.read_bytes()
    room = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16 : 16 + room])
    dtype, shape, offset = header["columns"][column]
    itemsize = int(dtype[-1])
    width = shape[1] if len(shape) > 1 else 1
    return offset + row * itemsize * width


# --- 7. a damaged table never serves another image's latent --------------------------------------------------


@pytest.mark.parametrize("damage", ["another row's offset", "a flipped key bit"])
def test_a_damaged_table_is_refused_at_open_and_repaired_by_the_advised_command(hf_home, capsys, vae, src, tmp_path,
                                                                                damage):  # fmt: skip
    out = tmp_path / "out"
    assert encode(capsys, src, out)[0] == 0
    table = out / read_index(out)["table"]["file"]
    data = bytearray(table.read_bytes())
    if damage == "another row's offset":  # same length, and a value that points at another image's latent
        at, other = table_column_position(table, "offset", 1), table_column_position(table, "offset", 4)
        data[at : at + 8] = data[other : other + 8]
    else:
        at = table_column_position(table, "key_blob", 0) + 3
        data[at] ^= 0x01
    table.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError, match="does not match its checksum.*run the same encode command again"):
        LatentStore(out)
    code, stdout, stderr = encode(capsys, src, out)
    assert code == 0 and "0 encoded, 6 already stored" in stdout, stderr
    assert_serves_the_right_latents(out, src, vae)


def test_a_latent_outside_its_shard_is_never_read(hf_home, capsys, vae, src, tmp_path, monkeypatch):
    """Even with a table and index that agree (written by the store's own writer), a row whose bytes do not lie
    inside its shard's tensor data is refused at open, and, as a last guard, at read time; the advised rerun
    rebuilds the table from the shards."""
    from vae_toolkit import _table

    out = tmp_path / "out"
    assert encode(capsys, src, out)[0] == 0
    index = read_index(out)
    table = _table.Table(out / index["table"]["file"])
    keys = [table.key_bytes(i) for i in range(table.count)]
    columns = {name: table.column(name).copy() for name in _table.COLUMNS}
    table.close()
    columns["offset"][2] = 3  # inside the shard's header
    rows = _table.Rows.from_keys(keys, columns)
    size, sha = store_files.atomic_write(out / index["table"]["file"], lambda f: _table.write_table(f, rows))
    index["table"].update(bytes=size, sha256=sha)
    store_files.write_index(out, index)
    with pytest.raises(StoreDamagedError, match="point outside the tensor data.*run the same encode command again"):
        LatentStore(out)
    with monkeypatch.context() as m:
        m.setattr("vae_toolkit.store.table_problem", lambda index, table: None)  # past the check at open
        with LatentStore(out) as store:
            with pytest.raises(StoreDamagedError, match="lies outside the tensor data of its shard.*encode command"):
                store[2]
            store[1]  # the others are served
    code, stdout, stderr = encode(capsys, src, out)  # as advised
    assert code == 0 and "0 encoded, 6 already stored" in stdout, stderr
    assert_serves_the_right_latents(out, src, vae)


def test_a_damaged_shard_data_is_found_by_encode_verify(hf_home, capsys, vae, src, tmp_path):
    out = tmp_path / "out"
    assert encode(capsys, src, out, "--shard-size", "0.000001")[0] == 0  # one latent per shard
    victim = out / read_index(out)["shards"][2]["file"]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes; the header is intact
    victim.write_bytes(bytes(data))
    code, stdout, _ = encode(capsys, src, out, "--shard-size", "0.000001")
    assert code == 0 and "0 encoded" in stdout  # a plain rerun checks headers and sizes, not every byte
    code, stdout, stderr = encode(capsys, src, out, "--shard-size", "0.000001", "--verify")
    assert code == 0 and "1 encoded, 5 already stored" in stdout and "5 shard(s) verified" in stdout, stderr
    assert f"{victim.name} is damaged (its data does not match its SHA-256" in stderr
    assert (out / f"{victim.name}.corrupt").exists()
    assert_serves_the_right_latents(out, src, vae)


# --- 8. every advised repair repairs -----------------------------------------------------------------------


@pytest.mark.parametrize("checksum", [True, False], ids=["index with checksum", "index without checksum"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_edited_count_is_repaired_by_the_advised_command(hf_home, capsys, vae, src, tmp_path, checksum, overwrite):
    out = tmp_path / "out"
    assert encode(capsys, src, out)[0] == 0
    index = read_index(out)
    index["metadata"]["count"] = 5
    if not checksum:  # as a store written before the index had one
        del index["index_sha256"]
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises((StoreDamagedError, ValueError), match="run the same encode command again"):
        LatentStore(out)
    code, stdout, stderr = encode(capsys, src, out, *(["--overwrite"] if overwrite else []))
    assert code == 0, stderr
    assert_serves_the_right_latents(out, src, vae)


def test_an_edited_shard_byte_count_is_repaired_without_encoding_again(hf_home, capsys, vae, src, tmp_path):
    out = tmp_path / "out"
    assert encode(capsys, src, out, "--shard-size", "0.000001")[0] == 0
    index = read_index(out)
    index["shards"][1]["bytes"] += 1  # the shard itself is intact
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="run the same encode command again"):
        LatentStore(out)
    code, stdout, stderr = encode(capsys, src, out, "--shard-size", "0.000001")
    assert code == 0 and "0 encoded, 6 already stored" in stdout, stderr
    assert not list(out.glob("*.corrupt"))
    assert_serves_the_right_latents(out, src, vae)


def test_a_deleted_shard_is_repaired_by_the_advised_command(hf_home, capsys, vae, src, tmp_path):
    out = tmp_path / "out"
    assert encode(capsys, src, out, "--shard-size", "0.000001")[0] == 0
    store = LatentStore(out)
    (out / read_index(out)["shards"][3]["file"]).unlink()
    with pytest.raises(StoreDamagedError, match="is missing.*run the same encode command again") as info:
        for key in store:
            store[key]
    assert "open it again" not in str(info.value)
    store.close()
    code, stdout, stderr = encode(capsys, src, out, "--shard-size", "0.000001")
    assert code == 0 and "1 encoded, 5 already stored" in stdout, stderr
    assert_serves_the_right_latents(out, src, vae)


def test_a_store_replaced_by_a_later_run_is_served_again_by_opening_it_again(vae, tmp_path):
    src = tmp_path / "src"
    keys = write_images(src, n=4)
    out = tmp_path / "out"
    encode_dataset(vae, src, out, max_shard_size=1, progress=False)
    old = LatentStore(out)
    Image.new("RGB", (16, 16), "green").save(src / keys[0])
    os.utime(src / keys[0], ns=(0, (src / keys[0]).stat().st_mtime_ns + 10**9))
    encode_dataset(vae, src, out, max_shard_size=1, progress=False)
    with pytest.raises(StoreDamagedError, match="open it again with LatentStore"):
        old[keys[0]]
    old.close()
    with LatentStore(out) as again:  # as advised
        assert (again[keys[0]] - reference(vae, src / keys[0])).abs().max().item() <= 1e-5


# --- 6. a store never mixes the latents of two models ----------------------------------------------------------


def save_vae(folder, seed):
    torch.manual_seed(seed)
    from conftest import TINY_VAE_KWARGS
    from diffusers import AutoencoderKL

    AutoencoderKL(**TINY_VAE_KWARGS).eval().save_pretrained(folder, safe_serialization=True)


def test_the_store_records_what_identifies_the_weights(hf_home, capsys, src, tmp_path):
    folder = tmp_path / "vae"
    save_vae(folder, 0)
    assert encode(capsys, src, tmp_path / "local", model=folder)[0] == 0
    weights = LatentStore(tmp_path / "local").metadata["weights"]
    expected = {}
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        data = (folder / name).read_bytes()
        expected[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert weights == {"files": expected}
    assert encode(capsys, src, tmp_path / "hub")[0] == 0
    assert LatentStore(tmp_path / "hub").metadata["weights"] == {
        "repo_id": "CompVis/stable-diffusion-v1-4",
        "revision": REVISION,
    }


def test_a_rerun_after_the_weights_changed_is_refused_and_overwrite_replaces(hf_home, capsys, src, tmp_path):
    folder = tmp_path / "vae"
    save_vae(folder, 0)
    out = tmp_path / "out"
    assert encode(capsys, src, out, model=folder)[0] == 0
    save_vae(folder, 1)  # other weights in the same folder
    Image.new("RGB", (16, 16), "red").save(src / "new.png")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stdout, stderr = encode(capsys, src, out, model=folder)
    assert code == 2 and "model weights: stored" in stderr and "--overwrite" in stderr, stderr
    with pytest.raises(StoreMismatchError, match="model weights: stored"):
        encode_dataset(lambda: VAELoader().load_sd_vae(str(folder), "cpu")[0], src, out, model=str(folder.resolve()),
                       progress=False)  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing added
    code, stdout, stderr = encode(capsys, src, out, "--overwrite", model=folder)
    assert code == 0 and "7 encoded" in stdout, stderr
    assert_serves_the_right_latents(out, src, VAELoader().load_sd_vae(str(folder), "cpu", use_cache=False)[0])


def test_a_store_that_records_no_weights_is_resumed_with_a_warning(hf_home, capsys, vae, src, tmp_path):
    out = tmp_path / "out"
    assert encode(capsys, src, out)[0] == 0
    index = read_index(out)
    del index["metadata"]["weights"]  # as written before the store recorded them
    store_files.write_index(out, index)
    Image.new("RGB", (16, 16), "red").save(src / "new.png")
    code, stdout, stderr = encode(capsys, src, out)
    assert code == 0 and "1 encoded, 6 already stored" in stdout, stderr
    assert stderr.count("records no model weights") == 1
    assert LatentStore(out).metadata["weights"]["revision"] == REVISION
    assert_serves_the_right_latents(out, src, vae)


# --- what the command prints -------------------------------------------------------------------------------


def test_a_rebuild_is_reported_once(hf_home, capsys, src, tmp_path, caplog):
    out = tmp_path / "out"
    assert encode(capsys, src, out)[0] == 0
    (out / read_index(out)["table"]["file"]).unlink()
    with caplog.at_level(logging.WARNING):
        code, stdout, stderr = encode(capsys, src, out)
    assert code == 0
    assert (stderr + "".join(r.getMessage() for r in caplog.records)).count("rebuilt from the shards") == 1, stderr


def test_a_run_with_nothing_to_encode_prints_no_rate(hf_home, capsys, src, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = encode(capsys, src, out)
    assert code == 0 and "images/s" in stdout
    code, stdout, _ = encode(capsys, src, out)
    assert code == 0 and "0 encoded" in stdout and "images/s" not in stdout
