"""What a recovery step costs, decided before it runs: FLOPs (for the default number of steps) and
memory (for choosing full fine-tuning or LoRA).

FLOPs per token, counted like DISP's (P = decoder linear weights plus the LM head): the dense
teacher's forward, 2 P_dense, and the slim student's forward and backward, 6 P_slim (LoRA skips
the weight gradients, about a third of that; not counted, so LoRA's default is conservative).

Memory, in bytes, beyond the dense model already loaded: the student's float32 copy of what it
trains (and of the rest where the dense model is not float32), its gradients and AdamW's two
moments (12 bytes per trained weight; LoRA: only the adapters'), the saved activations, and the
vocabulary-sized tensors of the loss. Autograd saves, per token and layer, about 12 hidden plus 4
kept intermediate floats (the keep-all reference model saves 5,898, estimated 6,144), all layers at
once on CPU; on CUDA each layer is checkpointed (its input, plus one layer's while it is recomputed).
"""

from __future__ import annotations

import torch

from compress.memory import available_memory
from compress.plan import Plan, linear_params

__all__ = ["step_flops", "training_bytes", "available_bytes", "choose_lora"]

HEADROOM = 0.8  # of the available memory a step may plan to use


def step_flops(model, adapter, plan: Plan, tokens: int) -> float:
    """FLOPs of one recovery step of `tokens` tokens."""
    g = adapter.geometry()
    head = model.get_output_embeddings().weight.numel()
    dense = g.num_layers * linear_params(g) + head
    slim = sum(linear_params(g, lp) for lp in plan.layers) + head
    return float(tokens * (2 * dense + 6 * slim))


def training_bytes(model, adapter, plan: Plan, batch_size: int, seq_len: int, *, lora_params: int | None,
                   checkpointing: bool) -> dict:
    """The estimate (see the module docstring); `lora_params`: the adapters' size, None for full
    fine-tuning."""
    g = adapter.geometry()
    trained = sum(linear_params(g, lp) for lp in plan.layers)
    held = next(model.parameters()).dtype
    shared = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    copies = 4 * (trained + (shared if held != torch.float32 else 0))
    optimizer = 12 * (trained if lora_params is None else lora_params) + (4 * lora_params if lora_params else 0)
    tokens = batch_size * seq_len
    kept_mlp = sum(len(lp.resolved(g).mlp_hidden) for lp in plan.layers) / g.num_layers
    per_layer = tokens * (12 * g.hidden + 4 * kept_mlp) * 4
    layer_inputs = tokens * g.hidden * 4
    activations = (g.num_layers * layer_inputs + per_layer) if checkpointing else g.num_layers * per_layer
    loss = 4 * tokens * model.config.vocab_size * 4  # teacher log-probs, student logits, log-softmax, gradient
    return {"student_weights": copies, "optimizer": optimizer, "activations": activations, "loss": loss,
            "total": copies + optimizer + activations + loss}


def available_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()


def choose_lora(full: dict, with_lora: dict, device: torch.device) -> bool:
    """LoRA when full fine-tuning would not fit in HEADROOM of the device's free memory; an error
    when neither would."""
    have = HEADROOM * available_bytes(device)
    if full["total"] <= have:
        return False
    if with_lora["total"] <= have:
        print(f"recover: full fine-tuning needs about {full['total'] / 1e9:.2f} GB, {have / 1e9:.2f} GB usable: "
              "training LoRA adapters instead")
        return True
    raise MemoryError(f"recover: even LoRA needs about {with_lora['total'] / 1e9:.2f} GB, {have / 1e9:.2f} GB "
                      "usable: lower --recover-batch-size")
