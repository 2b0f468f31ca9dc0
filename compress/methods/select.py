"""Scores -> LayerPlans that remove a given fraction of the decoder-layer linear weights.

Shared by the score-based methods (magnitude, wanda-sp, flap): they differ in how they
score a head or an MLP channel, not in how scores become a plan.

Head granularity (GQA):
- "group": remove whole KV groups (q/o of every head in the group and the group's k/v
  rows). Shrinks the KV cache; the step is 1/num_kv_heads of the attention.
- "head": remove the same number of query heads from every group (k/v kept), each group
  keeping at least one. A finer step, but the KV cache stays.
With one query head per KV head (MHA) the two are the same thing ("group" is used).

Allocation:
- "uniform": every layer removes the same fraction of heads (rounded to the granularity);
  the MLP width, the same in every layer, is then solved so the total matches the ratio to
  within half a channel per layer: equal widths are what a stock config can hold (compress.stock).
- "global": FLAP's adaptive structure search. Scores are standardised per structure type
  (per layer, or across all layers), every removable unit (a head unit or an MLP channel)
  goes into one ranking with its real parameter cost, and the lowest are removed until the
  budget is met. Layers end up with different widths; a sublayer may vanish entirely.
"""

from __future__ import annotations

import math

import torch

from compress.adapters import Geometry
from compress.helpers import check_ratio
from compress.methods.base import Method, PruneResult
from compress.methods.options import ALLOCATIONS, GRANULARITIES, STANDARDIZATIONS
from compress.plan import LayerPlan, Plan, linear_params

__all__ = ["select", "head_units", "resolve_granularity", "ScoredMethod", "CalibratedMethod"]


def head_units(g: Geometry, scores: torch.Tensor, granularity: str) -> tuple[list[list[int]], torch.Tensor]:
    """One layer's head units in removal order (lowest score first) and each unit's score.

    "group": a unit is one KV group's query heads, scored by their mean. "head": unit r holds
    the r-th lowest-scoring head of every group, so removing a prefix of units keeps the
    groups equal; scored by the mean of its heads (non-decreasing in r by construction).
    """
    per_group = scores.double().reshape(g.num_kv_heads, g.group_size)
    if granularity == "group" or g.group_size == 1:
        unit_scores, order = torch.sort(per_group.mean(1), stable=True)
        units = [list(range(k * g.group_size, (k + 1) * g.group_size)) for k in order.tolist()]
        return units, unit_scores
    ranked, order = torch.sort(per_group, dim=1, stable=True)  # [kv, gs], ascending within each group
    units = [[k * g.group_size + int(order[k, r]) for k in range(g.num_kv_heads)] for r in range(g.group_size)]
    return units, ranked.mean(0)


def _standardize(x: torch.Tensor, per_layer: bool) -> torch.Tensor:
    """z-scores of [L, ...] scores, over each layer's entries or over all of them."""
    shape, x = x.shape, x.double().reshape(x.shape[0], -1)
    if per_layer:
        mu, sd = x.mean(1, keepdim=True), x.std(1, keepdim=True)
    else:
        mu, sd = x.mean(), x.std()
    return ((x - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))).reshape(shape)


def _attn_params(g: Geometry, kept_heads: list[int]) -> int:
    return linear_params(g, LayerPlan(heads=kept_heads, mlp_hidden=[]))


def _layer_plan(g: Geometry, removed_heads: set[int], mlp_order: list[int], n_mlp_removed: int) -> LayerPlan:
    heads = None if not removed_heads else [h for h in range(g.num_heads) if h not in removed_heads]
    mlp = None if not n_mlp_removed else sorted(mlp_order[n_mlp_removed:])
    return LayerPlan(heads=heads, mlp_hidden=mlp)


def _check_scores(g: Geometry, head_scores: torch.Tensor, mlp_scores: torch.Tensor) -> None:
    if tuple(head_scores.shape[:2]) != (g.num_layers, g.num_heads) or head_scores.dim() not in (2, 3):
        raise ValueError(f"head scores must be [{g.num_layers}, {g.num_heads}] or [{g.num_layers}, "
                         f"{g.num_heads}, k], got {tuple(head_scores.shape)}")
    if tuple(mlp_scores.shape) != (g.num_layers, g.intermediate):
        raise ValueError(f"MLP scores must be [{g.num_layers}, {g.intermediate}], got {tuple(mlp_scores.shape)}")
    if not (torch.isfinite(head_scores).all() and torch.isfinite(mlp_scores).all()):
        raise ValueError("scores contain NaN or inf")


