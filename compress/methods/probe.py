"""`--method probe`: Probe Pruning alone. The folder keeps every weight (dense width); at run time
each batch skips `--ratio` of the decoder linear weights, chosen by a probe (see compress/probe.py).
Time is saved, not memory. Any other method gets it on top with `--runtime probe`."""

from __future__ import annotations

from compress.methods.base import Method, PruneResult, register
from compress.plan import Plan
from compress.probe import probe_runtime


def add_probe_arguments(group) -> None:
    """Options of the probe, for `--method probe` and for `--runtime probe` on top of another method."""
    group.add_argument("--probe-skip-layers", type=int, default=None,
                       help="probe: first layers never probed (default: a tenth of the layers)")
    group.add_argument("--probe-heads", action="store_true",
                       help="probe: also skip query heads per batch (default: MLP channels only, which "
                            "kept far more quality on the reference model)")


@register
class Probe(Method):
    name = "probe"
    needs_calibration = True  # the history the probe fuses with
    defaults = {"probe_skip_layers": None, "probe_heads": False}

    @classmethod
    def add_arguments(cls, group) -> None:
        add_probe_arguments(group)

    def prune(self, model, adapter, ratio, calib, seed) -> PruneResult:
        plan = Plan.keep_all(adapter.geometry())
        plan.runtime = probe_runtime(ratio, skip_layers=self.settings["probe_skip_layers"],
                                     heads=self.settings["probe_heads"])
        return PruneResult(plan)
