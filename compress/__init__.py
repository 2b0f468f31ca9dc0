"""compress: structural pruning of Hugging Face causal LMs into slim, loadable, parity-checked models.

    from compress import prune, export
    result = prune(model, "disp", 0.5, calib)      # -> PruneResult(plan, replaced)
    export(model, result, "./slim", tokenizer=tok)  # -> report dict

The names are imported on first use, so `import compress.errors` (or the CLI's `--help`) does
not pay for torch and transformers.
"""

import importlib

__all__ = ["prune", "export", "Plan", "LayerPlan"]

_HOMES = {"prune": "compress.pipeline", "export": "compress.pipeline", "Plan": "compress.plan",
          "LayerPlan": "compress.plan"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
