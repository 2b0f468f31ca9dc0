"""What tests/test_distributed.py runs under torchrun (and, for one process, in itself).

    python -m torch.distributed.run --nproc-per-node 2 tests/ranks_driver.py train OUT.json
        DISP on a tiny model, data-parallel, the frozen model replicated and then sharded (FSDP2,
        with the paper's objective and with --objective kl), then recovery of a magnitude plan, data-parallel and sharded; rank 0 writes the plans,
        loss traces and recovered tensors as JSON.
    python -m torch.distributed.run --nproc-per-node 2 tests/ranks_driver.py search OUT.json
        Týr on a tiny model, the ranks scoring candidates in turns; rank 0 writes plan and trace.
    python -m torch.distributed.run --nproc-per-node 2 tests/ranks_driver.py fail RANK ARGS...
        `compress ARGS...`, where rank RANK raises at DISP's third step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from compress.adapters import get_adapter  # noqa: E402
from compress.distributed import World, join  # noqa: E402
from compress.methods.disp import DISP  # noqa: E402
from compress.methods.tyr import Tyr  # noqa: E402
from compress.pipeline import prune  # noqa: E402
from compress.recover import recover  # noqa: E402
from tiny import tiny_model  # noqa: E402

CALIB = torch.randint(0, 4096, (16, 16), generator=torch.Generator().manual_seed(0))

METHODS = {"train": (DISP, {"steps": 20, "batch_size": 4, "lr": 1e-2}),
           "search": (Tyr, {"iterations": 1, "generations": 3, "offspring": 12, "fidelity_windows": [1, 4],
                            "hessian_windows": 8})}


def train(world: World, mode: str = "train", **extra) -> dict:
    """The plan and trace (DISP: per-step losses; Týr: per-iteration fitness) on a tiny Llama, this
    process doing its share."""
    model = tiny_model("llama")
    cls, settings = METHODS[mode]
    method = cls(**settings, **extra)
    method.world = world
    plan = method.prune(model, get_adapter(model.config), 0.5, CALIB, seed=0).plan
    return {"plan": plan.to_dict(), "trace": method.trace}


def recovered(world: World) -> dict:
    """Recovery of a magnitude plan of the tiny Llama: its held-out KL and trained tensors."""
    model = tiny_model("llama")
    rec = recover(model, prune(model, "magnitude", 0.5), CALIB[4:], steps=4, batch_size=4,
                  held_out=CALIB[:4], progress=False, world=world)
    return {"kl": rec.record["held_out_kl_after"], "tensors": {k: v.tolist() for k, v in rec.replaced.items()}}


def fail_at_third_step(rank: int, world: World) -> None:
    """Make DISP raise on `rank` at its third training step."""
    loss, calls = DISP._masked_loss, [0]

    def failing(self, *args):
        calls[0] += 1
        if world.rank == rank and calls[0] == 3:
            raise ValueError(f"a failure planted on rank {rank}")
        return loss(self, *args)

    DISP._masked_loss = failing


if __name__ == "__main__":
    if sys.argv[1] in METHODS:
        world, _ = join(torch.device("cpu"))
        result = train(world, sys.argv[1])
        if sys.argv[1] == "train":
            world.shard = "fsdp"
            result = {"replicate": result, "fsdp": train(world), "kl": train(world, objective="kl"),
                      "recover": recovered(world)}
        if world.writer:
            Path(sys.argv[2]).write_text(json.dumps(result))
        world.close()
    else:
        import os

        from compress.cli import main

        fail_at_third_step(int(sys.argv[2]), World(int(os.environ["RANK"])))
        sys.exit(main(sys.argv[3:]))
