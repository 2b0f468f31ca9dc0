"""DISP's mask generator, its Gumbel-sigmoid relaxation and its parameter budget (arXiv 2410.11988).

Kept apart from the training loop in `disp.py` because these are the pieces that must match the
reference code exactly: the hypernetwork's shape, the +3 "keep" offset and temperature 0.4 of
the relaxation, and the parameter count the regulariser holds to the budget (which must agree
with `compress.plan.linear_params`, or the learned masks would aim at the wrong ratio).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.adapters import Geometry

__all__ = ["HyperNetwork", "gumbel_noise", "relax", "OFFSET", "TEMPERATURE", "layer_params", "budget_loss"]

OFFSET = 3.0  # biases every mask towards "keep" at the start of training
TEMPERATURE = 0.4


class HyperNetwork(nn.Module):
    """Fixed random input [n_struct, 1, 32] -> bidirectional GRU (64 per direction) -> LayerNorm +
    GELU -> one bias-free Linear(128 -> width) per structure: one logit per prunable channel.

    The GRU runs along the structures (layer by layer), so the masks of neighbouring sublayers
    are learned jointly rather than independently. All randomness comes from `generator`, so
    the same seed gives the same initial network without touching the global RNG.
    """

    def __init__(self, widths: list[int], generator: torch.Generator, in_dim: int = 32, hidden: int = 64):
        super().__init__()
        self.widths = list(widths)
        with torch.device("meta"):  # built without drawing from the global RNG, initialised below
            self.gru = nn.GRU(in_dim, hidden, bidirectional=True)
            self.norm = nn.LayerNorm(2 * hidden)
            self.heads = nn.ModuleList(nn.Linear(2 * hidden, w, bias=False) for w in self.widths)
        self.to_empty(device="cpu")
        self.register_buffer("inputs", nn.init.orthogonal_(torch.empty(len(self.widths), 1, in_dim),
                                                           generator=generator))
        with torch.no_grad():  # PyTorch's default inits, drawn from `generator`
            for p in self.gru.parameters():
                p.uniform_(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden), generator=generator)
            for head in self.heads:
                bound = 1 / math.sqrt(head.in_features)
                head.weight.uniform_(-bound, bound, generator=generator)
        self.norm.reset_parameters()

    def forward(self) -> list[torch.Tensor]:
        out, _ = self.gru(self.inputs)  # [n_struct, 1, 2 * hidden]
        feats = F.gelu(self.norm(out[:, 0]))  # [n_struct, 2 * hidden]
        return [head(feats[i]) for i, head in enumerate(self.heads)]


def gumbel_noise(n: int, generator: torch.Generator, eps: float = 1e-20) -> torch.Tensor:
    """Standard Gumbel samples, drawn on the CPU so a run is reproducible whatever the device."""
    u = torch.rand(n, generator=generator)
    return -torch.log(-torch.log(u + eps) + eps)


def relax(logits: torch.Tensor, noise: torch.Tensor | None, temperature: float = TEMPERATURE
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft, hard) masks: soft = sigmoid((logit + noise + 3) / T) for the LM loss; hard = soft
    rounded at 0.5 with a straight-through gradient, for the parameter regulariser."""
    z = logits + OFFSET if noise is None else logits + noise + OFFSET
    soft = torch.sigmoid(z / temperature)
    hard = (soft >= 0.5).to(soft.dtype)
    return soft, (hard - soft).detach() + soft


def layer_params(g: Geometry, attn_in, attn_out, mlp_in, mlp_hidden, mlp_out, kv_groups=None):
    """q/k/v/o + MLP weights of one layer from its kept widths (ints or differentiable tensors).

    Attention: in * (h*hd + 2*g*hd) + out * h*hd; MLP: (2 if gated else 1) * in*mid + mid*out.
    `kv_groups` kept KV groups (None = all) each bring `group_size` query heads.
    """
    kv = g.num_kv_heads if kv_groups is None else kv_groups
    heads = kv * g.group_size
    attn = attn_in * (heads + 2 * kv) * g.head_dim + attn_out * heads * g.head_dim
    mlp = (2 if g.gated else 1) * mlp_in * mlp_hidden + mlp_hidden * mlp_out
    return attn + mlp


def budget_loss(kept: torch.Tensor, target: float, lam: float) -> torch.Tensor:
    """lambda * |log(P_kept / (p * P_total))|: zero exactly on budget, symmetric in ratio."""
    return lam * torch.log(kept / target).abs()
