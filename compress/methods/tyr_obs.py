"""Týr's local pruning: remove input structures of o_proj / down_proj with OBS updates.

For a consumer linear W [out, in] reading X, removing the input columns P while minimising
||X W^T - X W'^T||^2 is a quadratic problem in H = X^T X: the optimal change of the kept
columns is the OBS update W -= W_P [H^-1]_PP^-1 [H^-1]_P:, at a cost (saliency)
tr(W_P [H^-1]_PP^-1 W_P^T). Applying it structure by structure, lowest saliency first, and
updating H^-1 the same way leaves the kept columns at exactly the least-squares refit
W_K = W H_:K H_KK^-1 (with the damped H), so no separate refit is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.adapters import Geometry
from compress.calibration import StopForward

__all__ = ["Pools", "attention_pools", "mlp_pools", "layer_hessian", "damped", "damped_inverse", "progressive_obs",
           "DAMPING"]

DAMPING = 0.01  # of the mean diagonal of H, as the paper


@dataclass
class Pools:
    """A sublayer's removable structures. One removal *unit* takes the lowest-saliency block of
    every pool: one pool of KV groups ("group") or of MLP channels, or one pool per KV group of
    its heads ("head": groups stay equal). A block lists items (heads or channels), each `width`
    input columns wide."""

    pools: list[list[list[int]]]
    width: int

    @property
    def units(self) -> int:
        return len(self.pools[0])


def attention_pools(g: Geometry, granularity: str) -> Pools:
    groups = [list(range(k * g.group_size, (k + 1) * g.group_size)) for k in range(g.num_kv_heads)]
    if granularity == "group" or g.group_size == 1:
        return Pools([groups], g.head_dim)
    return Pools([[[h] for h in grp] for grp in groups], g.head_dim)


def mlp_pools(g: Geometry) -> Pools:
    return Pools([[[j] for j in range(g.intermediate)]], 1)


@torch.no_grad()
def layer_hessian(layer: nn.Module, inputs: list[tuple], module: nn.Module, output: bool = False) -> torch.Tensor:
    """X^T X (float64) of what `module` (inside `layer`) reads, or with `output` of what it returns,
    over the layer's recorded inputs (`calibration.layer_inputs` / `run_layer`), taken before any
    mask hook scales it. The layer's forward stops there."""
    h = None

    def take(x):
        nonlocal h
        x = x.reshape(-1, x.shape[-1]).float()
        h = (x.T @ x).double() if h is None else h + (x.T @ x).double()  # float32 products, float64 sums
        raise StopForward

    handle = (module.register_forward_hook(lambda m, a, out: take(out), prepend=True) if output
              else module.register_forward_pre_hook(lambda m, a: take(a[0]), prepend=True))
    try:
        for args, kwargs in inputs:
            try:
                layer(*args, **kwargs)
            except StopForward:
                pass
    finally:
        handle.remove()
    return h


def damped(h: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """H + damping * mean(diag H) * I."""
    lam = damping * h.diagonal().mean().clamp_min(1e-12)
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def damped_inverse(h: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(damped(h, damping)))


def _columns(blocks: list[list[int]], width: int, device) -> torch.Tensor:
    items = torch.tensor(blocks, dtype=torch.long, device=device)  # [n_blocks, items]
    return (items[..., None] * width + torch.arange(width, device=device)).reshape(len(blocks), -1)


def progressive_obs(w: torch.Tensor, hinv: torch.Tensor, pools: Pools, counts, steps: int = 128
                    ) -> tuple[dict[int, torch.Tensor], list[list[int]]]:
    """Remove units lowest OBS saliency first, with the OBS update after each step.

    Returns ({count: W (float64) after removing that many units, removed columns zero},
    items of each removed unit in removal order). A step removes at most units/`steps` units
    (at least one), so large MLPs are pruned in small steps, and never skips a count asked for.
    """
    w, hinv = w.detach().double().clone(), hinv.clone()
    gone = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
    left = [list(p) for p in pools.pools]
    per_step = max(1, pools.units // steps)
    snapshots, order = {}, []
    if 0 in counts:
        snapshots[0] = w.clone()
    for target in sorted(set(counts) - {0}):
        while len(order) < target:
            k = min(per_step, target - len(order))
            picks = []  # per pool: the k lowest-saliency blocks
            for pool in left:
                cols = _columns(pool, pools.width, w.device)  # [n_blocks, b]
                m = hinv[cols[:, :, None], cols[:, None, :]]  # [n_blocks, b, b]
                wp = w[:, cols].permute(1, 2, 0)  # [n_blocks, b, out]
                sal = (wp * torch.linalg.solve(m, wp)).sum((1, 2))
                picks.append(torch.sort(sal, stable=True).indices[:k].tolist())
            units = [[item for pool, p in zip(left, picks) for item in pool[p[j]]] for j in range(k)]
            p = _columns([[i] for u in units for i in u], pools.width, w.device).reshape(-1)
            sol = torch.linalg.solve(hinv[p][:, p], hinv[p])  # [|P|, in]
            w -= w[:, p] @ sol
            hinv -= hinv[:, p] @ sol
            gone[p] = True
            w[:, gone] = 0.0  # exactly, not just to rounding
            for pool, pk in zip(left, picks):
                for j in sorted(pk, reverse=True):
                    pool.pop(j)
            order.extend(units)
        snapshots[target] = w.clone()
    return snapshots, order
