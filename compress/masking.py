"""The dense model with a plan applied as masks: the reference every slim model must equal.

Masks multiply (1) the normalised input a sublayer reads, (2) each query head's output before
`o_proj`, (3) the MLP hidden channels and (4) what a sublayer writes back. With 0/1 masks this
is exactly the slim model; with soft masks it is what DISP trains through.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from compress.adapters import Adapter, Geometry, LayerParts
from compress.plan import Plan

__all__ = ["LayerMasks", "plan_masks", "masked", "mask_layer", "replaced_weights"]


@dataclass
class LayerMasks:
    """Per-layer multiplicative masks; None = no mask. Shapes: [hidden], [heads], [intermediate]."""

    attn_in: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    mlp_in: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    mlp_hidden: torch.Tensor | None = None


def _onehot(ids: list[int] | None, size: int) -> torch.Tensor | None:
    if ids is None:
        return None
    m = torch.zeros(size)
    m[ids] = 1.0
    return m


def plan_masks(plan: Plan, g: Geometry) -> list[LayerMasks]:
    return [
        LayerMasks(
            attn_in=_onehot(lp.attn_in, g.hidden), attn_out=_onehot(lp.attn_out, g.hidden),
            mlp_in=_onehot(lp.mlp_in, g.hidden), mlp_out=_onehot(lp.mlp_out, g.hidden),
            heads=_onehot(lp.heads, g.num_heads), mlp_hidden=_onehot(lp.mlp_hidden, g.intermediate),
        )
        for lp in plan.layers
    ]


def _scale_output(mask):
    def hook(module, args, out):
        return out * mask.to(out.dtype)
    return hook


def _scale_input(mask):
    def hook(module, args):
        return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])
    return hook


@contextmanager
def masked(model: nn.Module, adapter: Adapter, masks: list[LayerMasks]):
    """Run the dense model with masks (tensors may require grad) for the duration of the block."""
    g = adapter.geometry()
    handles = []
    try:
        for layer, lm in zip(adapter.layers(model), masks):
            handles += mask_layer(adapter.parts(layer), lm, g)
        yield model
    finally:
        for h in handles:
            h.remove()


def mask_layer(p: LayerParts, lm: LayerMasks, g: Geometry) -> list:
    """Hooks applying one layer's masks (the caller removes the returned handles)."""
    dev = p.q.weight.device

    def m(t):
        return None if t is None else t.to(dev)

    handles = []
    if lm.attn_in is not None:
        handles.append(p.attn_norm.register_forward_hook(_scale_output(m(lm.attn_in))))
    if lm.mlp_in is not None:
        handles.append(p.mlp_norm.register_forward_hook(_scale_output(m(lm.mlp_in))))
    if lm.heads is not None:
        per_col = m(lm.heads).repeat_interleave(g.head_dim)
        handles.append(p.o.register_forward_pre_hook(_scale_input(per_col)))
    if lm.attn_out is not None:
        handles.append(p.o.register_forward_hook(_scale_output(m(lm.attn_out))))
    if lm.mlp_hidden is not None:
        handles.append(p.down.register_forward_pre_hook(_scale_input(m(lm.mlp_hidden))))
    if lm.mlp_out is not None:
        handles.append(p.down.register_forward_hook(_scale_output(m(lm.mlp_out))))
    return handles


@contextmanager
def replaced_weights(model: nn.Module, replaced: dict[str, torch.Tensor] | None):
    """Temporarily swap in tensors a method rewrote (adding a bias the dense model lacks)."""
    saved = []
    modules = dict(model.named_modules())
    try:
        for name, value in (replaced or {}).items():
            mod_name, attr = name.rsplit(".", 1)
            mod = modules[mod_name]
            saved.append((mod, attr, getattr(mod, attr, None)))
            setattr(mod, attr, nn.Parameter(value.to(mod.weight.device, mod.weight.dtype), requires_grad=False))
        yield model
    finally:
        for mod, attr, old in reversed(saved):
            setattr(mod, attr, old)
