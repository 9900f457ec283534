"""Tar shards and Parquet files as the source of ``encode_dataset``: keys, equality with a folder, resume per
shard, bad input, and a bounded memory while a tar is read."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image
from test_dataset import shard_keys, write_images

from vae_toolkit import archives
from vae_toolkit.dataset import INDEX_NAME, LatentStore, encode_dataset

TOL = 1e-5
N = 10


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root, n=N)
    return root


def folder_keys(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_tar(path: Path, folder: Path, keys: list[str], extra: bool = True) -> None:
    """webdataset's layout: each image member with a .txt and a .json of the same sample beside it."""
    with tarfile.open(path, "w") as tar:
        for key in keys:
            tar.add(folder / key, arcname=key)
            if extra:
                for ext, data in ((".txt", b"a caption"), (".json", b'{"w": 1}')):
                    info = tarfile.TarInfo(key.rsplit(".", 1)[0] + ext)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def shards_of(folder: Path, out: Path, n: int = 2) -> dict[str, str]:
    """Write ``n`` tar shards of the folder's images into ``out``; tar key -> folder key."""
    out.mkdir(parents=True, exist_ok=True)
    keys = folder_keys(folder)
    mapping = {}
    for s in range(n):
        part = keys[s::n]
        write_tar(out / f"{s:05d}.tar", folder, part)
        mapping.update({f"{s:05d}.tar/{k}": k for k in part})
    return mapping


def encode(vae, source, out, **kwargs):
    return encode_dataset(vae, source, out, batch_size=3, progress=False, workers=2, **kwargs)


def assert_same(store_dir: Path, reference_dir: Path, mapping: dict[str, str], flipped: bool = False) -> None:
    with LatentStore(store_dir) as got, LatentStore(reference_dir) as ref:
        assert sorted(got) == sorted(mapping)
        for key, ref_key in mapping.items():
            assert (got[key] - ref[ref_key]).abs().max().item() <= TOL, key
            if flipped:
                assert (got.get(key, flipped=True) - ref.get(ref_key, flipped=True)).abs().max().item() <= TOL
            assert got.entry(key)["original_size"] == ref.entry(ref_key)["original_size"]


@pytest.mark.parametrize("options", [{}, {"buckets": 24, "bucket_step": 8, "flip": True}], ids=["plain", "buckets"])
def test_tar_store_equals_folder_store_key_by_key(vae, folder, tmp_path, options):
    mapping = shards_of(folder, tmp_path / "shards")
    encode(vae, folder, tmp_path / "ref", **options)
    summary = encode(vae, tmp_path / "shards", tmp_path / "tar", **options)
    assert (summary.total, summary.encoded, summary.failed) == (N, N, {})
    assert_same(tmp_path / "tar", tmp_path / "ref", mapping, flipped=bool(options))
    # the same shards as a brace pattern, a list, and one file: the same keys
    brace = encode(vae, str(tmp_path / "shards" / "{00000..00001}.tar"), tmp_path / "brace", **options)
    assert brace.encoded == N
    assert_same(tmp_path / "brace", tmp_path / "ref", mapping, flipped=bool(options))
    listed = encode(vae, sorted((tmp_path / "shards").glob("*.tar")), tmp_path / "list", **options)
    assert listed.encoded == N
    one = encode(vae, tmp_path / "shards" / "00001.tar", tmp_path / "one", **options)
    with LatentStore(tmp_path / "one") as s:
        assert list(s) == sorted(k for k in mapping if k.startswith("00001.tar/")) and one.encoded == len(s)


def test_brace_expansion():
    assert archives.expand_braces("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert archives.expand_braces("{x,y}-{1..2}.tar") == ["x-1.tar", "x-2.tar", "y-1.tar", "y-2.tar"]
    with pytest.raises(archives.ArchiveError, match="neither a range"):
        archives.expand_braces("a/{0-3}.tar")


def write_parquet(path: Path, folder: Path, keys: list[str], struct: bool, column: str = "image") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [(folder / k).read_bytes() for k in keys]
    structs = [{"bytes": d, "path": k} for d, k in zip(data, keys, strict=True)]
    images = pa.array(structs) if struct else pa.array(data, pa.binary())
    pq.write_table(pa.table({column: images, "name": [k.replace("/", "_") for k in keys]}), path, row_group_size=3)


@pytest.mark.parametrize("struct", [False, True], ids=["bytes", "struct"])
def test_parquet_store_equals_folder_store_key_by_key(vae, folder, tmp_path, struct):
    pytest.importorskip("pyarrow")
    keys = folder_keys(folder)
    write_parquet(tmp_path / "train.parquet", folder, keys, struct, column="jpg")
    encode(vae, folder, tmp_path / "ref")
    summary = encode(vae, tmp_path / "train.parquet", tmp_path / "rows", image_column="jpg")
    assert summary.encoded == N and not summary.failed
    assert_same(tmp_path / "rows", tmp_path / "ref", {f"train.parquet/{i}": k for i, k in enumerate(keys)})
    named = encode(vae, tmp_path / "train.parquet", tmp_path / "named", image_column="jpg", key_column="name")
    assert named.encoded == N
    assert_same(tmp_path / "named", tmp_path / "ref", {f"train.parquet/{k.replace('/', '_')}": k for k in keys})
    again = encode(vae, tmp_path / "train.parquet", tmp_path / "named", image_column="jpg", key_column="name")
    assert (again.encoded, again.skipped, again.total) == (0, N, N)


def test_parquet_column_holding_something_else_names_file_and_column(vae, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [1, 2, 3]}), tmp_path / "bad.parquet")
    summary = encode(vae, tmp_path / "bad.parquet", tmp_path / "out")
    assert summary.encoded == 0
    message = summary.failed["bad.parquet"]
    assert "bad.parquet" in message and "column 'image' holds int64" in message and "--image-column" in message
    missing = encode(vae, tmp_path / "bad.parquet", tmp_path / "out", image_column="jpg")
    assert "has no column 'jpg' (its columns: image)" in missing.failed["bad.parquet"]


