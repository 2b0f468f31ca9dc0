"""Magnitude: the data-free baseline. A structure is as important as its weights are large.

Head h: L2 norm of its q rows, the k/v rows of its KV group and its o_proj columns.
MLP channel j: L2 norm of gate/up row j and down_proj column j. Uniform allocation.
"""

from __future__ import annotations

import torch

from compress.adapters import Adapter
from compress.methods.base import PruneResult, register
from compress.methods.select import ScoredMethod, check_ratio

__all__ = ["Magnitude", "magnitude_scores"]


def _rows_sq(w: torch.Tensor, n: int) -> torch.Tensor:
    """Squared L2 norm of each of `n` equal row blocks of `w` -> [n] float64."""
    return w.float().pow(2).reshape(n, -1).sum(1, dtype=torch.float64)


def magnitude_scores(model, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(head scores [L, num_heads], MLP channel scores [L, intermediate]), float64 on the CPU."""
    g = adapter.geometry()
    heads, mlp = [], []
    with torch.no_grad():
        for layer in adapter.layers(model):
            p = adapter.parts(layer)
            kv = _rows_sq(p.k.weight, g.num_kv_heads) + _rows_sq(p.v.weight, g.num_kv_heads)
            h = (_rows_sq(p.q.weight, g.num_heads) + _rows_sq(p.o.weight.t(), g.num_heads)
                 + kv.repeat_interleave(g.group_size))
            m = _rows_sq(p.up.weight, g.intermediate) + _rows_sq(p.down.weight.t(), g.intermediate)
            if p.gate is not None:
                m = m + _rows_sq(p.gate.weight, g.intermediate)
            heads.append(h.sqrt().cpu())
            mlp.append(m.sqrt().cpu())
    return torch.stack(heads), torch.stack(mlp)


@register
class Magnitude(ScoredMethod):
    """Weight-norm structured pruning; needs no calibration data."""

    name = "magnitude"
    needs_calibration = False

    def prune(self, model, adapter: Adapter, ratio: float, calib, seed: int) -> PruneResult:
        check_ratio(ratio)
        head, mlp = magnitude_scores(model, adapter)
        return PruneResult(self.plan(adapter.geometry(), head, mlp, ratio, seed))
