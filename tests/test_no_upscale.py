"""``--no-upscale`` and ``--min-size``: the rule, the command, the store's entries (sizes, crop plans, counts),
reruns and a batch from :class:`TrainingDataset`."""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from PIL import Image

from vae_toolkit import __main__ as cli
from vae_toolkit import archives, latents, store_files
from vae_toolkit.buckets import (
    ImageTooSmallError,
    bucket_sizes,
    choose_bucket,
    fit_bucket,
    plan_crop,
    prepare_image,
)
from vae_toolkit.dataset import (
    INDEX_NAME,
    BucketBatchSampler,
    LatentStore,
    StoreMismatchError,
    TrainingDataset,
    encode_dataset,
)

B = bucket_sizes(24, 8)  # (16, 32), (24, 24), (32, 16)
TOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()


def image(path: Path, w: int, h: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def counts_are_true(summary) -> bool:
    return summary.total == summary.encoded + summary.skipped + len(summary.failed) + len(summary.too_small)


def test_the_rule_by_hand():
    assert B == [(16, 32), (24, 24), (32, 16)]
    assert fit_bucket(30, 30, B) == (24, 24) == choose_bucket(30, 30, B)  # its bucket fits: the usual rule
    assert fit_bucket(20, 20, B) == (16, 16)  # (24, 24) does not fit, nor any other: own size, rounded down to 8
    # 12 x 40: own size 8 x 40, the long side cut to the buckets' largest aspect (2), or to max_aspect when given
    assert fit_bucket(12, 40, B) == (8, 16) and fit_bucket(12, 40, B, 8, 4.0) == (8, 32)
    hand = [(32, 32), (24, 16), (16, 24)]  # the largest bucket inside the image; ties: nearer aspect, then wider
    assert fit_bucket(30, 30, hand) == (24, 16) and fit_bucket(30, 31, hand) == (16, 24)
    assert fit_bucket(100, 40, bucket_sizes(1024)) == (64, 40)  # a side below the step 64: a multiple of 8
    with pytest.raises(ImageTooSmallError, match=r"shorter side \(5 px\) is below 8"):
        fit_bucket(5, 40, B)


@pytest.mark.parametrize("buckets", [B, bucket_sizes(32, 8, 3.0), bucket_sizes(64, 16)], ids=["24", "32", "64"])
def test_the_rule_never_scales_up(buckets):
    step = math.gcd(*(s for b in buckets for s in b))
    ratio = max(max(b) / min(b) for b in buckets)
    for w in range(8, 90, 3):
        for h in range(8, 90, 5):
            bucket = fit_bucket(w, h, buckets)
            plan = plan_crop(w, h, bucket)
            assert not plan.upscaled and bucket[0] <= w and bucket[1] <= h, (w, h, bucket)
            assert bucket[0] % 8 == 0 and bucket[1] % 8 == 0 and max(bucket) <= ratio * min(bucket)
            chosen = choose_bucket(w, h, buckets)
            inside = [b for b in buckets if b[0] <= w and b[1] <= h]
            if chosen in inside:
                assert bucket == chosen
            elif inside:
                assert bucket in inside and bucket[0] * bucket[1] == max(b[0] * b[1] for b in inside)
            else:
                assert bucket not in buckets and all(s % step == 0 or s < step for s in bucket)


def test_prepare_image_no_upscale_and_min_size(tmp_path):
    image(tmp_path / "a.png", 20, 20)
    prepared = prepare_image(tmp_path / "a.png", buckets=B, no_upscale=True)
    assert prepared.plan.target == (16, 16) and not prepared.plan.upscaled
    assert prepared.image.shape == (3, 16, 16)
    assert prepare_image(tmp_path / "a.png", buckets=B).plan.upscaled  # the usual rule scales it up
    with pytest.raises(ImageTooSmallError, match="below --min-size 21"):
        prepare_image(tmp_path / "a.png", buckets=B, min_size=21)
    with pytest.raises(ImageTooSmallError, match="smaller than --size 24, and --no-upscale"):
        prepare_image(tmp_path / "a.png", size=24, no_upscale=True)
    with pytest.raises(ImageTooSmallError, match="below --min-size 30"):
        prepare_image(tmp_path / "a.png", min_size=30)  # every mode


# (w, h) -> the target (h, w) by the rule: small 16x16 keeps its size; tall 17x35 fits (16, 32) -> resized 16x33;
# big 40x40 goes down to 24x24; wide 20x12 fits no bucket -> own size 16x8; tiny 30x6 is below --min-size 8
SOURCE = {"small.png": (16, 16), "tall.png": (17, 35), "big.png": (40, 40), "sub/wide.png": (20, 12),
          "tiny.png": (30, 6)}  # fmt: skip
TARGETS = {"small.png": (16, 16), "tall.png": (32, 16), "big.png": (24, 24), "sub/wide.png": (8, 16)}


@pytest.fixture
def src(tmp_path):
    for i, (name, (w, h)) in enumerate(SOURCE.items()):
        image(tmp_path / "src" / name, w, h, seed=i)
    return tmp_path / "src"


def command(capsys, source, out, *extra):
    code = cli.main(["encode", str(source), "-o", str(out), "--model", "sd14", "--device", "cpu", "--no-progress",
                     "--buckets", "24", "--bucket-step", "8", *extra])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def test_no_upscale_and_min_size_from_the_command_to_a_batch(hf_home, capsys, vae, src, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = command(capsys, src, out, "--no-upscale", "--min-size", "8")
    assert code == 0, stderr  # left out as too small is not a failure
    assert "5 images: 4 encoded, 0 already stored, 0 failed, 1 too small" in stdout and "scaled up" not in stdout
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["failures"] == {} and list(index["too_small"]) == ["tiny.png"]
    assert index["too_small"]["tiny.png"]["reason"] == "its shorter side (6 px) is below --min-size 8"
    with LatentStore(out) as store:
        assert store.metadata["no_upscale"] is True and store.metadata["min_size"] == 8
        assert sorted(store) == sorted(TARGETS)
        for key, target in TARGETS.items():
            entry = store.entry(key)
            w, h = SOURCE[key]
            assert entry["target_size"] == target and entry["original_size"] == (h, w)
            assert entry["resized_size"][0] <= h and entry["resized_size"][1] <= w  # never scaled up
            p = prepare_image(src / key, buckets=B, no_upscale=True, bucket_step=8, max_aspect=4.0)
            assert (entry["resized_size"], entry["crops_coords_top_left"]) == (p.plan.resized, p.plan.crop)
            with torch.no_grad():
                assert (store[key] - latents.encode(vae, p.image[None])[0]).abs().max().item() <= TOL
        assert store.entry("tall.png")["resized_size"] == (33, 16)  # 17 x 35 to cover 16 x 32: down, not up
        view = TrainingDataset(store)
        loader = torch.utils.data.DataLoader(view, batch_sampler=BucketBatchSampler(store, 2, shuffle=False))
        seen = {}
        for batch in loader:
            assert (batch["target_size"] == torch.tensor(batch["latent"].shape[-2:]) * 2).all()
            seen.update({k: t.tolist() for k, t in zip(batch["key"], batch["time_ids"], strict=True)})
    assert seen["big.png"] == [40, 40, 0, 0, 24, 24]  # 40 x 40 resized down to 24 x 24: no crop
    assert sorted(seen) == sorted(TARGETS)
    # a rerun with the same options: nothing read again or written (tiny.png stays listed, unchanged)
    before = (out / INDEX_NAME).read_bytes()
    code, stdout, stderr = command(capsys, src, out, "--no-upscale", "--min-size", "8")
    assert code == 0 and "5 images: 0 encoded, 4 already stored, 0 failed, 1 too small" in stdout
    assert (out / INDEX_NAME).read_bytes() == before
    # other values are other settings: refused, as any setting is
    code, stdout, stderr = command(capsys, src, out, "--min-size", "8")
    assert code == 2 and "no_upscale: stored True, requested False" in stderr
    code, stdout, stderr = command(capsys, src, out, "--no-upscale", "--min-size", "12")
    assert code == 2 and "min_size: stored 8, requested 12" in stderr


def test_the_usual_rule_scales_up_where_no_upscale_does_not(vae, src, tmp_path):
    usual = encode_dataset(vae, src, tmp_path / "usual", buckets=24, bucket_step=8, progress=False, workers=2)
    assert usual.upscaled == 3 and usual.encoded == 5 and counts_are_true(usual)  # small, wide, tiny scaled up
    kept = encode_dataset(vae, src, tmp_path / "kept", buckets=24, bucket_step=8, no_upscale=True, progress=False,
                          workers=2)  # fmt: skip
    assert kept.upscaled == 0 and kept.encoded == 4 and counts_are_true(kept)
    assert list(kept.too_small) == ["tiny.png"]  # 6 px: below the 8 a latent needs, without scaling it up
    assert "below 8, the least a latent needs" in kept.too_small["tiny.png"]


def test_a_changed_image_is_read_again_and_leaves_the_list(vae, src, tmp_path):
    out = tmp_path / "out"
    options = dict(buckets=24, bucket_step=8, no_upscale=True, min_size=8, progress=False, workers=2)
    first = encode_dataset(vae, src, out, **options)
    assert list(first.too_small) == ["tiny.png"] and counts_are_true(first)
    again = encode_dataset(vae, src, out, **options)
    assert (again.encoded, again.skipped, list(again.too_small), again.loaded_model) == (0, 4, ["tiny.png"], False)
    image(src / "tiny.png", 30, 20, seed=7)
    st = (src / "tiny.png").stat()
    os.utime(src / "tiny.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = encode_dataset(vae, src, out, **options)
    assert (third.encoded, third.too_small) == (1, {}) and counts_are_true(third)
    assert "too_small" not in json.loads((out / INDEX_NAME).read_text())
    with LatentStore(out) as store:
        assert store.entry("tiny.png")["target_size"] == (16, 24)  # 30 x 20 fits no bucket: its own 24 x 16


def test_size_with_no_upscale_leaves_out_what_it_would_scale_up(vae, src, tmp_path):
    summary = encode_dataset(vae, src, tmp_path / "out", size=24, no_upscale=True, progress=False, workers=2)
    assert sorted(summary.too_small) == ["small.png", "sub/wide.png", "tall.png", "tiny.png"]
    assert summary.too_small["tall.png"] == (
        "its shorter side (17 px) is smaller than --size 24, and --no-upscale keeps it from being scaled up"
    )
    assert (summary.encoded, summary.upscaled) == (1, 0) and counts_are_true(summary)
    with LatentStore(tmp_path / "out") as store:
        assert list(store) == ["big.png"] and store.entry("big.png")["target_size"] == (24, 24)
        batch = next(iter(torch.utils.data.DataLoader(store, batch_size=4)))  # every latent N x N: plain batching
        assert batch.shape == (1, 4, 12, 12)
    plain = encode_dataset(vae, src, tmp_path / "plain", min_size=16, progress=False, workers=2)
    assert list(plain.too_small) == ["sub/wide.png", "tiny.png"] and counts_are_true(plain)


def test_stores_written_before_read_as_the_defaults(vae, src, tmp_path):
    out = tmp_path / "out"
    encode_dataset(vae, src, out, buckets=24, bucket_step=8, progress=False, workers=2)
    index = json.loads((out / INDEX_NAME).read_text())
    for name in ("no_upscale", "min_size"):
        del index["metadata"][name]
    store_files.write_index(out, index)  # as a store of the previous version holds it (its checksum too)
    assert store_files.check_store(out, no_upscale=False, min_size=None) is not None
    again = encode_dataset(vae, src, out, buckets=24, bucket_step=8, progress=False, workers=2)
    assert again.encoded == 0 and again.skipped == 5
    with pytest.raises(StoreMismatchError, match="no_upscale: stored False, requested True"):
        encode_dataset(vae, src, out, buckets=24, bucket_step=8, no_upscale=True, progress=False, workers=2)


def test_a_tar_member_too_small_does_not_reopen_its_shard(vae, tmp_path, monkeypatch):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, (w, h) in enumerate([(16, 16), (30, 6), (24, 16)]):
            buf = io.BytesIO()
            Image.fromarray(np.full((h, w, 3), 40 * i, dtype=np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    opened: list[str] = []
    real = archives._open_shard
    monkeypatch.setattr(archives, "_open_shard", lambda path: opened.append(Path(path).name) or real(path))
    options = dict(buckets=24, bucket_step=8, min_size=8, progress=False, workers=2)
    first = encode_dataset(vae, tmp_path / "s.tar", tmp_path / "out", **options)
    assert (first.encoded, list(first.too_small), opened) == (2, ["s.tar/1.png"], ["s.tar"]) and counts_are_true(first)
    again = encode_dataset(vae, tmp_path / "s.tar", tmp_path / "out", **options)
    assert opened == ["s.tar"] and (again.total, again.skipped, list(again.too_small)) == (3, 2, ["s.tar/1.png"])


def test_no_upscale_needs_size_or_buckets(hf_home, capsys, src, tmp_path):
    code = cli.main(["encode", str(src), "-o", str(tmp_path / "out"), "--model", "sd14", "--device", "cpu",
                     "--no-progress", "--no-upscale"])  # fmt: skip
    assert code == 2 and "--no-upscale) needs size or buckets" in capsys.readouterr().err
