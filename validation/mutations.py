"""Plans wrong in exactly one place: what a parity check must catch.

A slim model built from `mutate(plan, g, kind)` while the reference is masked by `plan` differs
in one index: a kept residual index or MLP channel moved to a pruned neighbour, a query head
swapped for a pruned one of the same KV group, or an MLP channel taken from another layer's
kept set. Tests and benchmarks show with
them that the equivalence checks fail on wrong plans, not only pass on right ones.
"""

from __future__ import annotations

import copy

__all__ = ["MUTATIONS", "mutate"]

MUTATIONS = ("index_off", "head_swapped", "channel_of_another_layer")


def _swap_one(kept: list[int], candidates) -> list[int] | None:
    absent = [c for c in candidates if c not in kept]
    if not kept or not absent:
        return None
    return sorted(kept[1:] + [absent[0]])


def mutate(plan, g, kind: str):
    """A copy of `plan` (resolved against geometry `g`) wrong in exactly one place, the first the
    kind finds from the first layer on; None when the plan offers no such place."""
    if kind not in MUTATIONS:
        raise ValueError(f"mutation {kind!r}: choose from {', '.join(MUTATIONS)}")
    p = copy.deepcopy(plan)
    layers = [lp.resolved(g) for lp in p.layers]
    p.layers = layers
    for i, lp in enumerate(layers):
        if kind == "index_off":
            for field, width in (("attn_in", g.hidden), ("mlp_in", g.hidden), ("mlp_out", g.hidden),
                                 ("mlp_hidden", g.intermediate)):
                kept = getattr(lp, field)
                if 0 < len(kept) < width:
                    off = next(k + 1 for k in kept if k + 1 < width and k + 1 not in kept)
                    setattr(lp, field, sorted([k for k in kept if k != kept[0]] + [off]))
                    return p
        elif kind == "head_swapped":
            for h in lp.heads:
                group = [x for x in range(g.num_heads) if x // g.group_size == h // g.group_size]
                swapped = _swap_one([h] + [x for x in lp.heads if x != h], group)
                if swapped is not None:
                    lp.heads = swapped
                    return p
        elif kind == "channel_of_another_layer":
            for j, other in enumerate(layers):
                foreign = [c for c in other.mlp_hidden if c not in lp.mlp_hidden]
                if j != i and lp.mlp_hidden and foreign and len(lp.mlp_hidden) < g.intermediate:
                    lp.mlp_hidden = sorted(lp.mlp_hidden[1:] + [foreign[0]])
                    return p
    return None
