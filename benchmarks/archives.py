"""Benchmark tar shards as a source: reading speed against a folder, and planning a rerun at 10,000 shards.

Run from the repository root, with nothing else running::

    python benchmarks/archives.py                    # both parts; about 2 minutes on 2 cores, ~1.2 GB of disk
    python benchmarks/archives.py --skip-planning    # only the reading speed
    python benchmarks/archives.py --check            # exit 1 when a target is missed

1. Reading: the same camera-like JPEGs (``benchmarks/buckets.py``'s, default 48) encoded from a folder and
   from 4 tar shards of them (webdataset's layout, a ``.txt`` beside each image), ``encode_dataset(size=A)``,
   in one run, rounds interleaved, medians. Target: tar >= 0.9x the folder's images per second.
2. Planning: a rerun with nothing new over 10,000 shards of 1,000 samples (10M entries), everything on the
   store's side real except how it was filled: the table (10M rows, the real table format, written by the
   store's own table writer) and the index (the real index, with its per-shard records) are written directly,
   not by encoding 10M latents; the shard files are empty files with their own size and mtime. Measured: the
   source listing (a ``stat`` per shard), :func:`vae_toolkit.store_files.scan_store` (index, table and its
   checksum) and :func:`vae_toolkit.archives.plan_archives`, in a fresh process. Target: the whole < 2 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from buckets import make_photos, timed
from dataset import make_vae
from store import SETTINGS

from vae_toolkit import _table, encoding, store_files

KEY_WIDTH = 9  # member names 000000000.jpg .. (webdataset's sample keys)


def make_shards(photos: Path, out: Path, shards: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(photos.glob("*.jpg"))
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for path in files[s::shards]:
                tar.add(path, arcname=path.name)
                txt = path.with_suffix(".txt")
                txt.write_text("a caption")
                tar.add(txt, arcname=txt.name)
                txt.unlink()


def reading(args: argparse.Namespace) -> dict[str, object]:
    vae = make_vae()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_photos(tmp / "src", args.images)
        make_shards(tmp / "src", tmp / "shards", 4)
        timed(vae, tmp / "src", tmp / "warm", args.batch_size, size=args.area)  # warm-up
        runs: dict[str, list[float]] = {"folder": [], "tar": []}
        for _ in range(args.rounds):
            runs["folder"].append(timed(vae, tmp / "src", tmp / "a", args.batch_size, size=args.area))
            runs["tar"].append(timed(vae, tmp / "shards", tmp / "b", args.batch_size, size=args.area))
    median = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "images": args.images,
        "area": args.area,
        "torch_threads": torch.get_num_threads(),
        "seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "images_per_second": {k: round(args.images / v, 2) for k, v in median.items()},
        "tar_vs_folder": round(median["folder"] / median["tar"], 3),
    }


def build_store(folder: Path, shards: int, per_shard: int) -> Path:
    """A store of ``shards * per_shard`` entries of tar members, and the folder of (empty) shard files."""
    source = folder / "shards"
    source.mkdir(parents=True)
    stats = []
    for s in range(shards):
        path = source / f"{s:05d}.tar"
        path.write_bytes(b"")
        st = path.stat()
        stats.append((st.st_size, st.st_mtime_ns))
    out = folder / "store"
    out.mkdir()
    writer = encoding._ShardWriter(out, "0123456789ab", 0, SETTINGS, 2**62, float("inf"))  # one real shard
    writer.add("00000.tar/000000000.jpg", torch.zeros(4, 2, 2, dtype=torch.float16),
               {"size": [512, 512], "source_bytes": stats[0][0], "source_mtime_ns": stats[0][1]})  # fmt: skip
    writer.flush()
    shard_name = writer.written[0]
    n = shards * per_shard
    width = len("00000.tar/") + KEY_WIDTH + len(".jpg") + 1  # with the NUL
    blob = np.zeros((n, width), dtype=np.uint8)
    shard_ids = np.repeat(np.arange(shards), per_shard)
    sample_ids = shard_ids * per_shard + np.tile(np.arange(per_shard), shards)
    for pos, div in enumerate([10**4, 10**3, 10**2, 10, 1]):
        blob[:, pos] = ord("0") + shard_ids // div % 10
    blob[:, 5:10] = np.frombuffer(b".tar/", dtype=np.uint8)
    for pos in range(KEY_WIDTH):
        blob[:, 10 + pos] = ord("0") + sample_ids // 10 ** (KEY_WIDTH - 1 - pos) % 10
    blob[:, 10 + KEY_WIDTH : width - 1] = np.frombuffer(b".jpg", dtype=np.uint8)
    offsets = np.arange(n + 1, dtype=np.int64) * width
    sizes = np.array([s[0] for s in stats], dtype=np.int64)
    mtimes = np.array([s[1] for s in stats], dtype=np.int64)
    columns = {}
    for name, (dtype, cols) in _table.COLUMNS.items():
        columns[name] = np.zeros((n, cols) if cols > 1 else (n,), dtype=dtype)
    columns["offset"][:] = 8
    columns["nbytes"][:] = 32
    columns["shape"][:] = (4, 2, 2)
    columns["size"][:] = (512, 512)
    columns["source_bytes"][:] = sizes[shard_ids]
    columns["source_mtime_ns"][:] = mtimes[shard_ids]
    table_name = "latents-table-0123456789ab.bin"
    rows = _table.Rows(offsets, blob.reshape(-1), columns)
    table_bytes, table_sha = store_files.atomic_write(out / table_name, lambda f: _table.write_table(f, rows))
    header_json, size = store_files.read_header(out / shard_name)
    import zlib

    index = {
        "metadata": {**SETTINGS, "count": n, "total_size": size, "source": str(source), "updated": "now"},
        "shards": [
            {
                "file": shard_name,
                "bytes": size,
                "header_bytes": len(header_json),
                "header_crc32": zlib.crc32(header_json),
            }
        ],  # fmt: skip
        "table": {"file": table_name, "bytes": table_bytes, "sha256": table_sha},
        "failures": {},
        "retired": [],
        "archives": {f"{s:05d}.tar": [stats[s][0], stats[s][1], per_shard] for s in range(shards)},
    }
    (out / store_files.INDEX_NAME).write_text(json.dumps(index))
    return source


CHILD = """
import sys, time, json
from pathlib import Path
from vae_toolkit import archives, store_files
source, store = Path(sys.argv[1]), Path(sys.argv[2])
t0 = time.perf_counter()
src = archives.archive_source(source)
t1 = time.perf_counter()
state = store_files.scan_store(store)
t2 = time.perf_counter()
plan, merge, archived = archives.plan_archives(state, src, keep_missing=False)
t3 = time.perf_counter()
assert plan.up_to_date and not plan.todo and plan.skipped == state.table.count, plan
print(json.dumps({"listing": t1 - t0, "scan_store": t2 - t1, "plan_archives": t3 - t2, "total": t3 - t0,
                  "entries": state.table.count, "shards": len(src.shards)}))
"""


def planning(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        source = build_store(tmp, args.shards, args.per_shard)
        built = time.perf_counter() - start
        runs = []
        for _ in range(3):
            proc = subprocess.run([sys.executable, "-c", CHILD, str(source), str(tmp / "store")], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            runs.append(json.loads(proc.stdout))
        shutil.rmtree(tmp, ignore_errors=True)
    best = min(runs, key=lambda r: r["total"])
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()}
    return {"build_seconds": round(built, 1), **rounded, "totals": [round(r["total"], 3) for r in runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--area", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--per-shard", type=int, default=1_000)
    parser.add_argument("--skip-planning", action="store_true")
    parser.add_argument("--skip-reading", action="store_true")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    result: dict[str, object] = {}
    ok = True
    if not args.skip_reading:
        result["reading"] = read = reading(args)
        ok &= float(read["tar_vs_folder"]) >= 0.9  # type: ignore[arg-type]
    if not args.skip_planning:
        result["planning"] = plan = planning(args)
        ok &= float(plan["total"]) < 2.0  # type: ignore[arg-type]
    print(json.dumps(result, indent=1))
    if args.check and not ok:
        print("a target is missed: tar >= 0.9x folder, planning < 2 s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
