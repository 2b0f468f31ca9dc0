"""FLAP (An et al., AAAI 2024): fluctuation metric, adaptive structure, bias compensation.

- Metric: input channel j of o_proj / down_proj scores Var(x_j) * ||W[:, j]||^2, the output
  energy of that channel's fluctuation around its mean: a channel that barely fluctuates can
  be replaced by a constant, so it is cheap to remove. As in the reference code, o_proj
  column scores are squared, and a head's score is built from its head_dim columns.
- Structure: "global" allocation z-scores the column / channel scores (per layer and type,
  as the reference code; or per type across all layers), scores a head by the mean of its
  columns, and removes the lowest-ranked units of all layers until the budget is met, so
  layers get different widths (a sublayer may go entirely).
- Compensation: the removed channels' mean contribution W[:, removed] @ E[x_removed] is
  added to the consumer's bias, returned in `PruneResult.replaced` under the dense names
  (a bias the dense model lacks is created, full [out_features]).

Differences from the reference code: parameter costs are the real, GQA-aware ones rather
than a constant 512/3 per head (exact for MHA LLaMA only), and a head unit may be one query
head per group rather than a whole group (see `select`).
Per-layer standardisation is the default because per-type standardisation across layers
removed a whole first-layer attention on the reference model (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

from compress.adapters import Adapter
from compress.calibration import ChannelStats
from compress.helpers import head_rows
from compress.methods.base import register
from compress.methods.options import DEFAULTS
from compress.methods.select import CalibratedMethod
from compress.methods.wanda_sp import column_scores
from compress.plan import Plan

__all__ = ["FLAP", "fluctuation_metric", "compensation_biases"]


def fluctuation_metric(w: torch.Tensor, s: ChannelStats) -> torch.Tensor:
    """Var(x_j) * ||W[:, j]||^2 per input channel j of `w` ([out, in]) -> [in] float64."""
    return s.var * w.float().pow(2).sum(0, dtype=torch.float64)


def compensation_biases(adapter: Adapter, layer, prefix: str, layer_plan, stats: dict[str, ChannelStats]
                        ) -> dict[str, torch.Tensor]:
    """bias + W[:, removed] @ mean(x[removed]) for one layer's o_proj / down_proj, where they lost
    inputs, keyed by dense name (`prefix`: the layer's module name and a dot)."""
    g = adapter.geometry()
    p, r = adapter.parts(layer), layer_plan.resolved(g)
    names = {m: n for n, m in layer.named_modules()}
    kept_cols = head_rows(r.heads, g.head_dim)
    out: dict[str, torch.Tensor] = {}
    for mod, st, kept, width in ((p.o, stats["o"], kept_cols, g.num_heads * g.head_dim),
                                 (p.down, stats["down"], torch.tensor(r.mlp_hidden, dtype=torch.long),
                                  g.intermediate)):
        if len(kept) == width:
            continue
        w = mod.weight
        mean = st.mean.to(w.device).clone()
        mean[kept.to(w.device)] = 0.0
        bias = w.double() @ mean
        if mod.bias is not None:
            bias += mod.bias.double()
        out[f"{prefix}{names[mod]}.bias"] = bias.to(w.dtype)
    return out


@register
class FLAP(CalibratedMethod):
    """Fluctuation-scored heads and channels, global adaptive widths, bias compensation."""

    name = "flap"
    needs_calibration = True
    defaults = DEFAULTS["flap"]

    def layer_scores(self, adapter: Adapter, layer, stats) -> tuple[torch.Tensor, torch.Tensor]:
        return column_scores(adapter, layer, stats, fluctuation_metric)

    def select_plan(self, g, head_scores, mlp_scores, ratio: float, seed: int) -> Plan:
        return self.plan(g, head_scores ** 2, mlp_scores, ratio, seed, allocation=self.settings["allocation"],
                         standardize=self.settings["standardize"])

    def layer_replaced(self, adapter: Adapter, layer, prefix: str, layer_plan, stats) -> dict[str, torch.Tensor]:
        if not self.settings["bias_compensation"]:
            return {}
        return compensation_biases(adapter, layer, prefix, layer_plan, stats)
