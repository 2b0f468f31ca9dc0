"""Wanda-sp: structured Wanda, the baseline of the FLAP paper.

Input channel j of o_proj / down_proj scores sum_i |W_ij| * sqrt(E[x_j^2]) (weight size
times input size); a head sums its head_dim columns. Uniform allocation.

Statistics come from one pass of the dense model; the reference code instead re-feeds
each layer the outputs of the layers it already pruned (a sequential variant not done here).
"""

from __future__ import annotations

import torch

from compress.adapters import Adapter
from compress.methods.base import register
from compress.methods.options import DEFAULTS
from compress.methods.select import CalibratedMethod

__all__ = ["WandaSP", "column_scores"]


def column_scores(adapter: Adapter, layer, stats, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `metric(weight, channel_stats) -> [in_features]` to one layer's o_proj / down_proj
    -> (o_proj columns per head [num_heads, head_dim], MLP [intermediate]) on the CPU."""
    g = adapter.geometry()
    p = adapter.parts(layer)
    o = metric(p.o.weight, stats["o"].to(p.o.weight.device)).cpu()
    return o.reshape(g.num_heads, g.head_dim), metric(p.down.weight, stats["down"].to(p.down.weight.device)).cpu()


def wanda_metric(w: torch.Tensor, s) -> torch.Tensor:
    return w.float().abs().sum(0, dtype=torch.float64) * s.sq_mean.sqrt()


@register
class WandaSP(CalibratedMethod):
    """|W| * ||x|| per o_proj / down_proj input channel, uniform per-layer ratio."""

    name = "wanda-sp"
    defaults = DEFAULTS["wanda-sp"]

    def layer_scores(self, adapter: Adapter, layer, stats) -> tuple[torch.Tensor, torch.Tensor]:
        return column_scores(adapter, layer, stats, wanda_metric)
