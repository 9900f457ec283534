"""Sources under attack: a stray archive beside images, member names that walk out, duplicates, cut tars,
img2dataset's layouts, gzip shards and Parquet's memory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_vae
from PIL import Image
from test_archives import encode, folder_keys, shards_of, write_tar
from test_dataset import write_images

from vae_toolkit import archives
from vae_toolkit.dataset import INDEX_NAME, LatentStore

N = 6
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root, n=N)
    return root


def png_bytes(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def run_cli(*args: str, hf_home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vae_toolkit", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


# 1. A stray archive never turns a folder of images into an archive source ------------------------------------


@pytest.mark.parametrize("stray", ["backup.tar", "old.parquet", "b.tar.gz"])
def test_a_stray_archive_beside_images_is_refused_and_deletes_nothing(vae, folder, tmp_path, stray):
    photos = tmp_path / "photos"
    photos.mkdir()
    for key in folder_keys(folder):
        (photos / key).parent.mkdir(parents=True, exist_ok=True)
        (photos / key).write_bytes((folder / key).read_bytes())
    out = tmp_path / "store"
    assert encode(vae, photos, out).encoded == N
    (photos / stray).write_bytes(b"anything")
    with pytest.raises(archives.ArchiveError, match=rf"holds image files .* and the archive {stray}; .*pass it as"):
        encode(vae, photos, out)
    with LatentStore(out) as store:
        assert sorted(store) == folder_keys(folder)  # nothing removed
    assert all((out / s["file"]).is_file() for s in json.loads((out / INDEX_NAME).read_text())["shards"])


def test_the_command_refuses_a_stray_archive_with_one_line(folder, tmp_path, hf_home):
    (tmp_path / "photos").mkdir()
    for key in folder_keys(folder)[:2]:
        (tmp_path / "photos" / Path(key).name).write_bytes((folder / key).read_bytes())
    with tarfile.open(tmp_path / "photos" / "backup.tar", "w") as tar:
        add_member(tar, "x.png", png_bytes(0))
    proc = run_cli("encode", str(tmp_path / "photos"), "-o", str(tmp_path / "out"), "--model", "sd14",
                   "--device", "cpu", "--no-progress", hf_home=hf_home)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "backup.tar" in lines[0] and "pass it as SOURCE" in lines[0], proc.stderr
    assert not (tmp_path / "out" / INDEX_NAME).exists()


# 5. img2dataset's layouts ----------------------------------------------------------------------------------------


def write_metadata_parquet(path: Path, keys: list[str]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    urls = [f"https://example.org/{k}" for k in keys]
    table = pa.table({"url": urls, "key": keys, "status": ["success"] * len(keys)})
    pq.write_table(table, path)


def test_img2dataset_webdataset_layout_encodes_the_tars(vae, folder, tmp_path):
    shards = tmp_path / "out"
    mapping = shards_of(folder, shards)
    for name in ("00000", "00001"):
        write_metadata_parquet(shards / f"{name}.parquet", ["a", "b"])
        (shards / f"{name}_stats.json").write_text("{}")
    summary = encode(vae, shards, tmp_path / "store")
    assert (summary.total, summary.encoded, summary.failed) == (N, N, {})
    with LatentStore(tmp_path / "store") as store:
        assert sorted(store) == sorted(mapping)


def test_img2dataset_files_layout_encodes_the_images(vae, folder, tmp_path):
    data = tmp_path / "out"
    (data / "00000").mkdir(parents=True)
    keys = folder_keys(folder)
    for i, key in enumerate(keys):
        (data / "00000" / f"{i:09d}{Path(key).suffix}").write_bytes((folder / key).read_bytes())
    write_metadata_parquet(data / "00000.parquet", [f"{i:09d}" for i in range(len(keys))])
    summary = encode(vae, data, tmp_path / "store")
    assert (summary.total, summary.encoded, summary.failed) == (N, N, {})


# 2. Keys never walk out, and decode never writes outside its folder ---------------------------------------------


@pytest.mark.parametrize("name", ["../../evil.png", "a/../../evil.png", "..\\evil.png"])
def test_a_member_name_with_dotdot_is_a_failure_of_that_sample(vae, tmp_path, name):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add_member(tar, "ok.png", png_bytes(0))
        add_member(tar, name, png_bytes(1))
    summary = encode(vae, tmp_path / "s.tar", tmp_path / "store")
    assert summary.encoded == 1
    assert list(summary.failed) == [f"s.tar/{name}"]
    assert "'..' component" in summary.failed[f"s.tar/{name}"]
    with LatentStore(tmp_path / "store") as store:
        assert list(store) == ["s.tar/ok.png"]


@pytest.mark.parametrize("bad", ["../x", "..", "a/../../b", ""])
def test_a_parquet_key_value_that_walks_out_is_a_failure(vae, folder, tmp_path, bad):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = [png_bytes(0), png_bytes(1)]
    pq.write_table(pa.table({"image": pa.array(data, pa.binary()), "name": ["good", bad]}), tmp_path / "t.parquet")
    summary = encode(vae, tmp_path / "t.parquet", tmp_path / "store", key_column="name")
    assert summary.encoded == 1 and list(summary.failed) == [f"t.parquet/{bad}"]
    with LatentStore(tmp_path / "store") as store:
        assert list(store) == ["t.parquet/good"]


def test_decode_never_writes_outside_its_folder_whatever_the_store_holds(vae, tmp_path, hf_home, monkeypatch):
    """A store made elsewhere (here: with the key check switched off) holds keys with '..'; a link in the output
    folder points outside. decode --overwrite writes neither outside nor through the link."""
    victim = tmp_path / "home" / "thesis"
    victim.mkdir(parents=True)
    (victim / "figure1.png").write_bytes(b"my figure")
    (victim / "notes.png").write_bytes(b"my notes")
    (tmp_path / "download").mkdir()
    with tarfile.open(tmp_path / "download" / "s.tar", "w") as tar:
        add_member(tar, "ok.png", png_bytes(0))
        add_member(tar, "../../../home/thesis/figure1.png", png_bytes(1))  # out/s.tar/../../.. is tmp_path
        add_member(tar, "link/notes.png", png_bytes(2))
    monkeypatch.setattr(archives, "check_member_name", lambda name: None)
    store_dir = tmp_path / "work" / "store"
    summary = encode(make_tiny_vae(), tmp_path / "download" / "s.tar", store_dir)
    assert summary.encoded == 3  # the store an attacker hands out
    out = tmp_path / "work" / "out"
    (out / "s.tar").mkdir(parents=True)
    (out / "s.tar" / "link").symlink_to(victim)  # a link inside the output folder, leading out
    proc = run_cli("decode", str(store_dir), "-o", str(out), "--overwrite", "--model", "sd14", "--device", "cpu",
                   "--no-progress", hf_home=hf_home)  # fmt: skip
    assert (victim / "figure1.png").read_bytes() == b"my figure"
    assert (victim / "notes.png").read_bytes() == b"my notes"
    assert sorted(p.name for p in victim.iterdir()) == ["figure1.png", "notes.png"]
    assert not (tmp_path / "home" / "thesis" / "figure1.png.png").exists()
    assert (out / "s.tar" / "ok.png").is_file(), proc.stderr  # the rest is decoded
    assert proc.returncode == 1 and proc.stderr.count("does not name a file inside") == 2, proc.stderr


# 6. Duplicate member names: the last one of a name is stored ------------------------------------------------------


@pytest.mark.parametrize("first_size", [(24, 16), (16, 24)], ids=["same-size", "other-size"])
def test_duplicate_member_names_keep_the_last_and_counts_stay_true(vae, tmp_path, first_size):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add_member(tar, "a.png", png_bytes(1, first_size))
        add_member(tar, "b.png", png_bytes(2))
    with tarfile.open(tmp_path / "s.tar", "a") as tar:  # what tar -r appends: a newer a.png
        add_member(tar, "a.png", png_bytes(3))
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "a.png").write_bytes(png_bytes(3))
    encode(vae, tmp_path / "ref", tmp_path / "ref-store")
    summary = encode(vae, tmp_path / "s.tar", tmp_path / "store")
    assert (summary.total, summary.encoded, summary.duplicates, summary.failed) == (3, 2, 1, {})
    assert "1 duplicate name(s) (the last member of a name kept)" in str(summary)
    with LatentStore(tmp_path / "store") as store, LatentStore(tmp_path / "ref-store") as ref:
        assert list(store) == ["s.tar/a.png", "s.tar/b.png"]
        assert (store["s.tar/a.png"] - ref["a.png"]).abs().max().item() <= 1e-5
    again = encode(vae, tmp_path / "s.tar", tmp_path / "store")
    assert (again.encoded, again.failed, again.loaded_model) == (0, {}, False)  # nothing to do


def test_parquet_duplicate_keys_keep_the_last_and_are_not_failures(vae, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = [png_bytes(1), png_bytes(2), png_bytes(3)]
    pq.write_table(pa.table({"image": pa.array(data, pa.binary()), "name": ["a", "b", "a"]}), tmp_path / "t.parquet")
    summary = encode(vae, tmp_path / "t.parquet", tmp_path / "store", key_column="name")
    assert (summary.encoded, summary.duplicates, summary.failed) == (2, 1, {})
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "a.png").write_bytes(png_bytes(3))
    encode(vae, tmp_path / "ref", tmp_path / "ref-store")
    with LatentStore(tmp_path / "store") as store, LatentStore(tmp_path / "ref-store") as ref:
        assert (store["t.parquet/a"] - ref["a.png"]).abs().max().item() <= 1e-5
    assert encode(vae, tmp_path / "t.parquet", tmp_path / "store", key_column="name").loaded_model is False


# 12. A tar cut at a member's header is truncated --------------------------------------------------------------------


def test_a_tar_cut_at_a_member_header_is_listed_as_truncated(vae, folder, tmp_path):
    keys = folder_keys(folder)[:4]
    write_tar(tmp_path / "s.tar", folder, keys, extra=False)
    with tarfile.open(tmp_path / "s.tar") as tar:
        members = tar.getmembers()
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: members[2].offset])  # exactly before the third member's header
    summary = encode(vae, tmp_path / "s.tar", tmp_path / "store")
    assert summary.encoded == 2 and list(summary.failed) == ["s.tar"]
    assert "end-of-archive" in summary.failed["s.tar"]
    assert "s.tar" not in json.loads((tmp_path / "store" / INDEX_NAME).read_text()).get("archives", {})
    (tmp_path / "s.tar").write_bytes(data)  # the whole shard again (a changed file: read again)
    again = encode(vae, tmp_path / "s.tar", tmp_path / "store")
    assert (again.total, again.encoded, again.failed) == (4, 4, {})


# Smaller: gzip-compressed shards ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzip_shards_are_read_in_a_folder_and_by_name(vae, folder, tmp_path, suffix):
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = folder_keys(folder)
    with tarfile.open(shards / f"00000{suffix}", "w:gz") as tar:
        for key in keys:
            tar.add(folder / key, arcname=key)
    assert encode(vae, shards, tmp_path / "a").encoded == N
    assert encode(vae, shards / f"00000{suffix}", tmp_path / "b").encoded == N
    with LatentStore(tmp_path / "a") as store:
        assert sorted(store) == sorted(f"00000{suffix}/{k}" for k in keys)


# 8. Parquet is read in bounded record batches ---------------------------------------------------------------------

_PARQUET_MEMORY = """
import sys
from pathlib import Path
import pyarrow.parquet  # imported before the measure: its own size is not the reading's
from vae_toolkit import archives
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
base = peak()
for key, stat, data in archives.iter_rows(Path(sys.argv[1]), "t.parquet", "image", None):
    pass
