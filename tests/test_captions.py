"""Captions stored beside each latent: a folder image's ``NAME.txt``, a tar sample's ``KEY.txt`` (or its ``KEY.json``'s
"caption"), a Parquet ``--caption-column``; from the command to ``store.entry(key)["caption"]`` and a batch."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

from vae_toolkit import __main__ as cli
from vae_toolkit import _table
from vae_toolkit.archives import iter_members, sample_key
from vae_toolkit.dataset import INDEX_NAME, BucketBatchSampler, LatentStore, TrainingDataset, encode_dataset
from vae_toolkit.sources import CaptionError, decode_caption, read_caption
from vae_toolkit.store_files import StoreDamagedError

BUCKETS = ("--buckets", "24", "--bucket-step", "8")


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()


def png(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def command(capsys, source, out, *extra):
    code = cli.main(["encode", str(source), "-o", str(out), "--model", "sd14", "--device", "cpu", "--no-progress",
                     *extra])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def batch_captions(out: Path) -> dict[str, str]:
    """Every item's caption as a DataLoader gives it: TrainingDataset batched by BucketBatchSampler."""
    got: dict[str, str] = {}
    with LatentStore(out) as store:
        view = TrainingDataset(store)
        loader = torch.utils.data.DataLoader(view, batch_sampler=BucketBatchSampler(store, 2, shuffle=False))
        for batch in loader:
            assert batch["latent"].dim() == 4 and len(batch["caption"]) == batch["latent"].shape[0]
            got.update(zip(batch["key"], batch["caption"], strict=True))
    assert len(got) == len(LatentStore(out))
    return got


def captions_of(out: Path) -> dict[str, str | None]:
    with LatentStore(out) as store:
        return {key: store.entry(key)["caption"] for key in store}


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    sizes = {"a.png": (16, 16), "b.jpg": (24, 16), "sub/c.png": (16, 32), "d.png": (16, 16), "e.b.png": (32, 16)}
    for i, (name, size) in enumerate(sizes.items()):
        (src / name).write_bytes(png(i, size))
    (src / "a.txt").write_text("  a red cat\n", encoding="utf-8")
    (src / "sub" / "c.txt").write_bytes("\ufeffcafé 猫".encode("utf-8"))  # with a byte order mark
    (src / "d.txt").write_text("")  # an empty caption is a caption: "" (no file: None)
    (src / "e.b.txt").write_text("dotted")  # same name without the image's extension
    return src


FOLDER_CAPTIONS = {"a.png": "a red cat", "b.jpg": None, "sub/c.png": "café 猫", "d.png": "", "e.b.png": "dotted"}


def test_folder_sidecars_from_the_command_to_a_batch(hf_home, capsys, folder, tmp_path):
    code, out, err = command(capsys, folder, tmp_path / "out", *BUCKETS)
    assert code == 0, err
    assert out.startswith("encode: 5 images: 5 encoded") and ", 0 already stored, 0 failed" in out  # .txt: no image
    assert captions_of(tmp_path / "out") == FOLDER_CAPTIONS
    # the item's caption: "" when there is none (a DataLoader cannot batch None); the entry tells them apart
    expected = {k: "" if v is None else v for k, v in FOLDER_CAPTIONS.items()}
    assert batch_captions(tmp_path / "out") == expected
    with LatentStore(tmp_path / "out") as store:
        index = [store.key(i) for i in range(len(store))].index("a.png")
        assert TrainingDataset(store)[index]["caption"] == "a red cat"


