"""The store in a multi-process training run: equal batches per rank (a property test, torchrun with 2 gloo ranks,
accelerate), the epoch reaching persistent DataLoader workers, several stores with repeats, batched conditioning."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dataset import write_images

import vae_toolkit
from vae_toolkit.dataset import BucketBatchSampler, LatentStore, TrainingDataset, encode_dataset
from vae_toolkit.store import EpochIndex

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_on_latents.py"
BUCKETS = dict(buckets=24, bucket_step=8)  # buckets 16x32, 24x24, 32x16


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """``a``: 10 images with flips and distributions; ``b``: 7 other images, plain (their keys overlap a's)."""
    root = tmp_path_factory.mktemp("stores")
    vae = make_tiny_vae()
    write_images(root / "src_a", n=10)
    write_images(root / "src_b", n=7, seed=1)
    kwargs = dict(batch_size=4, progress=False, workers=2, **BUCKETS)
    encode_dataset(vae, root / "src_a", root / "a", flip=True, distribution=True, **kwargs)
    encode_dataset(vae, root / "src_b", root / "b", **kwargs)
    return root / "a", root / "b"


# --- equal batches on every rank: the property -----------------------------------------------------------


class Shapes(torch.utils.data.Dataset):
    """A dataset as the sampler sees it: one latent shape per index."""

    def __init__(self, shapes: np.ndarray) -> None:
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.shapes)


