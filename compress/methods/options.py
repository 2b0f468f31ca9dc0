"""Every pruning method's one-line description, settings with their defaults, and command-line options.

Imports no torch: `compress --help` and argument errors build the parser from here in well under
a second, and the method classes (which need torch) take their `defaults` and choices from here,
so a default is written once.
"""

from __future__ import annotations

import argparse

__all__ = ["DESCRIPTIONS", "DEFAULTS", "OBJECTIVES", "GRANULARITIES", "ALLOCATIONS", "STANDARDIZATIONS",
           "add_method_arguments"]

DESCRIPTIONS = {
    "disp": "DISP: each sublayer reads and writes its own residual channels, plus MLP channels, masks learned "
            "by a hypernetwork (arXiv 2410.11988)",
    "tyr": "Týr-the-Pruner: heads and MLP channels by OBS saliency with a least-squares refit, per-sublayer "
           "sparsity from an evolutionary search (arXiv 2503.09657)",
    "tyr+disp": "Týr's searched per-layer budgets drive DISP's masks, then Týr's refit of what DISP keeps",
    "flap": "heads and MLP channels by fluctuation, adaptive per-layer widths, bias compensation",
    "wanda-sp": "heads and MLP channels by structured Wanda (|W| x ||x||), the same ratio in every layer",
    "magnitude": "heads and MLP channels by weight norm, the same ratio in every layer; no calibration",
    "probe": "Probe Pruning: nothing removed on disk; per batch, MLP channels (and heads) chosen at run time "
             "by a small probe (arXiv 2502.15618)",
}

OBJECTIVES = ("lm", "kl")  # disp: next-token loss, or KL to the dense model
GRANULARITIES = ("group", "head")  # GQA head pruning unit
ALLOCATIONS = ("uniform", "global")
STANDARDIZATIONS = ("layer", "type")

_SCORED = {"head_granularity": "auto"}
_CALIBRATED = {**_SCORED, "calib_batch_size": 8}
_TYR = {**_CALIBRATED, "levels": 4, "iterations": 3, "generations": 6, "offspring": 16,
        "fidelity_windows": [1, 4, 16], "hessian_windows": 64, "candidate_batch": None}
# layer_targets: kept fraction of each layer's linear weights (e.g. from Týr's search) instead of one
# global budget; set by tyr+disp, not a command-line option.
_DISP = {"steps": None, "lr": 1e-3, "lam": 16.0, "batch_size": 4, "prune_heads": False, "objective": "lm",
         "refit": 0, "layer_targets": None}

DEFAULTS = {
    "magnitude": _SCORED,
    "wanda-sp": _CALIBRATED,
    "flap": {**_CALIBRATED, "allocation": "global", "standardize": "layer", "bias_compensation": True},
    "tyr": _TYR,
    "disp": _DISP,
    "tyr+disp": {**_TYR, **{k: v for k, v in _DISP.items() if k != "layer_targets"}, "refit": 64},
    "probe": {"probe_skip_layers": None, "probe_heads": False},
}


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """Each method's options, in a group named after the methods they apply to."""
    g = p.add_argument_group("magnitude, wanda-sp, flap and tyr options (tyr+disp takes them too)")
    g.add_argument("--head-granularity", default=_SCORED["head_granularity"], choices=("auto", *GRANULARITIES),
                   help="GQA head pruning unit: whole KV groups, or query heads evenly within every group; "
                        "auto: group with >= 4 KV groups, else head")
    g.add_argument("--calib-batch-size", type=int, default=_CALIBRATED["calib_batch_size"],
                   help="wanda-sp, flap, tyr: windows per forward pass while collecting activation statistics")
    _disp_arguments(p.add_argument_group("disp options (tyr+disp takes them too)"))
    _tyr_arguments(p.add_argument_group("tyr options (tyr+disp takes them too)"))
    g = p.add_argument_group("flap options")
    d = DEFAULTS["flap"]
    g.add_argument("--allocation", default=d["allocation"], choices=ALLOCATIONS,
                   help="one global ranking of all layers' units (adaptive widths) or the same ratio per layer")
    g.add_argument("--standardize", default=d["standardize"], choices=STANDARDIZATIONS,
                   help="global allocation: standardise scores per layer and type, or per type across layers")
    g.add_argument("--no-bias-compensation", dest="bias_compensation", action="store_false",
                   help="do not fold the removed channels' mean output into the o_proj/down_proj biases")
    _probe_arguments(p.add_argument_group("probe options (--method probe, or --runtime probe)"))


def _disp_arguments(g) -> None:
    d = _DISP
    g.add_argument("--steps", type=int, default=d["steps"],
                   help="hypernetwork training steps (default: what fits about an hour of the device for this "
                        "model's size, at most 2,000 on CPU and 10,000 on CUDA)")
    g.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate of the hypernetwork")
    g.add_argument("--lambda", dest="lam", type=float, default=d["lam"],
                   help="weight of the parameter-budget regulariser")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="calibration windows per training step")
    g.add_argument("--prune-heads", action="store_true",
                   help="also prune whole KV groups (heads, k/v rows; shrinks the KV cache)")
    g.add_argument("--objective", choices=OBJECTIVES, default=d["objective"],
                   help="what the masks are trained to minimise: lm = next-token cross-entropy on the "
                        "calibration text (the paper's); kl = KL(dense || pruned) per token, the dense model's "
                        "own predictions as targets (stays closer to the dense model; one extra forward per step)")
    g.add_argument("--refit", type=int, default=None, metavar="WINDOWS",
                   help="after training, re-solve each pruned linear's kept input columns by least squares on "
                        "this many calibration windows, layer by layer (Týr's refit; default: 0 = off for disp, "
                        "as the paper; 64 for tyr+disp)")


def _tyr_arguments(g) -> None:
    d = _TYR
    g.add_argument("--levels", type=int, default=d["levels"],
                   help="supernet levels each side of a sublayer's centre sparsity (4: 9 variants)")
    g.add_argument("--iterations", type=int, default=d["iterations"],
                   help="coarse-to-fine supernets, the level step halved each time from 12.5%%")
    g.add_argument("--generations", type=int, default=d["generations"], help="evolutionary generations per iteration")
    g.add_argument("--offspring", type=int, default=d["offspring"], help="offspring per generation")
    g.add_argument("--fidelity-windows", type=int, nargs=3, default=d["fidelity_windows"],
                   metavar=("ALL", "QUARTER", "BEST"),
                   help="calibration windows scoring, in turn: ALL every offspring of a generation; QUARTER the "
                        "best quarter of them; BEST the best sixteenth and the parent")
    g.add_argument("--hessian-windows", type=int, default=d["hessian_windows"],
                   help="calibration windows for the X^T X statistics of local pruning")
    g.add_argument("--candidate-batch", type=int, default=d["candidate_batch"],
                   help="candidates scored in one forward pass (default: 8 on CUDA, 1 on CPU)")


def _probe_arguments(g) -> None:
    g.add_argument("--probe-skip-layers", type=int, default=None,
                   help="first layers never probed (default: a tenth of the layers)")
    g.add_argument("--probe-heads", action="store_true",
                   help="also skip query heads per batch (default: MLP channels only, which kept far more "
                        "quality on the reference model)")