def select(g: Geometry, head_scores: torch.Tensor, mlp_scores: torch.Tensor, ratio: float, *,
           allocation: str = "uniform", head_granularity: str = "group",
           standardize: str = "layer") -> list[LayerPlan]:
    """LayerPlans removing about `ratio` of the linear weights, lowest scores first.

    head_scores: [L, num_heads], or [L, num_heads, k] with k scores per head (e.g. one per
    o_proj column): a head then scores their sum, and under "global" allocation the k
    entries are what is standardised, a head scoring the mean of its standardised entries
    (as FLAP's code). mlp_scores: [L, intermediate]. Higher = more important.
    `standardize` ("layer": per layer and type, as FLAP's code; "type": per type across all
    layers) only matters for "global" allocation.
    """
    check_ratio(ratio)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if head_granularity not in GRANULARITIES:
        raise ValueError(f"head granularity must be one of {GRANULARITIES}, got {head_granularity!r}")
    if standardize not in STANDARDIZATIONS:
        raise ValueError(f"standardize must be one of {STANDARDIZATIONS}, got {standardize!r}")
    _check_scores(g, head_scores, mlp_scores)
    if allocation == "uniform":
        return _uniform(g, head_scores, mlp_scores, ratio, head_granularity)
    return _global(g, head_scores, mlp_scores, ratio, head_granularity, standardize == "layer")


def _uniform(g, head_scores, mlp_scores, ratio, granularity) -> list[LayerPlan]:
    total = g.num_layers * linear_params(g)
    removed_heads, attn_removed = [], 0
    for i in range(g.num_layers):
        units, _ = head_units(g, head_scores[i] if head_scores.dim() == 2 else head_scores[i].sum(-1),
                              granularity)
        n = min(math.floor(ratio * len(units) + 0.5), len(units) - 1)  # never the whole sublayer
        gone = {h for u in units[:n] for h in u}
        removed_heads.append(gone)
        attn_removed += _attn_params(g, list(range(g.num_heads))) - _attn_params(
            g, [h for h in range(g.num_heads) if h not in gone])
    channel = linear_params(g, LayerPlan(heads=[], mlp_hidden=[0]))
    n = math.floor((ratio * total - attn_removed) / channel / g.num_layers + 0.5)  # per layer
    n = max(0, min(n, g.intermediate - 1))
    plans = []
    for i in range(g.num_layers):
        order = torch.sort(mlp_scores[i].double(), stable=True).indices.tolist()
        plans.append(_layer_plan(g, removed_heads[i], order, n))
    return plans


def _global(g, head_scores, mlp_scores, ratio, granularity, per_layer) -> list[LayerPlan]:
    hs = _standardize(head_scores, per_layer)
    if hs.dim() == 3:
        hs = hs.mean(-1)
    ms = _standardize(mlp_scores, per_layer)
    channel = linear_params(g, LayerPlan(heads=[], mlp_hidden=[0]))
    scores, costs, owner = [], [], []  # owner: (layer, "attn" | "mlp")
    layer_units, mlp_orders = [], []
    for i in range(g.num_layers):
        units, unit_scores = head_units(g, hs[i], granularity)
        layer_units.append(units)
        kept = list(range(g.num_heads))
        before = _attn_params(g, kept)
        for u, s in zip(units, unit_scores.tolist()):
            kept = [h for h in kept if h not in u]
            after = _attn_params(g, kept)
            scores.append(s)
            costs.append(before - after)
            owner.append((i, "attn"))
            before = after
        m_sorted, m_order = torch.sort(ms[i], stable=True)
        mlp_orders.append(m_order.tolist())
        scores.extend(m_sorted.tolist())
        costs.extend([channel] * g.intermediate)
        owner.extend([(i, "mlp")] * g.intermediate)
    # Stable sort: equal scores keep each layer's own order, so removals stay prefixes.
    rank = torch.sort(torch.tensor(scores, dtype=torch.float64), stable=True).indices
    cum = torch.cumsum(torch.tensor(costs, dtype=torch.float64)[rank], 0)
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), cum])
    target = ratio * g.num_layers * linear_params(g)
    k = int(torch.argmin((cum - target).abs()))
    n_attn = [0] * g.num_layers
    n_mlp = [0] * g.num_layers
    for j in rank[:k].tolist():
        i, kind = owner[j]
        if kind == "attn":
            n_attn[i] += 1
        else:
            n_mlp[i] += 1
    return [
        _layer_plan(g, {h for u in layer_units[i][:n_attn[i]] for h in u}, mlp_orders[i], n_mlp[i])
        for i in range(g.num_layers)
    ]