def test_parquet_without_pyarrow_names_the_extra_and_tar_still_works(vae, folder, tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    shards_of(folder, tmp_path / "shards")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    hint = r'^reading \.parquet files needs pyarrow: pip install "vae-toolkit\[parquet\]"$'
    with pytest.raises(ImportError, match=hint):
        encode(vae, tmp_path / "a.parquet", tmp_path / "out")
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    assert encode(vae, tmp_path / "shards", tmp_path / "tar").encoded == N


def test_the_parquet_extra_installs_pyarrow():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'parquet = ["pyarrow>=14"]' in text
    test_extra = next(line for line in text.split("\ntest = ")[1].split("]")[:1])
    assert '"pyarrow>=14"' in test_extra


def count_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = archives._open_shard

    def counting(path):
        opened.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(archives, "_open_shard", counting)
    return opened


def test_shard_level_resume_changed_and_removed_shards(vae, folder, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    mapping = shards_of(folder, shards, n=3)
    out = tmp_path / "out"
    opened = count_opens(monkeypatch)
    first = encode(vae, shards, out)
    assert first.encoded == N and sorted(opened) == ["00000.tar", "00001.tar", "00002.tar"]
    opened.clear()
    again = encode(vae, shards, out)
    assert (again.encoded, again.skipped, again.total, opened) == (0, N, N, [])  # no shard opened
    # a changed shard is read again and its entries replaced (a sample gone from it goes too)
    keys1 = [k for k, v in mapping.items() if k.startswith("00001.tar/")]
    new = tmp_path / "new"
    new.mkdir()
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(new / "x.png")
    write_tar(shards / "00001.tar", new, ["x.png"])
    os.utime(shards / "00001.tar", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = encode(vae, shards, out)
    assert opened == ["00001.tar"] and changed.encoded == 1
    with LatentStore(out) as s:
        assert "00001.tar/x.png" in s and not any(k in s for k in keys1)
        with torch.no_grad():
            from vae_toolkit import latents
            from vae_toolkit.buckets import prepare_image

            expected = latents.encode(vae, prepare_image(new / "x.png").image[None])[0]
        assert (s["00001.tar/x.png"] - expected).abs().max().item() <= TOL
    # a shard removed from the folder: its entries go, unless keep_missing
    (shards / "00002.tar").rename(tmp_path / "00002.tar")
    opened.clear()
    kept = encode(vae, shards, out, keep_missing=True)
    assert kept.removed == 0 and opened == []
    with LatentStore(out) as s:
        assert any(k.startswith("00002.tar/") for k in s)
    removed = encode(vae, shards, out)
    assert removed.removed == len([k for k in mapping if k.startswith("00002.tar/")]) and opened == []
    with LatentStore(out) as s:
        assert not any(k.startswith("00002.tar/") for k in s) and any(k.startswith("00000.tar/") for k in s)


def test_truncated_tar_keeps_the_members_before_and_loses_nothing_stored(vae, folder, tmp_path):
    shards = tmp_path / "shards"
    shards_of(folder, shards)
    out = tmp_path / "out"
    encode(vae, shards / "00000.tar", out)
    data = (shards / "00001.tar").read_bytes()
    with tarfile.open(shards / "00001.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith((".png", ".jpg"))]
    cut = members[2].offset_data + members[2].size // 2  # in the middle of the third image's data
    (shards / "00001.tar").write_bytes(data[:cut])
    summary = encode(vae, shards, out)
    reason = summary.failed["00001.tar"]
    assert "00001.tar" in reason and "ends in the middle of a member" in reason
    assert f"after its member 00001.tar/{members[1].name}" in reason
    with LatentStore(out) as s:
        assert f"00001.tar/{members[0].name}" in s and f"00001.tar/{members[1].name}" in s
        assert f"00001.tar/{members[2].name}" not in s
        assert len([k for k in s if k.startswith("00000.tar/")]) == 5  # nothing stored before is lost
    index = json.loads((out / INDEX_NAME).read_text())
    assert "00001.tar" not in index["archives"] and "00000.tar" in index["archives"]


def test_corrupt_member_and_member_over_the_pixel_limit_fail_alone(vae, folder, tmp_path, monkeypatch):
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(big / "huge.png")
    (big / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    keys = folder_keys(folder)
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key in keys[:3]:
            tar.add(folder / key, arcname=key)
        tar.add(big / "huge.png", arcname="huge.png")
        tar.add(big / "bad.jpg", arcname="bad.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 2 x 1000: refused; 32x24 passes
    summary = encode(vae, tmp_path / "s.tar", tmp_path / "out")
    assert summary.encoded == 3 and set(summary.failed) == {"s.tar/huge.png", "s.tar/bad.jpg"}
    assert "s.tar/huge.png" in summary.failed["s.tar/huge.png"]
    assert "decompression bomb" in summary.failed["s.tar/huge.png"].lower()
    assert summary.failed["s.tar/bad.jpg"].startswith("Failed to load image s.tar/bad.jpg")
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert set(index["failures"]) == {"s.tar/huge.png", "s.tar/bad.jpg"}


def test_brace_pattern_matching_nothing_and_partly_missing(vae, folder, tmp_path, hf_home):
    shards_of(folder, tmp_path / "shards")
    with pytest.raises(archives.ArchiveError, match=r"brace pattern .*\{00010\.\.00019\}\.tar matches no file"):
        encode(vae, str(tmp_path / "shards" / "{00010..00019}.tar"), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 files do not exist \(first: .*00002\.tar\)"):
        encode(vae, str(tmp_path / "shards" / "{00000..00002}.tar"), tmp_path / "out")
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    env = {**os.environ, "HF_HOME": str(hf_home), "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "vae_toolkit", "encode", str(tmp_path / "shards" / "{00010..00011}.tar"), "-o",
           str(tmp_path / "cli"), "--model", "sd14", "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "matches no file" in proc.stderr, proc.stderr


def test_cli_encodes_a_tar_source(folder, tmp_path, hf_home):
    shards_of(folder, tmp_path / "shards")
    env = {**os.environ, "HF_HOME": str(hf_home), "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "vae_toolkit", "encode", str(tmp_path / "shards" / "{00000..00001}.tar"), "-o",
           str(tmp_path / "cli"), "--model", "sd14", "--device", "cpu", "--no-progress", "--size", "16"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{N} images: {N} encoded" in proc.stdout
    with LatentStore(tmp_path / "cli") as s:
        assert len(s) == N and all(k.startswith(("00000.tar/", "00001.tar/")) for k in s)


def test_a_tar_is_read_one_member_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    member = 1 << 20
    with tarfile.open(tmp_path / "big.tar", "w") as tar:
        for i in range(24):
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size = member
            tar.addfile(info, io.BytesIO(rng.bytes(member)))
    log = archives.ReadLog()
    tracemalloc.start()
    try:
        total = 0
        for _key, _stat, data in archives.iter_members(tmp_path / "big.tar", "big.tar", log=log):
            assert isinstance(data, bytes)
            total += len(data)
            del data
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 24 * member and log.complete["big.tar"][2] == 24
    assert peak < 4 * member, f"peak {peak / 2**20:.1f} MB while reading a 24 MB tar"


DRIVER = """
import json, sys, time
sys.path.insert(0, {tests!r})
from conftest import make_tiny_vae
from vae_toolkit.dataset import encode_dataset
vae = make_tiny_vae()
if sys.argv[3] == "slow":
    real = vae.encode
    def slow(x, *a, **k):
        time.sleep(0.15)
        return real(x, *a, **k)
    vae.encode = slow
s = encode_dataset(vae, sys.argv[1], sys.argv[2], batch_size=1, max_shard_size=1, workers=2, progress=False)
print(json.dumps({{"encoded": s.encoded, "skipped": s.skipped, "failed": s.failed}}))
"""


def test_sigkill_in_the_middle_of_a_tar_then_the_rerun_completes_nothing_twice(folder, tmp_path):
    shards = tmp_path / "shards"
    mapping = shards_of(folder, shards, n=1)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(driver), str(shards), str(out), "slow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and len(list(out.glob("*.safetensors"))) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stored = len(shard_keys(out))
    assert 3 <= stored < N and not (out / INDEX_NAME).exists()
    rerun = subprocess.run([sys.executable, str(driver), str(shards), str(out), "fast"], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["encoded"] == N - stored and result["skipped"] == stored and not result["failed"]
    assert sorted(shard_keys(out)) == sorted(mapping)  # every member exactly once
    with LatentStore(out) as s:
        assert sorted(s) == sorted(mapping)
