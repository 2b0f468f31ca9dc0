"""Per-channel statistics of what chosen linears read, gathered by running the dense model.

Wanda-sp needs E[x^2] and FLAP needs the mean and variance of every input channel of
`o_proj` / `down_proj`; other methods may want other modules. One pass with forward
pre-hooks collects count, sum and sum of squares in float64, from which all three follow.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.adapters import Adapter

__all__ = ["ChannelStats", "collect_input_stats", "layer_input_stats", "run_calibration", "model_device", "layer_inputs", "run_layer",
           "StopForward", "hidden_states"]


@dataclass
class ChannelStats:
    """Running float64 count / sum / sum of squares of each channel of a module's input."""

    count: int
    sum: torch.Tensor  # [C] float64
    sumsq: torch.Tensor  # [C] float64

    @classmethod
    def empty(cls, channels: int, device=None) -> ChannelStats:
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(0, z, z.clone())

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.sumsq += (x * x).sum(0, dtype=torch.float64)

    def to(self, device) -> ChannelStats:
        return ChannelStats(self.count, self.sum.to(device), self.sumsq.to(device))

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def sq_mean(self) -> torch.Tensor:
        """E[x^2] per channel."""
        return self.sumsq / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (E[x^2] - E[x]^2, clamped at 0 against rounding)."""
        return (self.sq_mean - self.mean ** 2).clamp_min(0.0)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_calibration(model: nn.Module, calib: torch.Tensor, batch_size: int = 8, device=None,
                    desc: str = "calibration", progress: bool = True) -> None:
    """Forward `calib` ([n, seq_len] token ids) through `model` (a causal LM or its decoder)
    in mini-batches, for the sake of the hooks registered on it."""
    if calib is None or calib.dim() != 2 or calib.shape[0] == 0:
        raise ValueError(f"calibration data must be token ids [n_samples, seq_len], got "
                         f"{None if calib is None else tuple(calib.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = device or model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in tqdm(range(0, calib.shape[0], batch_size), desc=desc, unit="batch",
                          disable=not progress, dynamic_ncols=True):
                model(input_ids=calib[i:i + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)


@contextmanager
def _input_hooks(modules: dict[tuple[int, str], nn.Module], stats: dict) -> Iterator[None]:
    def hook(key):
        def fn(module, args):
            stats[key].update(args[0])
        return fn

    handles = [m.register_forward_pre_hook(hook(key)) for key, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def collect_input_stats(model: nn.Module, adapter: Adapter, calib: torch.Tensor, batch_size: int = 8,
                        device=None, parts: Sequence[str] = ("o", "down"),
                        progress: bool = True) -> list[dict[str, ChannelStats]]:
    """Per layer, {part name: stats of that linear's input} over all calibration tokens.

    `parts` are `LayerParts` field names (default the two consumers structured pruning
    scores: `o` reads the heads' outputs, `down` the MLP hidden channels). Stats are
    returned on the CPU; they are small (one vector per channel).
    """
    modules: dict[tuple[int, str], nn.Module] = {}
    for i, layer in enumerate(adapter.layers(model)):
        lp = adapter.parts(layer)
        for name in parts:
            mod = getattr(lp, name)
            if mod is None:
                raise ValueError(f"layer {i} has no {name!r} module")
            modules[(i, name)] = mod
    stats = {key: ChannelStats.empty(m.in_features, m.weight.device) for key, m in modules.items()}
    with _input_hooks(modules, stats):  # the decoder alone: the LM head's logits are not needed
        run_calibration(adapter.decoder(model), calib, batch_size, device, progress=progress)
    out: list[dict[str, ChannelStats]] = [{} for _ in adapter.layers(model)]
    for (i, name), s in stats.items():
        out[i][name] = s.to("cpu")
    return out


def layer_input_stats(adapter: Adapter, layer: nn.Module, inputs: list[tuple], parts: Sequence[str],
                      spill: Path | None = None) -> tuple[dict[str, ChannelStats], list[tuple]]:
    """`collect_input_stats` for one layer fed `inputs` (from `layer_inputs` / `run_layer`):
    (its stats on the CPU, the next layer's inputs). Same sums in the same order as the
    whole-model pass, so a streamed model gets bit-identical statistics."""
    lp = adapter.parts(layer)
    modules = {(0, name): getattr(lp, name) for name in parts}
    stats = {key: ChannelStats.empty(m.in_features, m.weight.device) for key, m in modules.items()}
    with _input_hooks(modules, stats):
        out = run_layer(layer, inputs, spill)
    return {name: s.to("cpu") for (_, name), s in stats.items()}, out


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states in a decoder layer's recorded inputs (read back if spilled)."""
    x = args[0] if args else kwargs["hidden_states"]
    return x if torch.is_tensor(x) else x["x"]


def _spilled(folder: Path, x: torch.Tensor):
    """Hidden states kept on disk when a layer boundary's worth would not fit in memory: a file per
    batch, read back when the next layer runs and deleted once the boundary is dropped, so about
    two batches are in memory instead of two boundaries."""
    from compress.memory import OnDisk

    return OnDisk(folder, {"x": x})


def _with_hidden(args: tuple, kwargs: dict, x) -> tuple:
    return ((x, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": x})


@torch.no_grad()
def layer_inputs(model: nn.Module, adapter: Adapter, calib: torch.Tensor, batch_size: int = 8,
                 spill: Path | None = None) -> list[tuple]:
    """(args, kwargs) the first decoder layer receives for each calibration batch: with
    `run_layer`, a model can be run one layer at a time, each layer once per batch (the
    masks and position embeddings the decoder computed are reused by every layer). With
    `spill` (a folder), the hidden states go to disk as they are recorded (`_spilled`)."""
    captured = []

    def hook(_module, args, kwargs):
        if spill is not None:
            args, kwargs = _with_hidden(args, kwargs, _spilled(spill, hidden_states(args, kwargs)))
        captured.append((args, kwargs))
        raise StopForward

    handle = adapter.layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    decoder, device = adapter.decoder(model), model_device(model)
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                decoder(input_ids=calib[i:i + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[tuple], spill: Path | None = None) -> list[tuple]:
    """The next layer's inputs: `layer` applied to each batch's hidden states, the rest unchanged
    (the outputs written to disk with `spill`)."""
    out = []
    for args, kwargs in inputs:
        args, kwargs = _with_hidden(args, kwargs, hidden_states(args, kwargs))
        y = layer(*args, **kwargs)
        y = y[0] if isinstance(y, tuple) else y  # transformers 4.x layers return tuples
        out.append(_with_hidden(args, kwargs, y if spill is None else _spilled(spill, y)))
    return out
