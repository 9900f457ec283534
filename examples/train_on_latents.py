"""Train on latent stores with several processes, under torchrun (DDP) or accelerate.

    torchrun --nproc_per_node=8 examples/train_on_latents.py sdxl-latents/ --epochs 10
    torchrun --nproc_per_node=8 examples/train_on_latents.py photos-latents/ faces-latents/ --repeats 1 3
    accelerate launch examples/train_on_latents.py sdxl-latents/ --accelerate

The data path is the one a real trainer uses: ``TrainingDataset`` (one store or several, with repeats) ->
``BucketBatchSampler`` (one shape per batch, split per rank, the same number of batches on every rank) ->
``DataLoader``. The model is a stand-in: a convolution that predicts the noise added to a latent,
conditioned on SDXL's ``time_ids``. One process (``python examples/train_on_latents.py ...``) works too.

Under accelerate the sampler does the split and the loader is *not* passed to ``accelerator.prepare``:
accelerate would shard the batches again (its ``BatchSamplerShard``), leaving each rank a part of its part
and dropping the batches that are not full. Only the model and the optimizer are prepared; batches are moved
to ``accelerator.device`` by hand.

``--record DIR`` writes ``DIR/rank<R>.json``: per epoch, the batches of this rank as ``[store, key, flipped]``
triples, and ``len(sampler)``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from vae_toolkit import BucketBatchSampler, LatentStore, TrainingDataset


class TinyDenoiser(torch.nn.Module):
    """Predicts the noise of a noisy latent from the latent and SDXL's ``time_ids`` (a stand-in for a UNet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.cond = torch.nn.Linear(6, channels)

    def forward(self, noisy: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        return self.conv(noisy) + self.cond(time_ids / 1024)[:, :, None, None]


def loss_of(model: torch.nn.Module, latents: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    noise = torch.randn_like(latents)
    sigma = torch.rand(latents.shape[0], 1, 1, 1, device=latents.device)
    return F.mse_loss(model(latents + sigma * noise, time_ids), noise)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("stores", nargs="+", help="latent store folders (encode --buckets ... [--flip])")
    parser.add_argument("--repeats", type=int, nargs="+", help="times per epoch, one per store (default 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (persistent)")
    parser.add_argument("--drop-last", action="store_true", help="leave out short batches (see the sampler)")
    parser.add_argument("--accelerate", action="store_true", help="run under accelerate instead of plain DDP")
    parser.add_argument("--record", type=Path, help="write each rank's batches to RECORD/rank<R>.json")
    return parser.parse_args(argv)


def make_loader(
    args: argparse.Namespace, world_size: int, rank: int
) -> tuple[TrainingDataset, BucketBatchSampler, torch.utils.data.DataLoader]:
    view = TrainingDataset([LatentStore(p) for p in args.stores], repeats=args.repeats, seed=args.seed)
    sampler = BucketBatchSampler(
        view, batch_size=args.batch_size, seed=args.seed, drop_last=args.drop_last, num_replicas=world_size, rank=rank
    )
    loader = torch.utils.data.DataLoader(
        view, batch_sampler=sampler, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    return view, sampler, loader


def train_ddp(args: argparse.Namespace, log: dict) -> None:
    """Plain torchrun: one process per device, the process group set up here (gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        view, sampler, loader = make_loader(args, world_size, rank)
        model = TinyDenoiser(int(view.shapes[0][0])).to(device)
        if world_size > 1:
            model = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)  # the order, and (sent with every index) the flips and draws
            for batch in loader:  # len(loader) batches on every rank: the all-reduce never waits for a rank
                latents = batch["latent"].to(device)  # [B, 4, h, w], one shape per batch
                time_ids = batch["time_ids"].to(device)  # [B, 6]: original_size + crop + target_size
                loss = loss_of(model, latents, time_ids)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                record(log, epoch, batch, loss)
            log["len"].append(len(sampler))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train_accelerate(args: argparse.Namespace, log: dict) -> None:
    """accelerate: the sampler splits the batches; only the model and the optimizer are prepared."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    view, sampler, loader = make_loader(args, accelerator.num_processes, accelerator.process_index)
    model = TinyDenoiser(int(view.shapes[0][0]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)  # not the loader: it is split per rank already
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            latents = batch["latent"].to(accelerator.device)
            time_ids = batch["time_ids"].to(accelerator.device)
            loss = loss_of(model, latents, time_ids)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            record(log, epoch, batch, loss)
        log["len"].append(len(sampler))
    accelerator.end_training()


def record(log: dict, epoch: int, batch: dict, loss: torch.Tensor) -> None:
    while len(log["epochs"]) <= epoch:
        log["epochs"].append([])
    items = zip(batch["store"].tolist(), batch["key"], batch["flipped"].tolist(), strict=True)
    log["epochs"][epoch].append([[s, k, f] for s, k, f in items])
    log["loss"] = loss.item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    log: dict = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "epochs": [], "len": []}
    (train_accelerate if args.accelerate else train_ddp)(args, log)
    if rank == 0:
        batches, loss = (log["len"][-1] if log["len"] else 0), log.get("loss", float("nan"))
        print(f"{len(log['epochs'])} epoch(s), {batches} batches per rank per epoch, last loss {loss:.4f}")
    if args.record:
        args.record.mkdir(parents=True, exist_ok=True)
        (args.record / f"rank{rank}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    main()
