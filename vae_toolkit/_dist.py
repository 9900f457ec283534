"""torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, read in one place, and the few collectives the commands use.

``encode`` and ``evaluate`` split their work the same way: a process group only when ``WORLD_SIZE > 1``
(``nccl`` for a CUDA model, else ``gloo``), ``barrier`` / ``gather`` / ``broadcast`` of small Python objects,
and ``destroy_process_group`` at the end, also on errors (accelerate's ``PartialState`` does the same).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


def env_rank() -> int:
    """This process's global rank as the launcher set it (``RANK``; 0 when unset or malformed), before any process
    group exists: the commands check what only rank 0 writes on rank 0 alone."""
    try:
        return max(0, int(os.environ.get("RANK", "0") or 0)) if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else 0
    except ValueError:
        return 0


@dataclass
class ProcessGroup:
    """This process's rank and the world size; a ``torch.distributed`` process group when > 1 rank."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> ProcessGroup:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but this torch build has no torch.distributed; run a single process"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        # ranks wait for each other only at the end of their part, which can differ by hours on a big dataset
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=24))
        logger.info("initialised torch.distributed (%s): rank %d of %d", backend, dist.get_rank(), world_size)
        return cls(dist.get_rank(), dist.get_world_size(), owns_group=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
