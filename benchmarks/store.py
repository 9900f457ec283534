"""Benchmark the latent store at the scale users run: 10k, 100k and 1M entries (format 2).

Run from the repository root, with nothing else running::

    python benchmarks/store.py                    # 10k, 100k, 1M; about 5 minutes on 2 cores, ~1 GB of disk
    python benchmarks/store.py --sizes 10000,100000 --check

Each store is built synthetically in the real format (shards of 8,192 latents written by the store's own
writer, then the index written by the store's own commit), with small latents ([4, 2, 2] float16) so that
the disk stays small: the store's costs depend on the number of keys, not on the latents' size. Measured:

- opening ``LatentStore`` (median of 5); target <= 0.3 s at 1M;
- the store side of a rerun with nothing new: reading the index and table, checking every listed shard,
  matching the source's keys, sizes and mtimes (``_scan`` + ``_plan``, what ``encode_dataset`` does after
  walking the source); targets <= 2 s and <= +200 MB at 1M;
- writing the index at the end of a run that added 1,000 entries (``_commit``: merge the table with the new
  shard, write table and index); targets <= 3 s and <= +300 MB at 1M;
- private dirty memory (``/proc/PID/smaps_rollup``) of each of 4 forked DataLoader workers after one shuffled
  epoch over the store; target <= 50 MB, flat in N; beside it the same loader over a dataset without a store
  (what any forked worker of a torch process costs: the interpreter's own copy-on-write pages);
- the source side, separately: walking and ``stat``-ing a folder of 20,000 files, per file.

Peak memory is the rise of the process's peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) over its
RSS before the step, each step in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from vae_toolkit import encoding, sources, store_files, store_update
from vae_toolkit.dataset import LatentStore

KEYS_PER_SHARD = 8192
SETTINGS = {
    "format": store_files.FORMAT,
    "format_version": store_files.FORMAT_VERSION,
    "vae_toolkit_version": "bench",
    "model": "bench",
    "repo_id": None,
    "subfolder": None,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latent_channels": 4,
    "dtype": "float16",
    "vae_dtype": "float32",
    "size": 512,
    "sample": False,
    "seed": None,
    "reader": "fast",
}


def key(i: int) -> str:
    return f"train/n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG"  # ImageNet-like paths


def source(n: int) -> sources.Source:
    """The source listing (as the walk returns it) of the images of a store of ``n`` entries."""
    keys = sorted(key(i) for i in range(n))
    stats = [(100_000 + i, 1_700_000_000_000_000_000 + i) for i in range(n)]
    return sources.Source(Path("/data"), keys, stats, {}, is_folder=True)


def build(folder: Path, n: int) -> sources.Source:
    """A store of ``n`` entries in the real format, and the source listing that matches it."""
    folder.mkdir(parents=True)
    src = source(n)
    keys, stats = src.keys, src.stats
    writer = encoding._ShardWriter(folder, "0123456789ab", 0, SETTINGS, 2**62, float("inf"))
    z = torch.zeros(4, 2, 2, dtype=torch.float16)
    for i, k in enumerate(keys):
        writer.add(k, z.clone(), {"size": [512, 512], "source_bytes": stats[i][0], "source_mtime_ns": stats[i][1]})
        if len(writer.tensors) == KEYS_PER_SHARD:
            writer.flush()
    writer.flush()
    state = store_files.scan_store(folder)
    _, merge = store_update.plan_run(state, src, keep_missing=False)
    store_update.commit_run(folder, merge, [], SETTINGS, {}, src.root)
    state.close()
    return src


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measured(step, heap: bool = False):  # -> (seconds, peak MB, result)
    """Time ``step``; its peak memory as the rise of the peak RSS, or with ``heap`` as tracemalloc's peak
    (every Python and numpy allocation, also those that reuse memory the process already holds)."""
    import tracemalloc

    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    if heap:
        tracemalloc.start()
    start = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - start
    if heap:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        return seconds, peak, result
    return seconds, (_status("VmHWM") - before) / 2**20, result


def rerun_store_side(folder: Path, src: sources.Source):
    state = store_files.scan_store(folder)
    plan, merge = store_update.plan_run(state, src, keep_missing=False)
    assert plan.up_to_date and not plan.todo, plan
    return merge


def index_write(folder: Path, src: sources.Source, added: int, heap: bool = False):
    """The end of a run that encoded ``added`` new images: their shard, then the commit."""
    new_keys = sorted(f"new{'-heap' if heap else ''}/{i:06d}.jpg" for i in range(added))  # a prefix per run
    with LatentStore(folder) as store:
        before = len(store)
    state = store_files.scan_store(folder)  # planned before the run encodes, as encode_dataset does
    assert new_keys[-1] < src.keys[0]  # "new/..." sorts before "train/...": the listing stays sorted
    both = sources.Source(src.root, new_keys + src.keys, [(1, 1)] * added + src.stats, {}, True)
    plan, merge = store_update.plan_run(state, both, keep_missing=True)
    assert plan.todo == new_keys, len(plan.todo)
    writer = encoding._ShardWriter(folder, uuid.uuid4().hex[:12], 0, SETTINGS, 2**62, float("inf"))
    z = torch.zeros(4, 2, 2, dtype=torch.float16)
    for k in new_keys:
        writer.add(k, z.clone(), {"size": [512, 512], "source_bytes": 1, "source_mtime_ns": 1})
    writer.flush()

    def commit():
        store_update.commit_run(folder, merge, writer.written, SETTINGS, {}, src.root)

    seconds, peak, _ = measured(commit, heap)
    state.close()
    with LatentStore(folder) as store:
        assert len(store) == before + added and new_keys[0] in store
    return seconds, peak


def child(step: str, folder: Path, n: int) -> None:
    """One step in a fresh process, so that its peak memory is its own: prints seconds and peak MB."""
    src = source(n)
    heap = step.endswith("-heap")
    if step.startswith("scan"):
        seconds, peak, merge = measured(lambda: rerun_store_side(folder, src), heap)
        merge.state.close()
    else:
        seconds, peak = index_write(folder, src, 1000, heap)
    print(seconds, peak)


def in_child(step: str, folder: Path, n: int) -> tuple[float, float, float]:
    """(seconds, peak RSS rise MB, heap peak MB) of ``step``, each from its own fresh process."""
    import subprocess

    values = []
    for variant in (step, f"{step}-heap"):
        cmd = [sys.executable, __file__, "--child", variant, str(folder), str(n)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        values.append([float(v) for v in out.stdout.split()])
    return values[0][0], values[0][1], values[1][1]


WORKER = """
import os, sys, torch
from pathlib import Path
from vae_toolkit.dataset import LatentStore