def resolve_granularity(setting: str, g: Geometry) -> str:
    """"auto": "group" (it also shrinks k/v and the KV cache) unless there are fewer than
    4 KV groups, where one group is a quarter or more of a layer's attention: too coarse a
    step. On the reference model (2 groups; benchmarks/RESULTS.md) "group" makes uniform
    allocation at ratios 0.3-0.5 drop half of every layer's heads (KL 0.83 against 0.25-0.68
    with "head"), and FLAP's global allocation had a lower KL with "head" at every ratio."""
    if setting == "auto":
        return "head" if 1 < g.group_size and g.num_kv_heads < 4 else "group"
    if setting not in GRANULARITIES:
        raise ValueError(f"head granularity must be 'auto' or one of {GRANULARITIES}, got {setting!r}")
    return "group" if g.group_size == 1 else setting


class ScoredMethod(Method):
    """A method that scores each layer's heads and MLP channels and lets `select` turn the scores
    into a plan. The work is split per layer (`layer_scores`, `layer_replaced`) so the same
    method runs on a model held in memory (`prune`) or streamed from disk one layer at a time
    (compress.source.DenseStream): both paths compute the same numbers in the same order."""

    stats_parts: tuple[str, ...] = ()  # LayerParts whose input statistics `layer_scores` reads
    streamable = True

    def layer_scores(self, adapter, layer, stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(head scores [num_heads] or [num_heads, k], MLP channel scores [intermediate]) of one
        layer, float64 on the CPU; `stats` holds the layer's `stats_parts` input statistics."""
        raise NotImplementedError

    def select_plan(self, g: Geometry, head_scores: torch.Tensor, mlp_scores: torch.Tensor, ratio: float,
                    seed: int) -> Plan:
        return self.plan(g, head_scores, mlp_scores, ratio, seed)

    def layer_replaced(self, adapter, layer, prefix: str, layer_plan: LayerPlan, stats: dict | None
                       ) -> dict[str, torch.Tensor]:
        """Tensors of one layer the method rewrites once the plan is known, keyed by dense name
        (`prefix` is the layer's module name with a trailing dot)."""
        return {}

    def prune(self, model, adapter, ratio: float, calib, seed: int) -> PruneResult:
        check_ratio(ratio)
        layers = adapter.layers(model)
        stats = self.input_stats(model, adapter, calib) if self.stats_parts else [None] * len(layers)
        with torch.no_grad():
            scores = [self.layer_scores(adapter, layer, s) for layer, s in zip(layers, stats)]
        plan = self.select_plan(adapter.geometry(), torch.stack([h for h, _ in scores]),
                                torch.stack([m for _, m in scores]), ratio, seed)
        names = {m: n for n, m in model.named_modules()}
        replaced: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for layer, lp, s in zip(layers, plan.layers, stats):
                replaced.update(self.layer_replaced(adapter, layer, names[layer] + ".", lp, s))
        return PruneResult(plan, replaced)

    def plan(self, g: Geometry, head_scores: torch.Tensor, mlp_scores: torch.Tensor, ratio: float,
             seed: int, allocation: str = "uniform", standardize: str = "layer") -> Plan:
        granularity = resolve_granularity(self.settings["head_granularity"], g)
        layers = select(g, head_scores, mlp_scores, ratio, allocation=allocation,
                        head_granularity=granularity, standardize=standardize)
        settings = {**self.settings, "head_granularity": granularity}
        return Plan(layers=layers, method=self.name, settings=settings, seed=seed)


class CalibratedMethod(ScoredMethod):
    """A scored method that needs activation statistics of the o_proj / down_proj inputs."""

    needs_calibration = True
    stats_parts = ("o", "down")

    def input_stats(self, model, adapter, calib):
        from compress.calibration import collect_input_stats

        return collect_input_stats(model, adapter, calib, self.settings["calib_batch_size"], parts=self.stats_parts)
