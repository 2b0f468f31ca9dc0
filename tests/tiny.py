"""Tiny random models, one per supported family (the meta-test checks none is missing)."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)

VOCAB = 4096  # the shipped reference tokenizer's size, so tiny folders can reuse it

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
               intermediate_size=96, max_position_embeddings=128)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**_COMMON, num_key_value_heads=4, sliding_window=16, head_dim=8),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=4, head_dim=16, attention_bias=True),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                             ffn_dim=96, max_position_embeddings=128, word_embed_proj_dim=64),
    "phi3": lambda: Phi3Config(**_COMMON, num_key_value_heads=4, sliding_window=16, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                "partial_rotary_factor": 0.5}),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    """overrides: config fields to change (e.g. fewer, wider heads)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so parity tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_folder(folder, family: str = "llama"):
    """A model folder as `compress export --model` reads it: a tiny model and the reference tokenizer."""
    from transformers import AutoTokenizer

    from compress.reference import MODEL_DIR

    tiny_model(family).save_pretrained(folder)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(folder)
    return folder
