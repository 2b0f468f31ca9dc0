"""`--method probe`: Probe Pruning alone. The folder keeps every weight (dense width); at run time
each batch skips `--ratio` of the decoder linear weights, chosen by a probe (see compress/probe.py).
Time is saved, not memory. Any other method gets it on top with `--runtime probe`."""

from __future__ import annotations

from compress.methods.base import Method, PruneResult, register
from compress.methods.options import DEFAULTS
from compress.plan import Plan
from compress.probe import probe_runtime


@register
class Probe(Method):
    name = "probe"
    needs_calibration = True  # the history the probe fuses with
    defaults = DEFAULTS["probe"]

    def prune(self, model, adapter, ratio, calib, seed) -> PruneResult:
        plan = Plan.keep_all(adapter.geometry())
        plan.runtime = probe_runtime(ratio, skip_layers=self.settings["probe_skip_layers"],
                                     heads=self.settings["probe_heads"])
        return PruneResult(plan)
