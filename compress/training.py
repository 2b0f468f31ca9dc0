"""What every training loop here shares (DISP's hypernetwork, recovery by distillation): endless
shuffled batches of calibration windows, frozen weights, per-layer activation checkpointing, and
the default number of steps: as many as fit a compute budget of about an hour of the device."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["Batches", "frozen", "checkpointed", "BUDGETS", "budget_steps"]

# (FLOPs, most steps) of the default training budget per device type: about an hour on two 2026
# server cores (~170 GFLOP/s) and on one data-centre GPU.
BUDGETS = {"cpu": (6e14, 2000), "cuda": (1e18, 10000)}


def budget_steps(per_step_flops: float, device_type: str, name: str, unit: str, flops: float | None = None) -> int:
    """Steps of `per_step_flops` that fit the device's budget (or `flops`), capped at the device's
    most; printed as "NAME: N steps of UNIT (...)" so the run says what it chose."""
    budget, most = BUDGETS.get(device_type, BUDGETS["cpu"])
    budget = budget if flops is None else flops
    steps = max(1, min(most, int(budget // per_step_flops)))
    why = "the most" if steps == most else f"a budget of {budget:.0e} FLOPs"
    print(f"{name}: {steps} steps of {unit} ({why}; --steps to change)")
    return steps


class Batches:
    """Endless batches of calibration windows, reshuffled every epoch by `gen`. Its position (this
    epoch's order, the next batch in it) is a `state_dict`, so a resumed run reads on from there
    (`compress.checkpoint`)."""

    def __init__(self, calib: torch.Tensor, batch_size: int, gen: torch.Generator):
        self.calib, self.gen = calib, gen
        self.size = max(1, min(batch_size, calib.shape[0]))
        self.order, self.next = torch.empty(0, dtype=torch.int64), 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.next + self.size > self.order.numel():  # the epoch's whole batches are used up
            self.order, self.next = torch.randperm(self.calib.shape[0], generator=self.gen), 0
        self.next += self.size
        return self.calib[self.order[self.next - self.size:self.next].to(self.calib.device)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"order": self.order, "next": torch.tensor(self.next)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.order, self.next = state["order"].clone(), int(state["next"])


@contextlib.contextmanager
def frozen(model):
    """Freeze a model's weights for the duration (the dense model, while something else trains)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def checkpointed(layers):
    """Recompute each decoder layer in backward; works in eval mode (no dropout), hooks included."""
    try:
        for layer in layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
