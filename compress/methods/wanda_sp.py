"""Wanda-sp: structured Wanda, the baseline of the FLAP paper.

Input channel j of o_proj / down_proj scores sum_i |W_ij| * sqrt(E[x_j^2]) (weight size
times input size); a head sums its head_dim columns. Uniform allocation.

Statistics come from one pass of the dense model; the reference code instead re-feeds
each layer the outputs of the layers it already pruned (a sequential variant not done here).
"""

from __future__ import annotations


import torch

from compress.adapters import Adapter
from compress.methods.base import PruneResult, register
from compress.methods.select import CalibratedMethod, check_ratio

__all__ = ["WandaSP", "column_scores"]


def column_scores(model, adapter: Adapter, stats, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `metric(weight, channel_stats) -> [in_features]` to every o_proj / down_proj
    -> (o_proj columns per head [L, num_heads, head_dim], MLP [L, intermediate]) on the CPU."""
    g = adapter.geometry()
    heads, mlp = [], []
    with torch.no_grad():
        for layer, s in zip(adapter.layers(model), stats):
            p = adapter.parts(layer)
            o = metric(p.o.weight, s["o"].to(p.o.weight.device)).cpu()
            heads.append(o.reshape(g.num_heads, g.head_dim))
            mlp.append(metric(p.down.weight, s["down"].to(p.down.weight.device)).cpu())
    return torch.stack(heads), torch.stack(mlp)


def wanda_metric(w: torch.Tensor, s) -> torch.Tensor:
    return w.float().abs().sum(0, dtype=torch.float64) * s.sq_mean.sqrt()


@register
class WandaSP(CalibratedMethod):
    """|W| * ||x|| per o_proj / down_proj input channel, uniform per-layer ratio."""

    name = "wanda-sp"

    def prune(self, model, adapter: Adapter, ratio: float, calib, seed: int) -> PruneResult:
        check_ratio(ratio)
        stats = self.input_stats(model, adapter, calib)
        head, mlp = column_scores(model, adapter, stats, wanda_metric)
        return PruneResult(self.plan(adapter.geometry(), head, mlp, ratio, seed))
