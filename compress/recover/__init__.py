"""Recovery after pruning: the slim model's kept weights distilled from the dense model (`recover`),
returned as the same plan with the trained tensors in `replaced`.

DEFAULTS is here, without torch, for the command line's parser (`compress --help` answers without
torch); `recover` and `Recovered`, and torch with them, are imported on first use.
"""

__all__ = ["recover", "Recovered", "DEFAULTS"]

# lr: full fine-tuning / LoRA; `eval_windows`: held-out calibration windows for the before/after KL.
DEFAULTS = {"batch_size": 4, "lr": 3e-4, "lora_lr": 1e-3, "rank": 16, "warmup": 0.05, "eval_windows": 16}


def __getattr__(name: str):
    if name not in ("recover", "Recovered"):
        raise AttributeError(f"module 'compress.recover' has no attribute {name!r}")
    from compress.recover import distill

    return getattr(distill, name)
