"""The frozen dense model as a training step sees it: whole on every process (`replicate`), or a
copy sharded over the processes with FSDP2 (`fsdp`, `torch.distributed.fsdp.fully_shard`).

Sharded, each process holds 1/N of every decoder layer's weights on its device and a layer's whole
weights only while that layer runs (forward, and again in backward); the embedding, final norm and
LM head are one more unit, whole for the step. The copy is built on the meta device, sharded layer
by layer, materialised on the training device, and each process copies its own shard of every
weight from the held model (no messages: every process holds the whole model) and the buffers
(rotary tables). The held model is untouched: after training, rank 0 prunes, checks and writes from it.
So on CUDA the held model stays in host memory and only shards go to the GPUs, which is what lets
a model larger than one GPU train on several; on CPU sharding saves nothing (the host holds the
whole model anyway) and gloo runs it to prove the path.

`auto` picks `fsdp` only on CUDA with several processes, when the replicated step's planned memory
(`compress.methods.disp_memory`) does not fit the device's free memory.
"""

from __future__ import annotations

import contextlib

import torch

from compress.adapters import Adapter
from compress.distributed import World
from compress.errors import CompressError

__all__ = ["resolve_shard", "training_model", "training_device"]


def resolve_shard(choice: str, world_size: int, device: torch.device, replicated_bytes) -> str:
    """`choice` (auto, replicate or fsdp) made concrete; `replicated_bytes()`: a replicated training
    step's bytes (asked only when it decides)."""
    if choice == "fsdp" and world_size == 1:
        raise CompressError("--shard fsdp splits the model over several processes: start them with torchrun "
                            "--nproc-per-node N (or accelerate launch)")
    if choice != "auto":
        return choice
    if world_size == 1 or device.type != "cuda":
        return "replicate"
    return "replicate" if replicated_bytes() <= torch.cuda.mem_get_info(device)[0] else "fsdp"


def training_device(model, world: World) -> torch.device:
    """Where training runs: the model's device, or under `fsdp` the process's own."""
    held = next(model.parameters()).device
    return world.device or held if world.shard == "fsdp" and world.size > 1 else held


@contextlib.contextmanager
def training_model(model, adapter: Adapter, world: World):
    """(the model a training step runs, its device): `model` itself, or its FSDP2-sharded copy on
    `world.device` when `world.shard` is "fsdp" (freed on exit)."""
    if world.shard != "fsdp" or world.size == 1:
        yield model, next(model.parameters()).device
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    device = training_device(model, world)
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.to(next(model.parameters()).dtype)
    mesh = init_device_mesh(device.type, (world.size,))
    for layer in adapter.layers(copy):
        fully_shard(layer, mesh=mesh)
    fully_shard(copy, mesh=mesh)
    copy.to_empty(device=device)
    weights, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        for name, p in copy.named_parameters():  # this process's shard, cut from its own whole tensor
            shard = distribute_tensor(weights[name].detach(), mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())
        for name, buf in copy.named_buffers():
            buf.copy_(buffers[name])
    copy.eval().requires_grad_(False)
    yield copy, device
