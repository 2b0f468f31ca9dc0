"""What every pruning method is: a small class that turns a model (+ calibration) into a Plan."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compress.adapters import Adapter
from compress.checkpoint import StateStore
from compress.distributed import World
from compress.plan import Plan

__all__ = ["PruneResult", "Method", "register", "METHODS"]

METHODS: dict[str, type[Method]] = {}


@dataclass
class PruneResult:
    """A plan, plus any dense-named tensors the method rewrote (e.g. FLAP's compensation biases)."""

    plan: Plan
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Subclasses set `name` and `defaults` (from compress.methods.options, where their command-line
    options are too) and implement `prune`.

    Settings are plain keyword arguments (defaults in `defaults`), recorded in the plan so a
    run can be reproduced from its record.
    """

    name: str = ""
    needs_calibration: bool = True
    defaults: dict = {}
    streamable: bool = False  # can prune a model streamed from disk one layer at a time (ScoredMethod)
    # Set by `prune`: where a training method keeps resumable state (None: nowhere), and the
    # processes it shares its work with; a method that shares none runs on rank 0 alone.
    store: StateStore | None = None
    world: World = World()
    data_parallel: bool = False

    def __init__(self, **settings):
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.name}: unknown settings {sorted(unknown)}")
        self.settings = {**self.defaults, **settings}

    def prune(self, model, adapter: Adapter, ratio: float, calib: torch.Tensor | None, seed: int) -> PruneResult:
        """calib: token ids [n_samples, seq_len] (None when `needs_calibration` is False)."""
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
