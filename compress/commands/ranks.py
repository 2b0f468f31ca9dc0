"""`compress export` under `torchrun` / `accelerate launch`, and resuming a stopped export.

Every rank loads the dense model whole (`--shard replicate`) and calls `prune` alike: DISP trains
data-parallel, each rank on its share of every global batch, the hypernetwork's gradients averaged
by DDP; Týr's ranks score its candidates in turns; the other methods run on rank 0 alone. Rank 0 alone
evaluates, checks and writes; the others wait for its outcome and exit 0 (1 if it failed). A
rank's error is one line naming the rank, and the launcher then stops the others. A training
method keeps its state in `<out>.partial/` (every --save-every seconds, and on Ctrl-C); the same
command resumes from it, and a written export removes it.
"""

from __future__ import annotations

import argparse
import contextlib
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


def add_save_argument(g) -> None:
    """--save-every, for every command that trains."""
    g.add_argument("--save-every", type=float, default=SAVE_EVERY, metavar="SECONDS",
                   help="training (disp, tyr+disp, recover): save its state to OUT.partial/ this often and on "
                        "Ctrl-C; the same command run again resumes from it; 0: never")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resuming, and several processes (torchrun, accelerate launch)")
    add_save_argument(g)
    g.add_argument("--shard", choices=SHARDING, default="auto",
                   help="under torchrun: replicate = every process holds the whole frozen dense model (auto); "
                        "fsdp (one shard each) is not offered yet. disp trains data-parallel (--batch-size is "
                        "the global batch, split over the processes), tyr scores its candidates in turns, "
                        "tyr+disp both; the other methods run on rank 0 alone; rank 0 writes")


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

    def wait(self) -> int:
        """A rank other than 0: wait for rank 0's export; 0 if it was written."""
        return 0 if self.world.outcome() else 1

    def done(self) -> None:
        """Rank 0, the export written: its training state goes, the others are released."""
        if self.store is not None:
            self.store.remove()
        self.world.outcome(True)


def run_ranks(args: argparse.Namespace, body, data_parallel: bool) -> int:
    """`body(args, session)` in this process's session; one line per rank for any error."""
    from compress.checkpoint import StateStore, partial_folder
    from compress.distributed import World, join
    from compress.loading import resolve_device

    if args.shard == "fsdp":
        raise CompressError("--shard fsdp is not offered yet: every process holds the whole dense model "
                            "(--shard replicate); see --dry-run for the memory a training step needs")
    world, device = join(resolve_device(args.device))
    # only the training methods keep state, and they are the data-parallel ones
    store = StateStore(partial_folder(args.out), args.save_every, world) if data_parallel and args.save_every > 0 \
        else None
    session = Session(world, world if data_parallel else World(), device, store)
    try:
        if not (data_parallel or world.writer):  # a method rank 0 runs alone
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