print(peak() - base)
"""


def test_parquet_memory_follows_the_batch_not_the_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    blobs = pa.array([rng.bytes(120_000) for _ in range(500)], pa.binary())
    pq.write_table(pa.table({"image": blobs}), tmp_path / "t.parquet", write_batch_size=16)  # one row group
    del blobs
    size = (tmp_path / "t.parquet").stat().st_size / 2**20
    proc = subprocess.run([sys.executable, "-c", _PARQUET_MEMORY, str(tmp_path / "t.parquet")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    growth = float(proc.stdout)
    assert growth < 0.5 * size, f"reading a {size:.0f} MB row group grew the process by {growth:.0f} MB"


# 3, 4. A report never writes through a link --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny_vae().save_pretrained(folder, safe_serialization=True)
    return folder


def photos(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"p{i}.png").write_bytes(png_bytes(i, (32, 24)))


@pytest.mark.parametrize("name", ["metrics.csv", "summary.json", "index.html", "report-manifest.json"])
def test_evaluate_overwrite_never_writes_through_a_linked_report_file(capsys, tmp_path, model_folder, name,
                                                                      monkeypatch):  # fmt: skip
    from vae_toolkit import __main__ as cli

    monkeypatch.setattr("vae_toolkit.vae_loader.VAELoader.load_sd_vae", lambda *a, **k: pytest.fail("a model loaded"))
    photos(tmp_path / "photos")
    (tmp_path / "experiments").mkdir()
    target = tmp_path / "experiments" / "all-runs.csv"
    target.write_text("every run of the year\n")
    report = tmp_path / "report"
    report.mkdir()
    (report / name).symlink_to(target)
    code = cli.main(["evaluate", str(tmp_path / "photos"), "-o", str(report), "--model", str(model_folder),
                     "--device", "cpu", "--no-progress", "--overwrite", "--lpips", "none", "--no-fid"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"{name} is a symbolic link" in err and len(err.strip().splitlines()) == 1, err
    assert target.read_text() == "every run of the year\n"
    assert (report / name).is_symlink()  # not replaced either


def test_pictures_never_land_in_the_source_through_a_linked_images_folder(capsys, tmp_path, model_folder):
    from vae_toolkit import __main__ as cli

    photos(tmp_path / "photos")
    before = sorted(p.name for p in (tmp_path / "photos").iterdir())
    report = tmp_path / "report"
    report.mkdir()
    (report / "images").symlink_to(tmp_path / "photos")
    code = cli.main(["evaluate", str(tmp_path / "photos"), "-o", str(report), "--model", str(model_folder),
                     "--device", "cpu", "--no-progress", "--overwrite", "--lpips", "none", "--no-fid"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "images is a symbolic link" in err, err
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == before


def test_the_metrics_writer_never_opens_through_a_link_made_after_the_check(tmp_path):
    from vae_toolkit.report_folder import RowWriter

    target = tmp_path / "elsewhere.csv"
    target.write_text("keep me\n")
    (tmp_path / "metrics.csv").symlink_to(target)
    with pytest.raises(OSError, match="metrics.csv"):
        RowWriter(tmp_path / "metrics.csv", ["image"])
    assert target.read_text() == "keep me\n"
