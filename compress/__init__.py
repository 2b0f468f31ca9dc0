"""compress: structural pruning of Hugging Face causal LMs into slim, loadable, parity-checked models.

    from compress import prune, export
    result = prune(model, "disp", 0.5, calib)      # -> PruneResult(plan, replaced)
    export(model, result, "./slim", tokenizer=tok)  # -> report dict
"""

from compress.pipeline import export, prune
from compress.plan import LayerPlan, Plan

__all__ = ["prune", "export", "Plan", "LayerPlan"]
