"""Which of how many processes this is, and the few messages data-parallel training needs.

`torchrun` and `accelerate launch` start one process per device and give each its RANK,
WORLD_SIZE and LOCAL_RANK in the environment; `join` makes them one process group (NCCL between
CUDA devices, gloo on CPUs). A process started alone is `World()`: rank 0 of 1, every message a
no-op, so a training loop has one code path. Rank 0 is the writer: it saves training state and
writes the export; the others wait for its outcome (over a gloo group without a practical
timeout, since checking and writing a large model can outlast the default half hour).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from compress.errors import CompressError

__all__ = ["World", "join"]

WRITER_WAIT = datetime.timedelta(days=7)  # how long the other ranks wait for rank 0's export


@dataclass
class World:
    rank: int = 0
    size: int = 1
    group: object = None  # the gloo group for CPU-side messages (None alone)
    shard: str = "replicate"  # how training holds the frozen dense model: whole, or FSDP2 shards (compress.sharding)
    device: torch.device | None = None  # this process's training device (None: the model's own)

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (every rank draws the same global batches)."""
        if batch.shape[0] % self.size:
            raise CompressError(f"a batch of {batch.shape[0]} windows does not split over {self.size} processes: "
                                f"make --batch-size a multiple of {self.size} (and at most the calibration windows)")
        n = batch.shape[0] // self.size
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks (the global loss from each rank's share)."""
        if self.size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is on any (so all stop at the same step)."""
        if self.size == 1:
            return flag
        t = torch.tensor([float(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def turns(self, items: list) -> list:
        """This rank's items when the ranks take turns: r, r + size, r + 2 size, ..."""
        return items[self.rank::self.size]

    def gather(self, mine: list[float], n: int, device: torch.device) -> list[float]:
        """All `n` values, in order, from each rank's values of its `turns`."""
        if self.size == 1:
            return mine
        t = torch.zeros(-(-n // self.size), dtype=torch.float64, device=device)
        t[:len(mine)] = torch.tensor(mine, dtype=torch.float64)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t)
        return [parts[i % self.size][i // self.size].item() for i in range(n)]

    def broadcast_bytes(self, data: bytes | None) -> bytes | None:
        """Rank 0's bytes (None: nothing) on every rank: a saved state read once, wherever it lives."""
        if self.size == 1:
            return data
        n = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64)
        dist.broadcast(n, 0, group=self.group)
        if n.item() < 0:
            return None
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.writer else torch.empty(int(n.item()),
                                                                                                  dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        return data if self.writer else buf.numpy().tobytes()

    def outcome(self, ok: bool = True) -> bool:
        """Rank 0 tells the others whether its export succeeded; they wait for it here."""
        if self.size == 1:
            return ok
        t = torch.tensor([int(ok)], dtype=torch.uint8)
        dist.broadcast(t, 0, group=self.group)
        return bool(t.item())

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def join(device: torch.device) -> tuple[World, torch.device]:
    """(this process's World, its device): under a launcher, the process group joined and CUDA's
    device the local rank's; alone, World() and `device` unchanged."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, dist.new_group(backend="gloo", timeout=WRITER_WAIT), device=device), device
