"""`compress export` under `torchrun` / `accelerate launch`, and resuming a stopped export.

Every rank loads the dense model whole and calls `prune` alike: DISP trains data-parallel, each
rank on its share of every global batch, the hypernetwork's gradients averaged by DDP, the frozen
model whole on every device (`--shard replicate`) or sharded over them with FSDP2 (`--shard fsdp`,
compress.sharding; the loaded model then stays in host memory); Týr's ranks score its candidates in
turns; the other methods run on rank 0 alone, which then hands its result to the others when
`--recover` follows. Recovery trains data-parallel like DISP. Rank 0 alone evaluates, checks and
writes; the others wait for its outcome and exit 0 (1 if it failed). A rank's error is one line
naming the rank, and the launcher then stops the others. A training method keeps its state in
`<out>.partial/` (every --save-every seconds, and on Ctrl-C); the same command resumes from it,
and a written export removes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compress.errors import CompressError

if TYPE_CHECKING:  # torch-free at import: the command line's parser imports this module
    import torch

    from compress.checkpoint import StateStore
    from compress.distributed import World

SHARDING = ("auto", "replicate", "fsdp")
SAVE_EVERY = 300.0  # seconds between saves of the training state, by default


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resuming, and several processes (torchrun, accelerate launch)")
    g.add_argument("--save-every", type=float, default=SAVE_EVERY, metavar="SECONDS",
                   help="training and search (disp, tyr, tyr+disp, recover): save its state to OUT.partial/ this "
                        "often and on Ctrl-C; the same command run again resumes from it; 0: never")
    g.add_argument("--shard", choices=SHARDING, default="auto",
                   help="under torchrun, how DISP's and --recover's training holds the frozen dense model: "
                        "replicate = whole on every device; fsdp = FSDP2 shards, 1/N of each layer's weights per "
                        "device (the loaded model stays in host memory; disp, tyr+disp and --recover only); "
                        "auto = fsdp on CUDA when a replicated DISP step does not fit the device, else "
                        "replicate. disp and --recover train data-parallel (--batch-size is the global batch, "
                        "split over the processes), tyr scores its candidates in turns, tyr+disp both; the "
                        "other methods run on rank 0 alone; rank 0 writes")


@dataclass
class Session:
    """This process's part in an export: its rank, device and where training state is kept."""

    world: World  # every process of the run
    team: World  # the processes that train together: the world, or rank 0 alone for a method that shares none
    device: torch.device
    store: StateStore | None = None
    trained: bool = False  # rank 0 is past training: the others wait for its outcome

    def prune_options(self) -> dict:
        return {"store": self.store, "world": self.team}

    def shared_result(self, result):
        """Rank 0's pruning result on every rank (a method rank 0 ran alone, before a shared recovery)."""
        if self.team.size == self.world.size:
            return result
        from safetensors.torch import load, save

        from compress.checkpoint import metadata_of
        from compress.methods.base import PruneResult
        from compress.plan import Plan

        data = self.world.broadcast_bytes(save({k: v.contiguous().cpu() for k, v in result.replaced.items()},
                                               {"plan": json.dumps(result.plan.to_dict())})
                                          if self.world.writer else None)
        if self.world.writer:
            return result
        return PruneResult(Plan.from_dict(json.loads(metadata_of(data)["plan"])), load(data))

    def wait(self) -> int:
        """A rank other than 0: wait for rank 0's export; 0 if it was written."""
        return 0 if self.world.outcome() else 1

    def done(self) -> None:
        """Rank 0, the export written: its training state goes, the others are released."""
        if self.store is not None:
            self.store.remove()
        self.world.outcome(True)


def run_ranks(args: argparse.Namespace, body, data_parallel: bool, step_bytes=None, recover: bool = False) -> int:
    """`body(args, session)` in this process's session; one line per rank for any error.
    `data_parallel`: the method trains on every rank; `step_bytes()`: a replicated DISP step's bytes
    (for `--shard auto`; None where the method is not DISP); `recover`: recovery follows (every rank
    trains it)."""
    import torch

    from compress.checkpoint import StateStore, partial_folder
    from compress.distributed import World, join
    from compress.loading import resolve_device
    from compress.sharding import resolve_shard

    if args.shard == "fsdp" and step_bytes is None and not recover:
        raise CompressError(f"--shard fsdp shards the frozen model of DISP's training and --recover's; "
                            f"--method {args.method} trains neither: drop --shard")
    world, device = join(resolve_device(args.device))
    world.shard = resolve_shard(args.shard, world.size, device, step_bytes or (lambda: 0))
    if world.shard == "fsdp" and device.type == "cuda":  # the whole model stays on the host, shards go to the GPU
        device = torch.device("cpu")
    # only the training methods keep state: the data-parallel ones and recovery
    store = StateStore(partial_folder(args.out), args.save_every, world) \
        if (data_parallel or recover) and args.save_every > 0 else None
    session = Session(world, world if data_parallel else World(), device, store)
    try:
        if not (data_parallel or recover or world.writer):  # a method rank 0 runs alone
            code = session.wait()
        else:
            with _quiet(not world.writer):
                code = body(args, session)
    except Exception as e:  # no goodbye to the group: a peer may be blocked in a collective, so just exit
        if world.writer and session.trained:
            world.outcome(False)
        if world.size == 1:
            raise
        raise CompressError(f"rank {world.rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    world.close()
    return code


@contextlib.contextmanager
def _quiet(on: bool):
    """Ranks other than 0 print nothing (their progress is rank 0's); errors still go to stderr."""
    if not on:
        yield
        return
    from transformers.utils import logging

    logging.disable_progress_bar()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield
    sys.stdout.flush()
