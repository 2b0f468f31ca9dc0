"""LoRA adapters on the slim student (through `peft`, the optional `recover` extra), merged back into
plain weights at the end, for models whose full optimizer state does not fit."""

from __future__ import annotations

import re

from torch import nn

__all__ = ["TARGETS", "lora_params", "add_lora", "merge_lora"]

# The slim linears LoRA adapts. Not q_proj: the slim attention reads `q_proj.weight` itself
# (F.linear, so Probe Pruning can pass gathered rows) instead of calling the module, so an adapter
# there would never be applied.
TARGETS = r".*\.layers\.\d+\.(self_attn\.[kvo]_proj|mlp\.(gate|up|down)_proj)"


def _targets(student) -> list[nn.Linear]:
    return [m for n, m in student.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(TARGETS, n)]


def lora_params(student, rank: int) -> int:
    """Weights of rank-`rank` adapters on the student's targeted linears."""
    return sum(rank * (m.in_features + m.out_features) for m in _targets(student))


def add_lora(student, rank: int):
    """The student wrapped with trainable rank-`rank` adapters (alpha = 2 rank); all else frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("LoRA recovery needs peft: pip install 'compress-llm[recover]'") from e
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    return get_peft_model(student, config)


def merge_lora(wrapped):
    """The plain student, adapters merged into its weights."""
    return wrapped.merge_and_unload()