def test_a_caption_is_read_when_its_image_is_encoded(vae, folder, tmp_path):
    """The rule: a rerun keeps the stored caption of an unchanged image (a changed NAME.txt alone is not read
    again); an image encoded again (changed, or touched) takes its present caption; kept rows keep theirs."""
    out = tmp_path / "out"
    encode_dataset(vae, folder, out, progress=False, workers=2)
    (folder / "a.txt").write_text("a blue cat")
    (folder / "d.txt").unlink()
    again = encode_dataset(vae, folder, out, progress=False, workers=2)
    assert again.encoded == 0 and captions_of(out) == FOLDER_CAPTIONS
    stat = (folder / "a.png").stat()
    os.utime(folder / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch: encoded again
    (folder / "f.png").write_bytes(png(9))
    (folder / "f.txt").write_text("new")
    third = encode_dataset(vae, folder, out, progress=False, workers=2)
    assert third.encoded == 2  # a.png and f.png; the other rows are kept with their captions (the table's merge)
    assert captions_of(out) == {**FOLDER_CAPTIONS, "a.png": "a blue cat", "f.png": "new"}


def test_a_caption_that_is_not_utf8_fails_its_image_and_the_fix_is_picked_up(hf_home, capsys, folder, tmp_path):
    (folder / "sub" / "c.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1, not UTF-8
    code, out, err = command(capsys, folder, tmp_path / "out")
    assert code == 1 and "5 images: 4 encoded, 0 already stored, 1 failed" in out
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    reason = index["failures"]["sub/c.png"]
    assert "c.txt is not UTF-8 text (byte 0xe9 at position 3)" in reason and "save it as UTF-8" in reason
    assert "sub/c.png" not in LatentStore(tmp_path / "out")  # never stored with replaced characters
    (folder / "sub" / "c.txt").write_text("café au lait", encoding="utf-8")
    code, out, err = command(capsys, folder, tmp_path / "out")
    assert code == 0 and "1 encoded, 4 already stored, 0 failed" in out
    assert captions_of(tmp_path / "out")["sub/c.png"] == "café au lait"


def test_the_caption_rule(tmp_path):
    assert decode_caption("\ufeff  two\nlines \n".encode(), "x") == "two\nlines"
    with pytest.raises(CaptionError, match=r"x is not UTF-8 text \(byte 0xff at position 0\)"):
        decode_caption(b"\xff", "x")
    with pytest.raises(CaptionError, match="more than 65,536"):
        decode_caption(b"a" * 65537, "x")
    (tmp_path / "p.png").write_bytes(b"")
    assert read_caption(tmp_path / "p.png") is None
    (tmp_path / "p.txt").mkdir()  # not a file: its image fails, naming it
    with pytest.raises(CaptionError, match="p.txt cannot be read"):
        read_caption(tmp_path / "p.png")


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


TAR_MEMBERS = [
    ("s1.txt", b"caption one"), ("s1.png", png(1)),  # the caption before its image
    ("s2.png", png(2, (24, 16))), ("s2.txt", b"caption two\n"),  # after it
    ("s3.png", png(3)), ("s3.json", b'{"caption": "from json", "w": 16}'),  # img2dataset's metadata
    ("s4.png", png(4)), ("s4.json", b'{"w": 16}'),  # metadata without a caption: None
    ("s5.png", png(5)), ("s5.txt", b"txt wins"), ("s5.json", b'{"caption": "json loses"}'),
    ("d/s6.a.png", png(6)), ("d/s6.b.png", png(7, (16, 32))), ("d/s6.txt", b"shared"),  # one sample: d/s6
    ("s7.png", png(8)), ("s7.txt", b"\xff\xfe not utf-8"),  # a failure of that sample only
    ("s8.png", png(9)),  # no caption member
]  # fmt: skip
TAR_CAPTIONS = {"s1.png": "caption one", "s2.png": "caption two", "s3.png": "from json", "s4.png": None,
                "s5.png": "txt wins", "d/s6.a.png": "shared", "d/s6.b.png": "shared", "s8.png": None}  # fmt: skip


def test_tar_samples_from_the_command_to_a_batch(hf_home, capsys, tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in TAR_MEMBERS:
            add(tar, name, data)
    code, out, err = command(capsys, tmp_path / "00000.tar", tmp_path / "out", *BUCKETS)
    assert code == 1 and out.startswith("encode: 9 images: 8 encoded") and ", 0 already stored, 1 failed" in out
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert list(index["failures"]) == ["00000.tar/s7.png"]
    assert "caption file 00000.tar/s7.txt is not UTF-8 text" in index["failures"]["00000.tar/s7.png"]
    expected = {f"00000.tar/{k}": v for k, v in TAR_CAPTIONS.items()}
    assert captions_of(tmp_path / "out") == expected
    assert batch_captions(tmp_path / "out") == {k: "" if v is None else v for k, v in expected.items()}


def test_webdataset_grouping_and_a_sample_held_until_it_ends(tmp_path):
    names = ("a.jpg", "d/a.b.jpg", "v1.0/x.tar.txt", "noext")
    assert [sample_key(n) for n in names] == ["a", "d/a", "v1.0/x", "noext"]
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for name, data in TAR_MEMBERS[:4]:
            add(tar, name, data)
    got = [(key, getattr(data, "caption", None)) for key, _, data in iter_members(tmp_path / "t.tar", "t.tar")]
    assert got == [("t.tar/s1.png", "caption one"), ("t.tar/s2.png", "caption two")]


def parquet(path: Path, **columns) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_parquet_caption_column_from_the_command_to_a_batch(hf_home, capsys, tmp_path):
    pa = pytest.importorskip("pyarrow")
    images = pa.array([png(1), png(2, (24, 16)), png(3)], pa.binary())
    parquet(tmp_path / "t.parquet", image=images, name=["x", "y", "z"], text=["first", None, "  padded  "])
    code, out, err = command(capsys, tmp_path / "t.parquet", tmp_path / "out", "--key-column", "name",
                             "--caption-column", "text", *BUCKETS)  # fmt: skip
    assert code == 0, err
    assert out.startswith("encode: 3 images: 3 encoded")
    expected = {"t.parquet/x": "first", "t.parquet/y": None, "t.parquet/z": "padded"}
    assert captions_of(tmp_path / "out") == expected
    assert batch_captions(tmp_path / "out") == {"t.parquet/x": "first", "t.parquet/y": "", "t.parquet/z": "padded"}
    # without --caption-column a Parquet source stores no caption
    code, out, err = command(capsys, tmp_path / "t.parquet", tmp_path / "plain", *BUCKETS)
    assert code == 0 and set(captions_of(tmp_path / "plain").values()) == {None}


def test_a_caption_column_that_is_missing_or_not_text_names_the_file(vae, tmp_path):
    pa = pytest.importorskip("pyarrow")
    parquet(tmp_path / "t.parquet", image=pa.array([png(1)], pa.binary()), n=[1])
    missing = encode_dataset(vae, tmp_path / "t.parquet", tmp_path / "a", caption_column="text", progress=False)
    assert "has no column 'text'" in missing.failed["t.parquet"] and "--caption-column" in missing.failed["t.parquet"]
    other = encode_dataset(vae, tmp_path / "t.parquet", tmp_path / "b", caption_column="n", progress=False)
    assert "column 'n' holds int64, not text" in other.failed["t.parquet"]


def test_caption_column_is_refused_for_folders_and_tars(hf_home, capsys, folder, tmp_path):
    code, out, err = command(capsys, folder, tmp_path / "out", "--caption-column", "text")
    assert code == 2 and "caption_column (text) is for Parquet files" in err
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add(tar, "a.png", png(1))
    code, out, err = command(capsys, tmp_path / "s.tar", tmp_path / "out", "--caption-column", "text")
    assert code == 2 and "is for Parquet files" in err and "KEY.txt" in err


def test_table_captions_none_empty_and_tables_written_before(tmp_path):
    n = 3
    columns = {name: np.zeros((n, w) if w > 1 else n, dtype=dt) for name, (dt, w) in _table.COLUMNS.items()}
    rows = _table.Rows.from_keys([b"a", b"b", b"c"], columns, [b"x \xc3\xa9", None, b""])
    (tmp_path / "t.bin").write_bytes(_table.encode_table(rows))
    table = _table.Table(tmp_path / "t.bin")
    assert [table.caption(i) for i in range(n)] == ["x é", None, ""]
    table.close()
    # a table written before captions: the same file without the two caption columns reads every caption as None
    data = bytearray(_table.encode_table(_table.Rows.from_keys([b"a", b"b", b"c"], columns)))
    room = int.from_bytes(data[8:16], "little")
    header = json.loads(bytes(data[16 : 16 + room]))
    for name in _table.CAPTIONS:
        del header["columns"][name]
    text = json.dumps(header, separators=(",", ":")).encode()
    data[16 : 16 + room] = text + b" " * (room - len(text))
    (tmp_path / "old.bin").write_bytes(bytes(data))
    old = _table.Table(tmp_path / "old.bin")
    assert [old.caption(i) for i in range(n)] == [None, None, None]
    old.close()
    # offsets that do not fit the blob: refused, never misread
    bad = _table.Rows(rows.key_offsets, rows.key_blob, columns, np.array([0, 4, 2, 6]), rows.caption_blob)
    (tmp_path / "bad.bin").write_bytes(_table.encode_table(bad))
    with pytest.raises(_table.TableError, match="caption offsets"):
        _table.Table(tmp_path / "bad.bin")


def test_a_changed_caption_byte_in_the_table_is_found_by_its_checksum(vae, folder, tmp_path):
    out = tmp_path / "out"
    encode_dataset(vae, folder, out, progress=False, workers=2)
    index = json.loads((out / INDEX_NAME).read_text())
    path = out / index["table"]["file"]
    data = bytearray(path.read_bytes())
    at = data.find(b"red cat")
    assert at > 0
    data[at] = ord("b")
    path.write_bytes(bytes(data))  # the same size: only the SHA-256 tells
    with pytest.raises(StoreDamagedError, match="does not match its checksum"):
        LatentStore(out)
