"""The training cache: ``encode_dataset(buckets=..., flip=..., distribution=...)``, SDXL's conditioning per entry,
and :class:`TrainingDataset`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_vae
from test_dataset import write_images

from vae_toolkit import _table, latents, store_files
from vae_toolkit.buckets import bucket_sizes, prepare_image
from vae_toolkit.dataset import (
    INDEX_NAME,
    BucketBatchSampler,
    LatentStore,
    StoreMismatchError,
    TrainingDataset,
    encode_dataset,
    find_images,
)

BUCKETS = dict(buckets=24, bucket_step=8)  # buckets 16x32, 24x24, 32x16: all within the tiny VAE's sample size
TOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    return make_tiny_vae()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    write_images(folder, n=10)
    return folder


def encode(vae, source, out, **kwargs):
    return encode_dataset(vae, source, out, batch_size=3, progress=False, workers=2, **kwargs)


def prepared(path, **kwargs):
    return prepare_image(path, **kwargs)


def one(vae, x):
    with torch.no_grad():
        return latents.encode(vae, x[None])[0]


@pytest.fixture(scope="module")
def bucketed(vae, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("bucketed") / "store"
    summary = encode(vae, source, out, **BUCKETS, flip=True)
    return out, summary


def test_buckets_store_bucket_shapes_and_the_rule_values(vae, source, bucketed):
    out, summary = bucketed
    buckets = bucket_sizes(24, 8)
    assert summary.encoded == 10 and not summary.failed
    # 16x16 (4 images) and 24x16 (2) are smaller than their buckets: scaled up; 17x35 and 32x24 are not
    assert summary.upscaled == 6 and "6 smaller than their bucket, scaled up" in str(summary)
    with LatentStore(out) as store:
        assert store.metadata["buckets"] == {"area": 24, "step": 8, "max_aspect": 4.0}
        assert store.metadata["reader"] == "fast"
        for key in find_images(source)[1]:
            p = prepared(source / key, buckets=buckets)
            assert (p.plan.target[1], p.plan.target[0]) in buckets
            z = store[key]
            assert z.shape[1:] == (p.plan.target[0] // 2, p.plan.target[1] // 2)
            assert (z - one(vae, p.image)).abs().max().item() <= TOL
            entry = store.entry(key)
            assert entry["original_size"] == p.plan.original
            assert entry["resized_size"] == p.plan.resized
            assert entry["crops_coords_top_left"] == p.plan.crop
            assert entry["target_size"] == p.plan.target == (entry["size"][1], entry["size"][0])


def test_conditioning_values_by_hand(bucketed, source):
    out, _ = bucketed
    with LatentStore(out) as store:
        # img002 is 17 x 35 (W x H): log(17/35) nearest 16x32 (1:2); scale max(16/17, 32/35) = 16/17,
        # W' = 16, H' = round(35 * 16 / 17) = round(32.94) = 33; top = (33 - 32) // 2 = 0
        entry = store.entry("part0/img002.png")
        # img004 is 32 x 24: |log(4/3)| = 0.288 to 24x24, |log(2) - log(4/3)| = 0.405 to 32x16 -> 24x24, no resize
        wide = store.entry("part0/img004.png")
    assert entry["original_size"] == (35, 17)
    assert entry["resized_size"] == (33, 16)
    assert entry["crops_coords_top_left"] == (0, 0) and entry["target_size"] == (32, 16)
    assert wide["original_size"] == (24, 32) and wide["resized_size"] == (24, 32)
    assert wide["crops_coords_top_left"] == (0, 4) and wide["target_size"] == (24, 24)


def test_bucket_batch_sampler_gives_batches_of_one_shape(bucketed):
    out, _ = bucketed
    with LatentStore(out) as store:
        shapes = store.shapes
        assert shapes[:, 0].tolist() == [4] * len(store)  # one latent's channels, although flips are stored too
        sampler = BucketBatchSampler(store, batch_size=2, seed=1)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(store)))
        for batch in batches:
            assert len({tuple(shapes[i]) for i in batch}) == 1
        view = TrainingDataset(store, seed=0)
        loader = torch.utils.data.DataLoader(view, batch_sampler=sampler)
        for batch in loader:
            assert batch["latent"].dim() == 4 and batch["time_ids"].shape == (batch["latent"].shape[0], 6)


def test_flipped_latent_is_the_latent_of_the_mirrored_image(vae, source, bucketed):
    out, _ = bucketed
    buckets = bucket_sizes(24, 8)
    with LatentStore(out) as store:
        assert store.flips
        for key in find_images(source)[1][::3]:
            x = prepared(source / key, buckets=buckets).image
            flipped = store.get(key, flipped=True)
            assert (flipped - one(vae, x.flip(-1))).abs().max().item() <= TOL
            assert (store.get(key) - one(vae, x)).abs().max().item() <= TOL
            assert not torch.allclose(flipped, store.get(key).flip(-1), atol=1e-3)  # not the mirrored latent


def test_training_view_flips_seeded_and_the_same_on_every_rank(bucketed):
    out, _ = bucketed
    a, b = TrainingDataset(LatentStore(out), seed=3), TrainingDataset(LatentStore(out), seed=3)
    choices = []
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        items = [a[i] for i in range(len(a))]
        assert [it["flipped"] for it in items] == [b[i]["flipped"] for i in range(len(b))]
        choices.append([it["flipped"] for it in items])
        for it in items:
            expected = a.store.get(it["key"], flipped=it["flipped"])
            assert torch.equal(it["latent"], expected)
            entry = a.store.entry(it["key"])
            top, left = entry["crops_coords_top_left"]
            if it["flipped"]:  # the crop corner in the mirrored image
                left = entry["resized_size"][1] - entry["target_size"][1] - left
            assert it["crops_coords_top_left"].tolist() == [top, left]  # [2] tensors: [B, 2] once batched
            ids = entry["original_size"] + (top, left) + entry["target_size"]
            assert it["time_ids"].tolist() == list(ids)
    flat = [c for epoch in choices for c in epoch]
    assert 0 < sum(flat) < len(flat)  # both variants are used
    assert len({tuple(c) for c in choices}) > 1  # each epoch draws anew


def test_flip_false_never_flips_and_a_store_without_flips_refuses_flip(vae, source, tmp_path):
    out = tmp_path / "plain"
    encode(vae, source, out, size=16)
    with LatentStore(out) as store:
        assert not store.flips
        with pytest.raises(ValueError, match="no mirrored latents; encode with --flip"):
            store.get(store.key(0), flipped=True)
        with pytest.raises(ValueError, match="encode with --flip, or pass flip=False"):
            TrainingDataset(store, flip=True)
        view = TrainingDataset(store)
        assert not any(view[i]["flipped"] for i in range(len(view)))


@pytest.mark.parametrize("size", [None, 16])
def test_conditioning_with_size_and_without_either(vae, source, tmp_path, size):
    out = tmp_path / "s"
    encode(vae, source, out, size=size)
    with LatentStore(out) as store:
        for key in find_images(source)[1]:
            p = prepared(source / key, size=size)
            entry = store.entry(key)
            assert (entry["original_size"], entry["resized_size"]) == (p.plan.original, p.plan.resized)
            assert (entry["crops_coords_top_left"], entry["target_size"]) == (p.plan.crop, p.plan.target)
        e = store.entry("part0/img002.png")  # 17 x 35
        if size is None:  # kept, center-cropped to 16 x 32 at (1, 0)
            assert (e["original_size"], e["crops_coords_top_left"], e["target_size"]) == ((35, 17), (1, 0), (32, 16))
        else:  # shorter side to 16: 16 x 32 (int(16 * 35 / 17) = 32), cropped 16 x 16 at top 8
            assert (e["resized_size"], e["crops_coords_top_left"], e["target_size"]) == ((32, 16), (8, 0), (16, 16))


def test_distribution_stores_mean_and_std_and_draws_reproducibly(vae, source, tmp_path):
    out = tmp_path / "dist"
    encode(vae, source, out, size=16, distribution=True, flip=True)
    scale, shift = latents.scaling_factors(vae)
    key = find_images(source)[1][1]
    x = prepared(source / key, size=16).image
    with torch.no_grad():
        posterior = vae.encode(x[None]).latent_dist
        posterior_f = vae.encode(x.flip(-1)[None]).latent_dist
    with LatentStore(out) as store:
        assert store.distributions and store.shapes[0].tolist() == [4, 8, 8]
        mean, std = store.distribution(key)
        assert (mean - posterior.mean[0]).abs().max() <= TOL and (std - posterior.std[0]).abs().max() <= TOL
        mean_f, std_f = store.distribution(key, flipped=True)
        assert (mean_f - posterior_f.mean[0]).abs().max() <= TOL and (std_f - posterior_f.std[0]).abs().max() <= TOL
        assert torch.allclose(store[key], (mean - shift) * scale)
        one_draw = store.sample(key, torch.Generator().manual_seed(7))
        assert torch.equal(one_draw, store.sample(key, torch.Generator().manual_seed(7)))  # same seed, same draw
        assert not torch.equal(one_draw, store.sample(key, torch.Generator().manual_seed(8)))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(one_draw, (mean + std * noise - shift) * scale)
        draws = torch.stack([store.sample(key, torch.Generator().manual_seed(s)) for s in range(2000)])
        assert torch.allclose(draws.mean(0), (mean - shift) * scale, atol=4 * (std * scale).max().item() / 2000**0.5)
        assert torch.allclose(draws.std(0), std * scale, rtol=0.1)
        view = TrainingDataset(store, seed=1, flip=False)
        first = view[1]["latent"]
        assert torch.equal(first, TrainingDataset(LatentStore(out), seed=1, flip=False)[1]["latent"])
        view.set_epoch(1)
        assert not torch.equal(first, view[1]["latent"])  # a new draw each epoch


def test_training_settings_are_store_settings(vae, source, tmp_path):
    out = tmp_path / "settings"
    encode(vae, source, out, **BUCKETS)
    with pytest.raises(StoreMismatchError, match=r"buckets: stored \{'area': 24.*requested \{'area': 32"):
        encode(vae, source, out, buckets=32, bucket_step=8)
    with pytest.raises(StoreMismatchError, match="size: stored None, requested 16"):
        encode(vae, source, out, size=16)
    with pytest.raises(StoreMismatchError, match="flip: stored False, requested True"):
        encode(vae, source, out, **BUCKETS, flip=True)
    with pytest.raises(StoreMismatchError, match="distribution: stored False, requested True"):
        encode(vae, source, out, **BUCKETS, distribution=True)
    with pytest.raises(ValueError, match="give no bucket"):  # refused before the store is touched
        encode(vae, source, out, buckets=32, bucket_step=64, overwrite=True)
    again = encode(vae, source, out, **BUCKETS)
    assert again.encoded == 0 and again.skipped == 10  # nothing stored was lost


def test_bad_training_arguments(vae, source, tmp_path):
    with pytest.raises(ValueError, match=r"size \(16\) and buckets \(256\) exclude each other"):
        encode(vae, source, tmp_path / "a", size=16, buckets=256)
    with pytest.raises(ValueError, match="give no bucket"):
        encode(vae, source, tmp_path / "b", buckets=32, bucket_step=64)
    with pytest.raises(ValueError, match="sample and distribution exclude each other"):
        encode(vae, source, tmp_path / "c", sample=True, distribution=True)
    with pytest.raises(TypeError, match="flip must be True or False"):
        encode(vae, source, tmp_path / "d", flip=1)
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_a_store_written_before_the_conditioning_still_opens_and_resumes(vae, source, tmp_path, monkeypatch):
    """A format-2 store of 0.2.0: a table without the conditioning columns, an index without the new settings."""
    out = tmp_path / "old"
    old_columns = {k: v for k, v in _table.COLUMNS.items() if k not in _table.OPTIONAL}
    with monkeypatch.context() as m:
        m.setattr(_table, "COLUMNS", old_columns)
        encode(vae, source, out, size=16)
    index = json.loads((out / INDEX_NAME).read_text())
    for name in ("buckets", "flip", "distribution"):
        del index["metadata"][name]
    store_files.write_index(out, index)  # with its checksum, as the writer of that store wrote it
    data = (out / index["table"]["file"]).read_bytes()
    header = json.loads(data[16 : 16 + int.from_bytes(data[8:16], "little")])
    assert "original_size" not in header["columns"] and "shard" in header["columns"]
    with LatentStore(out) as store:
        key = store.key(0)
        assert store[key].shape == (4, 8, 8) and not store.flips and not store.distributions
        entry = store.entry(key)
        assert entry["original_size"] is None and entry["crops_coords_top_left"] is None
        assert entry["target_size"] == (16, 16)
        with pytest.raises(ValueError, match="stored before the original size and crop were recorded"):
            TrainingDataset(store)[0]
    again = encode(vae, source, out, size=16)  # the same settings: resumed, nothing encoded again
    assert again.encoded == 0 and again.skipped == 10
    with pytest.raises(StoreMismatchError, match="flip: stored False, requested True"):
        encode(vae, source, out, size=16, flip=True)


# --- the command line ----------------------------------------------------------------------------


def _cli(args, hf_home):
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    import os

    return subprocess.run([sys.executable, "-m", "vae_toolkit", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)  # fmt: skip


def test_cli_buckets_flip_and_refusals(source, tmp_path, hf_home):
    out = tmp_path / "cli"
    base = ["encode", str(source), "-o", str(out), "--model", "sd14", "--no-progress"]
    both = _cli([*base, "--size", "16", "--buckets", "256"], hf_home)
    assert both.returncode == 2 and "argument --buckets: not allowed with argument --size" in both.stderr
    none = _cli([*base, "--buckets", "32", "--bucket-step", "64"], hf_home)
    assert none.returncode == 2 and "give no bucket" in none.stderr and "--bucket-step" in none.stderr
    assert not out.exists()
    ok = _cli([*base, "--buckets", "24", "--bucket-step", "8", "--flip"], hf_home)
    assert ok.returncode == 0, ok.stderr
    assert "10 encoded (6 smaller than their bucket, scaled up)" in ok.stdout
    with LatentStore(out) as store:
        assert store.flips and store.metadata["buckets"]["area"] == 24
    other = _cli([*base, "--buckets", "32", "--bucket-step", "8", "--flip"], hf_home)
    assert other.returncode == 2 and "buckets: stored" in other.stderr and "--overwrite" in other.stderr
    nodist = _cli([*base, "--buckets", "24", "--bucket-step", "8", "--flip", "--distribution"], hf_home)
    assert nodist.returncode == 2 and "distribution: stored False, requested True" in nodist.stderr
    with LatentStore(out) as store:  # nothing stored was lost
        assert len(store) == 10


def test_the_flipped_crop_corner_is_the_crop_in_the_mirrored_image(vae, tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (25, 24), (200, 10, 10)).save(src / "a.png")  # 24x24 bucket, W' = 25: left 0, mirrored 1
    encode(vae, src, tmp_path / "out", **BUCKETS, flip=True)
    view = TrainingDataset(LatentStore(tmp_path / "out"), seed=0)
    seen = {}
    for epoch in range(16):
        view.set_epoch(epoch)
        item = view[0]
        seen[item["flipped"]] = tuple(item["crops_coords_top_left"].tolist())
    assert seen == {False: (0, 0), True: (0, 1)}