def private_dirty(pid):
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
class Baseline(torch.utils.data.Dataset):  # the same loader over no store: what any forked worker costs
    def __len__(self):
        return int(sys.argv[2])
    def __getitem__(self, i):
        return torch.zeros(4, 2, 2, dtype=torch.float16)
store = LatentStore(sys.argv[1]) if sys.argv[1] != "-" else Baseline()
loader = torch.utils.data.DataLoader(store, batch_size=512, shuffle=True, num_workers=4,
                                     multiprocessing_context="fork", persistent_workers=True)
n = 0
for batch in loader:
    n += len(batch)
assert n == len(store), n
pids = [w.pid for w in loader._iterator._workers]
print(max(private_dirty(p) for p in pids), private_dirty(os.getpid()))
"""


def worker_memory(folder: Path | str, n: int) -> tuple[float, float]:
    import subprocess

    cmd = [sys.executable, "-c", WORKER, str(folder), str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    worker, parent = (float(v) for v in out.stdout.split())
    return worker, parent


def walk_cost(tmp: Path, n: int = 20_000) -> float:
    src = tmp / "walk"
    for i in range(n):
        folder = src / f"d{i % 100:03d}"
        if i < 100:
            folder.mkdir(parents=True)
        (folder / f"{i:06d}.jpg").write_bytes(b"")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        found = sources.scan_source(src)
        times.append(time.perf_counter() - start)
        assert len(found.keys) == n
    return statistics.median(times) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target at the largest size is missed")
    parser.add_argument("--child", nargs=3, metavar=("STEP", "FOLDER", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="vae_toolkit_bench_store_", dir=os.environ.get("BENCH_TMP")) as tmp_name:
        tmp = Path(tmp_name)
        per_file = walk_cost(tmp)
        print(f"source walk + stat: {per_file * 1e6:.1f} µs per file ({per_file * 1e6:.0f} s per million)", flush=True)
        for n in sizes:
            folder = tmp / f"store{n}"
            start = time.perf_counter()
            build(folder, n)
            built = time.perf_counter() - start
            index = json.loads((folder / store_files.INDEX_NAME).read_text())
            table_mb = index["table"]["bytes"] / 2**20
            opens = []
            for _ in range(5):
                seconds, _, store = measured(lambda: LatentStore(folder))  # noqa: B023 - called at once
                opens.append(seconds)
                assert len(store) == n
                store.close()
            scan_s, scan_mb, scan_heap = in_child("scan", folder, n)
            write_s, write_mb, write_heap = in_child("write", folder, n)
            worker_mb, parent_mb = worker_memory(folder, n)
            baseline_mb, _ = worker_memory("-", n)
            rows[n] = {
                "index JSON KB": (folder / store_files.INDEX_NAME).stat().st_size / 1024,
                "table MB": table_mb,
                "open s": statistics.median(opens),
                "rerun scan s": scan_s,
                "rerun scan MB": scan_mb,
                "rerun scan heap MB": scan_heap,
                "index write s": write_s,
                "index write MB": write_mb,
                "index write heap MB": write_heap,
                "worker private MB": worker_mb,
                "worker private MB, no store": baseline_mb,
            }
            figures = json.dumps({k: round(v, 3) for k, v in rows[n].items()})
            print(f"{n:>9,} entries (built in {built:.0f} s): {figures}", flush=True)
    targets = {"open s": 0.3, "rerun scan s": 2, "rerun scan MB": 200, "rerun scan heap MB": 200, "index write s": 3,
               "index write MB": 300, "index write heap MB": 300, "worker private MB": 50}  # fmt: skip
    print()
    print("| measure | " + " | ".join(f"{n:,}" for n in sizes) + " | per key | target at 1M |")
    print("|---|" + "---|" * (len(sizes) + 2))
    ok = True
    for name in rows[sizes[0]]:
        values = [rows[n][name] for n in sizes]
        growth = (values[-1] - values[0]) / (sizes[-1] - sizes[0]) if len(sizes) > 1 else 0.0
        unit = name.split(",")[0].split()[-1]
        per_key = f"{growth * 1e6:.2f} µs" if unit == "s" else f"{growth * 2**20:.1f} B" if unit == "MB" else (
            f"{growth * 1024:.3f} B")  # fmt: skip
        target = targets.get(name)
        missed = target is not None and values[-1] > target
        ok &= not missed
        cells = " | ".join(f"{v:.3f}" if unit == "s" else f"{v:.1f}" for v in values)
        print(f"| {name} | {cells} | {per_key} | {'' if target is None else f'<= {target}'}"
              f"{' (missed)' if missed else ''} |")  # fmt: skip
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
