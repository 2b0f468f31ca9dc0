"""Least-squares refit of what a plan keeps: any plan's kept input columns re-solved on calibration data.

A pruned linear W [out, in] that reads only the columns K of its input X loses X_P W_P^T. Its
best kept weights, in the least-squares sense, are W'_K = W H_:K H_KK^-1 with H = X^T X (damped
as Týr's local pruning, whose OBS updates end at the same solution). This is Týr's refit,
applied to a finished plan, layer after layer on the already pruned and refitted model, so each
refit also sees the error of the layers below it:

- q/k/v read the attention norm's output through the layer's residual subset (attn_in),
- o_proj reads the kept heads,
- gate/up read the MLP norm's output through mlp_in,
- down_proj reads the kept MLP channels.

Columns not kept are zero in the refitted weights; the refitted tensors go into the result's
`replaced` tensors, so the masked dense model with them swapped in is still exactly the slim one.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.adapters import Adapter, FusedSlice
from compress.calibration import layer_inputs, run_layer
from compress.helpers import head_rows
from compress.masking import mask_layer, plan_masks, replaced_weights
from compress.methods.tyr_obs import damped, layer_hessian
from compress.plan import Plan

__all__ = ["refit_plan", "refit_columns"]


def refit_columns(w: torch.Tensor, h: torch.Tensor, cols: list[int]) -> torch.Tensor:
    """W H_:K H_KK^-1 in columns K (H damped, float64), zero elsewhere."""
    hd = damped(h)
    k = torch.tensor(cols, dtype=torch.long, device=w.device)
    w64 = w.detach().double()
    out = torch.zeros_like(w64)
    out[:, k] = torch.linalg.solve(hd[k][:, k], hd[k] @ w64.T).T
    return out


def _linears(mods) -> list[nn.Linear]:
    """The distinct real modules behind q/k/v (or gate/up): a fused one is refitted whole."""
    out = []
    for m in mods:
        m = m.module if isinstance(m, FusedSlice) else m
        if m is not None and all(m is not o for o in out):
            out.append(m)
    return out


def refit_plan(model: nn.Module, adapter: Adapter, plan: Plan, calib: torch.Tensor, batch_size: int = 8
               ) -> dict[str, torch.Tensor]:
    """Refitted weights (dense names and shapes) for every linear whose input the plan narrows."""
    g = adapter.geometry()
    names = {m: n for n, m in model.named_modules()}
    weights: dict[str, torch.Tensor] = {}
    inputs = layer_inputs(model, adapter, calib, batch_size)
    layers = adapter.layers(model)
    for layer, lp, lm in tqdm(list(zip(layers, plan.layers, plan_masks(plan, g))), desc="refit", unit="layer",
                              leave=False):
        p = adapter.parts(layer)
        heads = None if lp.heads is None else head_rows(lp.heads, g.head_dim).tolist()
        steps = [(p.attn_norm, True, [p.q, p.k, p.v], lp.attn_in if lp.heads != [] else None),
                 (p.o, False, [p.o], heads),
                 (p.mlp_norm, True, [p.gate, p.up], lp.mlp_in if lp.mlp_hidden != [] else None),
                 (p.down, False, [p.down], lp.mlp_hidden)]
        handles = mask_layer(p, lm, g)
        try:
            for tap, output, consumers, cols in steps:
                if not cols:  # None: all kept, nothing to refit; []: the sublayer is gone
                    continue
                with replaced_weights(model, weights):
                    h = layer_hessian(layer, inputs, tap, output)
                for m in _linears(consumers):
                    weights[f"{names[m]}.weight"] = refit_columns(m.weight, h, cols).to(m.weight.dtype)
            with replaced_weights(model, weights):
                inputs = run_layer(layer, inputs)
        finally:
            for hd in handles:
                hd.remove()
    return weights
