"""Magnitude: the data-free baseline. A structure is as important as its weights are large.

Head h: L2 norm of its q rows, the k/v rows of its KV group and its o_proj columns.
MLP channel j: L2 norm of gate/up row j and down_proj column j. Uniform allocation.
"""

from __future__ import annotations

import torch

from compress.adapters import Adapter
from compress.methods.base import register
from compress.methods.options import DEFAULTS
from compress.methods.select import ScoredMethod

__all__ = ["Magnitude", "magnitude_scores"]


def _rows_sq(w: torch.Tensor, n: int) -> torch.Tensor:
    """Squared L2 norm of each of `n` equal row blocks of `w` -> [n] float64."""
    return w.float().pow(2).reshape(n, -1).sum(1, dtype=torch.float64)


def magnitude_scores(adapter: Adapter, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (head scores [num_heads], MLP channel scores [intermediate]), float64 on the CPU."""
    g = adapter.geometry()
    p = adapter.parts(layer)
    kv = _rows_sq(p.k.weight, g.num_kv_heads) + _rows_sq(p.v.weight, g.num_kv_heads)
    h = (_rows_sq(p.q.weight, g.num_heads) + _rows_sq(p.o.weight.t(), g.num_heads)
         + kv.repeat_interleave(g.group_size))
    m = _rows_sq(p.up.weight, g.intermediate) + _rows_sq(p.down.weight.t(), g.intermediate)
    if p.gate is not None:
        m = m + _rows_sq(p.gate.weight, g.intermediate)
    return h.sqrt().cpu(), m.sqrt().cpu()


@register
class Magnitude(ScoredMethod):
    """Weight-norm structured pruning; needs no calibration data."""

    name = "magnitude"
    needs_calibration = False
    defaults = DEFAULTS["magnitude"]

    def layer_scores(self, adapter: Adapter, layer, stats) -> tuple[torch.Tensor, torch.Tensor]:
        return magnitude_scores(adapter, layer)
