"""Plans drawn at random in the shapes the methods make, for speed measurements on models whose
weights do not matter (random-weight `--shape` models): widths and indexing decide the speed.
`compress bench`'s parser reads PLAN_SHAPES, so the module imports torch (with compress.plan) only
when a plan is drawn."""

import random

__all__ = ["PLAN_SHAPES", "random_plan"]

# Shapes of plans drawn at random for speed (values do not matter, widths and indexing do).
PLAN_SHAPES = {
    "uniform": "the same query heads per KV group and MLP channels in every layer (magnitude, wanda-sp)",
    "adaptive": "query heads per KV group and MLP channels that differ from layer to layer (flap, tyr)",
    "disp": "every sublayer reads and writes its own residual subset, MLP channels pruned (DISP)",
    "disp-heads": "disp plus whole KV groups removed (DISP --prune-heads)",
}



def random_plan(g, shape: str, ratio: float, seed: int = 0):
    """A plan of `shape` (see PLAN_SHAPES) removing `ratio` of the linear weights, indices drawn at random."""
    from compress.plan import LayerPlan, Plan

    # per-layer scale of the kept fraction: 1 everywhere, or drawn once for the adaptive shape
    draw = random.Random(seed + 1)
    scales = [draw.uniform(0.5, 1.5) if shape == "adaptive" else 1.0 for _ in range(g.num_layers)]

    def build(f: float) -> Plan:
        rng = random.Random(seed)
        layers = []
        for scale in scales:
            kept = min(1.0, f * scale)

            def pick(n: int) -> list[int]:
                return sorted(rng.sample(range(n), max(1, round(kept * n))))

            lp = LayerPlan(mlp_hidden=pick(g.intermediate))
            if shape in ("uniform", "adaptive"):
                per = max(1, round(kept * g.group_size))
                lp.heads = [k * g.group_size + h for k in range(g.num_kv_heads) for h in range(per)]
            else:
                lp.attn_in, lp.attn_out, lp.mlp_in, lp.mlp_out = (pick(g.hidden) for _ in range(4))
                if shape == "disp-heads":
                    lp.kv_heads = pick(g.num_kv_heads)
                    lp.heads = [k * g.group_size + h for k in lp.kv_heads for h in range(g.group_size)]
            layers.append(lp)
        return Plan(layers=layers)

    lo, hi = 0.0, 1.0  # the kept fraction per structure, by bisection on the achieved ratio
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if build(mid).ratio(g) < ratio else (mid, hi)
    return build(hi)
