"""Týr's searched budgets driving DISP's learned masks (`--method tyr+disp`).

Týr finds how much of each layer to keep (its evolutionary search over per-sublayer sparsity);
DISP then learns which residual channels, MLP channels (and, with --prune-heads, KV groups)
each layer keeps, trained towards those per-layer budgets instead of one global budget, and
corrected to them channel by channel. Last, Týr's least-squares refit re-solves the kept input
columns of every narrowed linear on DISP's plan, layer by layer (`--refit`, 64 calibration
windows by default; Týr's own refitted weights belong to its plan, not DISP's). Every option of
`tyr` and `disp` applies.
"""

from __future__ import annotations

import torch

from compress.adapters import Adapter
from compress.methods.base import Method, PruneResult, register
from compress.methods.disp import DISP
from compress.methods.options import DEFAULTS
from compress.methods.tyr import Tyr
from compress.plan import linear_params

__all__ = ["TyrDisp"]

_DISP_KEYS = [k for k in DISP.defaults if k != "layer_targets"]


@register
class TyrDisp(Method):
    name = "tyr+disp"
    needs_calibration = True
    defaults = DEFAULTS["tyr+disp"]
    data_parallel = True  # Týr's candidates scored in turns, DISP's batches split (see each)

    def prune(self, model, adapter: Adapter, ratio: float, calib: torch.Tensor | None, seed: int) -> PruneResult:
        g = adapter.geometry()
        tyr = Tyr(**{k: self.settings[k] for k in Tyr.defaults})
        tyr.store, tyr.world = self.store, self.world
        searched = tyr.prune(model, adapter, ratio, calib, seed).plan
        targets = [linear_params(g, lp) / linear_params(g) for lp in searched.layers]
        disp = DISP(**{k: self.settings[k] for k in _DISP_KEYS}, layer_targets=targets)
        disp.store, disp.world = self.store, self.world
        result = disp.prune(model, adapter, ratio, calib, seed)
        self.trace = disp.trace
        result.plan.settings = {**result.plan.settings, "layer_targets": [round(t, 4) for t in targets]}
        return result