@settings(max_examples=250, deadline=None, database=None)
@given(
    n=st.integers(1, 200),
    kinds=st.integers(1, 12),
    world=st.integers(1, 8),
    batch_size=st.integers(1, 16),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_rank_gets_the_same_number_of_batches(n, kinds, world, batch_size, drop_last, shuffle, seed):
    rng = np.random.default_rng(seed)
    group = rng.integers(0, kinds, n)
    group[: min(kinds, n)] = np.arange(min(kinds, n))  # every shape present (when n allows)
    shapes = np.stack([np.full(n, 4), 8 + group, 16 - group], axis=1).astype(np.int32)
    data = Shapes(shapes)
    counts = np.bincount(group)
    made = int((counts // batch_size).sum() if drop_last else (-(-counts // batch_size)).sum())
    expected_len = made // world if drop_last else -(-made // world)
    samplers = [
        BucketBatchSampler(
            data, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, num_replicas=world, rank=r
        )
        for r in range(world)
    ]
    for epoch in (0, 1):
        yielded = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(sampler) == len(batches) == expected_len  # the same on every rank, every epoch
            yielded += batches
        for batch in yielded:
            assert all(isinstance(i, EpochIndex) and i.epoch == epoch for i in batch)
            assert len({tuple(shapes[i]) for i in batch}) == 1  # one shape per batch
            assert 1 <= len(batch) <= batch_size and (len(batch) == batch_size or not drop_last)
        seen = collections.Counter(int(i) for b in yielded for i in b)
        distinct = {tuple(b) for b in yielded}
        assert sum(len(b) for b in distinct) == len({i for b in distinct for i in b})  # the batches are disjoint
        if drop_last:  # nothing twice; left out: short batches (< batch_size per shape) and < world batches
            assert max(seen.values(), default=1) == 1
            assert n - len(seen) <= (batch_size - 1) * len(counts) + (world - 1) * batch_size
        else:  # every index; the extra ones are whole batches repeated to fill the last round (< world)
            assert sorted(seen) == list(range(n))
            assert len(distinct) == made and len(yielded) - made == -made % world


def test_len_and_batches_by_hand_and_the_remainder_rule():
    """Shapes 5 x A, 3 x B at batch 2: A gives [2, 2, 1], B [2, 1]: 5 batches; 2 ranks get 3 each (one repeated),
    with drop_last: A [2, 2], B [2]: 3 batches, 2 ranks get 1 each (the epoch's last full batch left out)."""
    shapes = np.array([[4, 8, 8]] * 5 + [[4, 8, 16]] * 3, dtype=np.int32)
    data = Shapes(shapes)
    plain = [list(BucketBatchSampler(data, 2, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(p) for p in plain] == [3, 3]
    assert sorted(len(b) for p in plain for b in p) == [1, 1, 2, 2, 2, 2]
    dropped = [list(BucketBatchSampler(data, 2, seed=3, num_replicas=2, rank=r, drop_last=True)) for r in (0, 1)]
    assert [len(d) for d in dropped] == [1, 1] and all(len(b) == 2 for d in dropped for b in d)
    one = list(BucketBatchSampler(data, 2, seed=3))
    assert plain[0] + plain[1] != one and sorted(map(tuple, one)) == sorted({tuple(b) for p in plain for b in p})
    assert len(BucketBatchSampler(Shapes(shapes[:0]), 2, num_replicas=3)) == 0  # an empty store: no batch


def test_a_sampler_that_leaves_no_batch_says_so(caplog):
    data = Shapes(np.array([[4, 8, 8]] * 3, dtype=np.int32))
    with caplog.at_level("WARNING", logger="vae_toolkit.store"):
        assert len(BucketBatchSampler(data, 2, drop_last=True, num_replicas=2)) == 0
    assert "leave no batch to any rank" in caplog.text


def test_sampler_bad_arguments():
    with pytest.raises(TypeError, match="dataset with a shapes array"):
        BucketBatchSampler([1, 2, 3], 2)
    with pytest.raises(ValueError, match=r"one row per index \(2\)"):
        BucketBatchSampler(_Wrong(), 2)
    sampler = BucketBatchSampler(Shapes(np.zeros((3, 3), dtype=np.int32)), 2)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        sampler.set_epoch(-1)
    with pytest.raises(TypeError, match="epoch must be an int"):
        sampler.set_epoch(1.5)
    sampler.set_epoch(np.int64(2))
    assert sampler.epoch == 2


class _Wrong(torch.utils.data.Dataset):
    shapes = np.zeros((3, 3), dtype=np.int32)

    def __len__(self) -> int:
        return 2


def test_epoch_index_is_an_int_that_survives_pickling():
    import pickle

    i = EpochIndex(7, 3)
    assert i == 7 and [10, 11, 12, 13, 14, 15, 16, 17][i] == 17 and repr(i) == "EpochIndex(7, epoch=3)"
    j = pickle.loads(pickle.dumps(i))
    assert type(j) is EpochIndex and (int(j), j.epoch) == (7, 3)


# --- the epoch reaches the item wherever it is built --------------------------------------------------------


def test_persistent_workers_draw_each_epoch_as_the_main_process_does(stores):
    a, _ = stores
    view = TrainingDataset(LatentStore(a), seed=5)
    sampler = BucketBatchSampler(view, batch_size=3, seed=1)
    loader = torch.utils.data.DataLoader(view, batch_sampler=sampler, num_workers=2, persistent_workers=True)
    by_epoch = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)  # view.set_epoch(epoch) here would not reach the workers (they keep their copy)
        items = {}
        for batch in loader:
            for k, z, f in zip(batch["key"], batch["latent"], batch["flipped"].tolist(), strict=True):
                items[k] = (z, f)
        by_epoch.append(items)
    assert loader._iterator is not None  # kept: the same workers served both epochs
    main = TrainingDataset(LatentStore(a), seed=5)
    main.set_epoch(1)
    for i in range(len(main)):
        item = main[i]
        z, flipped = by_epoch[1][item["key"]]
        assert torch.equal(z, item["latent"]) and flipped == item["flipped"]
        assert not torch.equal(z, by_epoch[0][item["key"]][0])  # a new draw from the distribution
    assert [f for _, f in by_epoch[0].values()] != [f for _, f in by_epoch[1].values()]  # other flips


def test_the_epoch_of_the_index_wins_over_set_epoch(stores):
    a, _ = stores
    view = TrainingDataset(LatentStore(a), seed=2)
    view.set_epoch(3)
    by_set = view[4]
    view.set_epoch(0)
    by_index = view[EpochIndex(4, 3)]
    assert torch.equal(by_set["latent"], by_index["latent"]) and by_set["flipped"] == by_index["flipped"]
    assert not torch.equal(view[4]["latent"], by_index["latent"])
    plain = BucketBatchSampler(LatentStore(a), batch_size=2)  # 0.2.0's way: the store's sampler, the view's items
    plain.set_epoch(3)
    batch = next(iter(plain))
    assert torch.equal(
        view[batch[0]]["latent"], TrainingDataset(LatentStore(a), seed=2)[EpochIndex(batch[0], 3)]["latent"]
    )
    assert torch.equal(LatentStore(a)[batch[0]], LatentStore(a)[int(batch[0])])  # the store takes them as ints


# --- several stores with repeats, to the batch -------------------------------------------------------------


def test_several_stores_with_repeats_batched_by_shape_to_the_batch(stores):
    a, b = LatentStore(stores[0]), LatentStore(stores[1])
    view = TrainingDataset([a, b], repeats=[2, 1], seed=4)
    assert len(view) == 2 * len(a) + len(b) == 27 and view.flips == (True, False) and view.flip is None
    assert (
        view.locate(len(a) + 3) == (0, 3, 1) and view.locate(2 * len(a)) == (1, 0, 0) and view.locate(-1) == (1, 6, 0)
    )
    assert view.shapes.shape == (27, 3) and (view.shapes[: len(a)] == a.shapes).all()
    sampler = BucketBatchSampler(view, batch_size=4, seed=0)
    loader = torch.utils.data.DataLoader(view, batch_sampler=sampler)
    seen = collections.Counter()
    mixed = 0
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen.clear()
        for batch in loader:
            n = len(batch["key"])
            assert batch["latent"].shape[0] == n and batch["latent"].dim() == 4
            for name in ("original_size", "crops_coords_top_left", "target_size"):
                assert batch[name].shape == (n, 2) and batch[name].dtype == torch.int64
            ids = torch.cat([batch["original_size"], batch["crops_coords_top_left"], batch["target_size"]], 1)
            assert torch.equal(batch["time_ids"], ids.float())
            assert batch["caption"] == [""] * n
            stores_in = set(batch["store"].tolist())
            mixed += len(stores_in) > 1
            for s, key, original, target, flipped in zip(
                batch["store"].tolist(),
                batch["key"],
                batch["original_size"],
                batch["target_size"],
                batch["flipped"].tolist(),
                strict=True,
            ):
                entry = (a, b)[s].entry(key)
                assert tuple(original.tolist()) == entry["original_size"]
                assert tuple(target.tolist()) == entry["target_size"]
                assert batch["latent"].shape[1:] == (a, b)[s][key].shape
                assert not (s == 1 and flipped)  # b holds no flips
                seen[s, key] += 1
        assert seen == {**{(0, k): 2 for k in a}, **{(1, k): 1 for k in b}}  # a twice, b once, every epoch
    assert mixed  # batches mix the stores (one shape per batch)
    pairs = [(view[EpochIndex(0, e)]["flipped"], view[EpochIndex(len(a), e)]["flipped"]) for e in range(8)]
    assert any(x != y for x, y in pairs)  # the two repeats of one image flip their own coins


def test_several_stores_split_per_rank(stores):
    view = TrainingDataset([LatentStore(p) for p in stores], repeats=[1, 3], seed=0)
    for drop_last in (False, True):
        ranks = [BucketBatchSampler(view, 3, num_replicas=3, rank=r, drop_last=drop_last) for r in range(3)]
        batches = [list(s) for s in ranks]
        assert len({len(s) for s in ranks}) == 1 and [len(b) for b in batches] == [len(s) for s in ranks]
        seen = {int(i) for r in batches for b in r for i in b}
        if not drop_last:
            assert seen == set(range(len(view)))
        for r in batches:
            for batch in r:
                assert len({tuple(view.shapes[i]) for i in batch}) == 1


def test_caption_passes_through_and_none_batches_as_empty(stores, monkeypatch):
    a = LatentStore(stores[0])
    entry = LatentStore.entry

    def with_caption(self, key):
        out = entry(self, key)
        if key.endswith(".png"):
            out["caption"] = f"a photo of {key}"
        return out

    monkeypatch.setattr(LatentStore, "entry", with_caption)
    view = TrainingDataset(a)
    captions = [view[i]["caption"] for i in range(len(view))]
    assert captions == [f"a photo of {k}" if k.endswith(".png") else "" for k in a]
    batch = torch.utils.data.default_collate(
        [view[i] for i in range(len(view)) if a.shapes[i].tolist() == a.shapes[0].tolist()]
    )
    assert all(isinstance(c, str) for c in batch["caption"])


def test_training_dataset_refusals(stores):
    a, b = LatentStore(stores[0]), LatentStore(stores[1])
    with pytest.raises(ValueError, match=r"one int per store \(2\), got 1"):
        TrainingDataset([a, b], repeats=[2])
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        TrainingDataset([a, b], repeats=[1, 0])
    with pytest.raises(TypeError, match="repeats must be an int"):
        TrainingDataset([a, b], repeats=2.0)
    with pytest.raises(ValueError, match="holds no mirrored latents; encode with --flip, or pass flip=False"):
        TrainingDataset([a, b], flip=True)
    with pytest.raises(ValueError, match="give at least one LatentStore"):
        TrainingDataset([])
    with pytest.raises(TypeError, match="a LatentStore or a list of them"):
        TrainingDataset(str(stores[0]))
    other = LatentStore(stores[1])
    other.metadata["scaling_factor"] = 0.13025
    with pytest.raises(ValueError, match=r"another latent space .*scaling_factor: 0.13025, not 0.18215"):
        TrainingDataset([a, other])
    view = TrainingDataset([a, b], repeats=3)
    assert view.repeats == (3, 3) and len(view) == 3 * (len(a) + len(b))
    assert "repeats=[3, 3]" in repr(view)
    with pytest.raises(IndexError, match="out of range for a training set of 51"):
        view[51]


def test_training_dataset_is_importable_from_the_package():
    assert vae_toolkit.TrainingDataset is TrainingDataset and "TrainingDataset" in vae_toolkit.__all__


# --- real processes: torchrun (DDP, gloo) and accelerate, through the example ------------------------------


def _expected(view, batch_size, world, epochs, seed=0):
    """What each rank must see, per epoch: ``[store, key, flipped]`` per item, from the sampler in this process."""
    out = []
    for rank in range(world):
        sampler = BucketBatchSampler(view, batch_size, seed=seed, num_replicas=world, rank=rank)
        epochs_seen = []
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            rows = []
            for batch in sampler:
                rows.append([[view.locate(i)[0], view[i]["key"], view[i]["flipped"]] for i in batch])
            epochs_seen.append(rows)
        out.append(epochs_seen)
    return out


def _torchrun(out: Path, args: list[str]) -> None:
    """``torchrun --standalone --nproc_per_node=2 examples/train_on_latents.py ARGS`` on CPU (gloo)."""
    # ACCELERATE_USE_CPU: what `accelerate launch --cpu` sets; without it accelerate runs unconnected processes on CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE)]
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=90, cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def torchrun(stores, tmp_path_factory):
    """Two gloo ranks train two epochs on both stores (repeats 2 and 1, batch 5: 7 batches, one repeated)."""
    out = tmp_path_factory.mktemp("ddp")
    a, b = (str(p) for p in stores)
    _torchrun(out, [a, b, "--repeats", "2", "1", "--batch-size", "5", "--epochs", "2", "--record", str(out)])
    return out


def test_torchrun_two_gloo_ranks_train_two_epochs_with_equal_batches(torchrun, stores):
    logs = [json.loads((torchrun / f"rank{r}.json").read_text()) for r in (0, 1)]
    view = TrainingDataset([LatentStore(p) for p in stores], repeats=[2, 1])
    expected = _expected(view, 5, 2, 2)
    made = len(BucketBatchSampler(view, 5))
    assert made % 2 == 1  # the batches do not divide evenly: the remainder rule is at work
    for rank, log in enumerate(logs):
        assert log["world_size"] == 2 and log["len"] == [(made + 1) // 2] * 2
        assert [len(e) for e in log["epochs"]] == log["len"]
        assert log["epochs"] == expected[rank]  # the real run saw exactly what the sampler promised, flips too
    for epoch in (0, 1):
        seen = collections.Counter((s, k) for log in logs for b in log["epochs"][epoch] for s, k, _ in b)
        assert all(seen[0, k] >= 2 for k in view.stores[0]) and all(seen[1, k] >= 1 for k in view.stores[1])


def test_accelerate_two_processes_see_every_sample_once_per_epoch(stores, tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed: pip install accelerate")
    _torchrun(
        tmp_path, [str(stores[0]), "--batch-size", "3", "--epochs", "2", "--accelerate", "--record", str(tmp_path)]
    )
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    view = TrainingDataset(LatentStore(stores[0]))
    assert len(BucketBatchSampler(view, 3)) % 2 == 0  # no round to fill: exactly once is the promise
    expected = _expected(view, 3, 2, 2)
    for rank, log in enumerate(logs):
        assert log["world_size"] == 2 and log["epochs"] == expected[rank] and log["len"][0] == len(log["epochs"][0])
    for epoch in (0, 1):
        seen = collections.Counter(k for log in logs for b in log["epochs"][epoch] for _, k, _ in b)
        assert seen == {k: 1 for k in view.store}
