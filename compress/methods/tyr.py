"""Týr-the-Pruner (arXiv 2503.09657): per-sublayer sparsity found by searching a supernet.

1. Local pruning (`tyr_obs`): each attention / MLP sublayer loses o_proj / down_proj input
   structures (heads, as `select`'s GQA granularity, or MLP channels) lowest OBS saliency
   first, the kept columns refitted by the OBS updates (= least squares on H = X^T X).
2. Supernet: every sublayer pruned at 2*levels+1 sparsities around its centre (those in
   [0, 100%]: a sublayer may be kept whole or removed), built layer by
   layer with expectation error accumulation: the next layer reads the output of the
   density-weighted mean of the variants' weights (o_proj / down_proj are linear, so this is
   the density-weighted mean of the variants' outputs). Variants that would take more than a
   quarter of the available memory are written to safetensors files in a temporary folder and
   read back (memory-mapped) when a candidate uses them.
3. Search: elitist evolution. Offspring apply k = min(U(1,4), U(1,4)) shifts, each making one
   sublayer a level denser and another of the same type a level sparser (levels are whole
   units of the same size, so the removed parameters stay put). Fitness is KL(dense || pruned)
   on the last calibration windows, multi-fidelity: all offspring on few windows, the best
   quarter on more, the best sixteenth (and the parent, scored once) on the most. Candidates
   are scored `candidate_batch` at a time in one forward (8 on CUDA, 1 on CPU): each has its
   own part of the batch and its own o_proj / down_proj weights there (a batched matmul). Coarse to
   fine: each iteration halves the level step (12.5% of a sublayer's units, then 6.25%, ...)
   around the best assignment and rebuilds the supernet from the dense weights.
4. The best assignment is pruned once more sequentially (each layer's Hessian from the
   already-pruned layers below it), and its o_proj / down_proj go into `replaced`.

The search saves its position after every generation (`store`, compress.checkpoint): the
iteration's centres, the best assignment, the offspring's generator; a resumed run rebuilds that
iteration's supernet from the centres and goes on. Under several processes the candidates are
scored in turns; the supernet is built alike on every process (each sublayer's Hessian depends on
the expected weights of the sublayer before it, and OBS levels are progressive: no split).

Differences from the paper (CPU-sized defaults): 3 iterations x 6 generations x 16 offspring
instead of 4 x 50 x 128; fitness windows 1 / 4 / 16 calibration windows instead of 2K / 16K /
128K tokens; the saliency is the second-order term only (the first-order one vanishes when
the target is the layer's own dense output). With "head" granularity an attention sublayer
removed whole also drops its k/v (one unit more), so offspring may miss the budget by one unit;
the final MLP widths absorb it, so the plan meets the ratio to within one MLP channel.
"""

from __future__ import annotations

import contextlib
import functools
import random
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from compress import memory

from compress.adapters import Adapter, Geometry
from compress.checkpoint import Checkpoint, fingerprint
from compress.masking import replaced_weights
from compress.methods.base import PruneResult, register
from compress.methods.options import DEFAULTS
from compress.helpers import check_ratio
from compress.methods.select import CalibratedMethod, resolve_granularity
from compress.calibration import layer_inputs, run_layer
from compress.methods.tyr_obs import (Pools, attention_pools, damped_inverse, layer_hessian, mlp_pools,
                                      progressive_obs)
from compress.plan import LayerPlan, Plan, linear_params

__all__ = ["Tyr"]

FIRST_STEP = 0.125  # level step of the first supernet, as a fraction of a sublayer's units


class _Space:
    """Sublayers 2l (attention) and 2l+1 (MLP): their units, consumers and parameter costs."""

    def __init__(self, model, adapter: Adapter, granularity: str):
        g = self.g = adapter.geometry()
        names = {m: n for n, m in model.named_modules()}
        self.pools: list[Pools] = []
        self.modules = []
        for layer in adapter.layers(model):
            p = adapter.parts(layer)
            self.pools += [attention_pools(g, granularity), mlp_pools(g)]
            self.modules += [p.o, p.down]
        self.names = [f"{names[m]}.weight" for m in self.modules]
        self.total = g.num_layers * linear_params(g)
        attn = attention_pools(g, granularity)
        self.attn_cost = [linear_params(g, LayerPlan(mlp_hidden=[]))
                          - linear_params(g, _attn_plan(g, attn, c)) for c in range(attn.units + 1)]
        self.channel = linear_params(g, LayerPlan(heads=[], mlp_hidden=[0]))

    def units(self, i: int) -> int:
        return self.pools[i].units

    def removed(self, counts: list[int]) -> int:
        return sum(self.attn_cost[c] if i % 2 == 0 else c * self.channel for i, c in enumerate(counts))

    def uniform(self, ratio: float) -> list[int]:
        """Every attention the same count, MLP widths spread to meet the ratio."""
        n_attn, n_mlp, L = self.units(0), self.units(1), self.g.num_layers
        target = ratio * self.total
        a = min(round(ratio * n_attn), n_attn)
        while a and L * self.attn_cost[a] > target:
            a -= 1
        m = max(0, min(round((target - L * self.attn_cost[a]) / self.channel), L * n_mlp))
        return [a if i % 2 == 0 else m * (i // 2 + 1) // L - m * (i // 2) // L for i in range(2 * L)]

    def repair(self, counts: list[int], ratio: float) -> list[int]:
        """Shift MLP widths so the total removed is the target to within one channel."""
        counts = list(counts)
        need = round((ratio * self.total - self.removed(counts)) / self.channel)
        while need:
            sign = 1 if need > 0 else -1
            movable = [i for i in range(1, len(counts), 2) if 0 <= counts[i] + sign <= self.units(i)]
            if not movable:
                break
            for i in movable[:abs(need)]:
                counts[i] += sign
                need -= sign
        return counts

    @property
    def slack(self) -> int:
        """What an attention sublayer's last unit costs beyond a normal one: its k/v ("head"
        granularity), which a budget-preserving shift cannot balance."""
        return self.attn_cost[-1] - self.attn_cost[-2] - self.attn_cost[1]

    def layer_plans(self, orders: list[list[list[int]]], counts: list[int]) -> list[LayerPlan]:
        g, plans = self.g, []
        for l in range(g.num_layers):
            gone_h = {h for u in orders[2 * l][:counts[2 * l]] for h in u}
            gone_m = {j for u in orders[2 * l + 1][:counts[2 * l + 1]] for j in u}
            plans.append(LayerPlan(
                heads=[h for h in range(g.num_heads) if h not in gone_h] if gone_h else None,
                mlp_hidden=[j for j in range(g.intermediate) if j not in gone_m] if gone_m else None))
        return plans


def _attn_plan(g: Geometry, pools: Pools, c: int) -> LayerPlan:
    """Attention with c units removed (which heads does not change the cost)."""
    gone = {h for pool in pools.pools for block in pool[:c] for h in block}
    return LayerPlan(heads=[h for h in range(g.num_heads) if h not in gone], mlp_hidden=[])


@contextlib.contextmanager
def _per_candidate(modules, stacks):
    """Each module applies stacks[i][g] ([G, out, in]) to the g-th of G equal parts of its batch."""
    try:
        for mod, w in zip(modules, stacks):
            mod.forward = functools.partial(_grouped_linear, w, mod.bias)
        yield
    finally:
        for mod in modules:
            mod.__dict__.pop("forward", None)


def _grouped_linear(w: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    y = torch.bmm(x.reshape(w.shape[0], -1, x.shape[-1]), w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])
    return y if bias is None else y + bias


class _Position:
    """Where the search is, as a resumable state (compress.checkpoint): the counts the iteration
    started from (its supernet's centres), the best so far, and the offspring's random generator."""

    def __init__(self, counts: list[int], rng: random.Random):
        self.start, self.parent, self.rng = list(counts), list(counts), rng

    def state_dict(self) -> dict[str, torch.Tensor]:
        version, words, gauss = self.rng.getstate()
        assert version == 3 and gauss is None  # the search draws integers only
        return {"start": torch.tensor(self.start), "parent": torch.tensor(self.parent),
                "rng": torch.tensor(words, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.start, self.parent = state["start"].tolist(), state["parent"].tolist()
        self.rng.setstate((3, tuple(state["rng"].tolist()), None))


@register
class Tyr(CalibratedMethod):
    """Supernet of OBS-pruned sublayers, elitist evolutionary search of per-sublayer sparsity."""

    name = "tyr"
    streamable = False  # its supernet search runs the whole model
    data_parallel = True  # the ranks score the candidates in turns (the rest runs on each, alike)
    defaults = DEFAULTS["tyr"]

    def prune(self, model, adapter: Adapter, ratio: float, calib, seed: int) -> PruneResult:
        check_ratio(ratio)
        s = self.settings
        if s["levels"] < 1 or s["iterations"] < 0 or s["generations"] < 0 or s["offspring"] < 1:
            raise ValueError("tyr: levels and offspring must be >= 1, iterations and generations >= 0")
        if s["candidate_batch"] is not None and s["candidate_batch"] < 1:
            raise ValueError("tyr: --candidate-batch must be >= 1")
        g = adapter.geometry()
        granularity = resolve_granularity(s["head_granularity"], g)
        space = _Space(model, adapter, granularity)
        hess = calib[:s["hessian_windows"]]
        fid = [min(n, calib.shape[0]) for n in s["fidelity_windows"]]
        windows = calib[calib.shape[0] - max(fid):]
        dense = self._logprobs(model, windows)
        counts = space.uniform(ratio)
        budget = space.removed(counts)
        pos = _Position(counts, random.Random(seed))
        gens = s["generations"]
        run = fingerprint(model, adapter, calib, method=self.name, ratio=ratio, seed=seed, **s)
        state = Checkpoint(self.store, "tyr", run, {"search": pos}, dense.device)
        done, saved = state.restore()  # generations done, over all iterations
        self.trace = [tuple(t) for t in saved.get("trace", [])]  # per iteration: (best fitness, offspring removed)
        with tempfile.TemporaryDirectory(prefix="tyr-supernet-") as spill, state:
            for it in range(done // gens if gens else 0, s["iterations"]):
                if not gens or done % gens == 0:  # an iteration from its start
                    pos.start, saved = list(pos.parent), {}
                steps = [max(1, round(FIRST_STEP / 2 ** it * space.units(t))) for t in (0, 1)]
                variants = self._supernet(model, adapter, space, hess, pos.start, steps, Path(spill))
                best, scored = self._search(model, space, variants, steps, budget, windows, dense, fid, pos,
                                            f"tyr {it + 1}/{s['iterations']}", state, it, saved)
                self.trace.append((best, scored))
                done = (it + 1) * gens
        counts = space.repair(list(pos.parent), ratio)
        weights, orders = self._final(model, adapter, space, hess, counts)
        plan = Plan(layers=space.layer_plans(orders, counts), method=self.name,
                    settings={**s, "head_granularity": granularity}, seed=seed)
        return PruneResult(plan, weights)

    def _logprobs(self, model, ids: torch.Tensor) -> torch.Tensor:
        b = self.settings["calib_batch_size"]
        with torch.inference_mode():
            return torch.cat([torch.log_softmax(model(input_ids=ids[i:i + b], use_cache=False).logits.float(), -1)
                              for i in range(0, ids.shape[0], b)])

    def _hessians(self, model, adapter, space: _Space, hess, weights: dict, desc: str):
        """(i, H of sublayer i's consumer input) in order, with the tensors in `weights` (which the
        caller extends between steps) in place. The model runs one layer at a time from recorded
        layer inputs, so the cost is one pass over the model per pass over the sublayers."""
        inputs = layer_inputs(model, adapter, hess, self.settings["calib_batch_size"])
        layers = adapter.layers(model)
        for l, layer in enumerate(tqdm(layers, desc=desc, unit="layer", leave=False)):
            for i in (2 * l, 2 * l + 1):
                with replaced_weights(model, weights):
                    h = layer_hessian(layer, inputs, space.modules[i])
                yield i, h
            if l + 1 < len(layers):
                with replaced_weights(model, weights):
                    inputs = run_layer(layer, inputs)

    def _supernet(self, model, adapter, space: _Space, hess, centres, steps, spill: Path) -> list:
        """Per sublayer {count removed: weight}, built with expectation error accumulation.

        When the variants would take more than a quarter of the available memory
        (`memory.spill_needed`), each sublayer's are written to a safetensors file under `spill`
        and read back when a candidate uses them (`memory.OnDisk`), so only one model's worth is
        in memory at a time.
        """
        levels = 2 * self.settings["levels"] + 1
        size = sum(levels * m.weight.numel() * m.weight.element_size() for m in space.modules)
        on_disk = memory.spill_needed(size)
        variants, expected = [], {}
        for i, h in self._hessians(model, adapter, space, hess, expected, "tyr supernet"):
            mod, hinv = space.modules[i], damped_inverse(h)
            n, step = space.units(i), steps[i % 2]
            want = [centres[i] + e * step for e in range(-self.settings["levels"], self.settings["levels"] + 1)]
            ws, _ = progressive_obs(mod.weight, hinv, space.pools[i], [c for c in want if 0 <= c <= n])
            density = {c: 1.0 - c / n for c in ws}
            mean = sum(d * ws[c] for c, d in density.items()) / max(sum(density.values()), 1e-12)
            expected[space.names[i]] = mean.to(mod.weight.dtype)
            ws = {c: w.to(mod.weight.dtype) for c, w in ws.items()}
            variants.append(memory.OnDisk(spill, ws) if on_disk else ws)
        return variants

    def _search(self, model, space: _Space, variants, steps, budget, windows, dense, fid, pos, desc,
                state: Checkpoint, it: int, saved: dict):
        """Generations of iteration `it` from `pos` (and `saved`, a resumed search's best and scored
        so far); `state` saves after each. (best fitness, removed parameters of every offspring)."""
        s, rng, gens = self.settings, pos.rng, self.settings["generations"]

        def fitness(cands, n):
            return self._fitness(model, space, variants, cands, windows[:n], dense[:n])

        def mutate(parent):
            for _ in range(100):
                child = list(parent)
                for _ in range(min(rng.randint(1, 4), rng.randint(1, 4))):
                    t = rng.randint(0, 1)
                    denser = [i for i in range(t, len(child), 2) if child[i] - steps[t] in variants[i]]
                    sparser = [i for i in range(t, len(child), 2) if child[i] + steps[t] in variants[i]]
                    pairs = [(a, b) for a in denser for b in sparser if a != b]
                    if pairs:
                        a, b = rng.choice(pairs)
                        child[a] -= steps[t]
                        child[b] += steps[t]
                if child != parent and abs(space.removed(child) - budget) <= space.slack:
                    return child
            return None

        parent, top = pos.parent, fid[-1]
        best, scored = saved["best"] if saved else fitness([parent], top)[0], saved.get("scored", [])
        first = saved.get("generation", 0)
        bar = tqdm(range(first, gens), desc=desc, unit="gen", dynamic_ncols=True, initial=first, total=gens,
                   disable=not self.world.writer)
        for gen in bar:
            kids = [k for k in (mutate(parent) for _ in range(s["offspring"])) if k is not None]
            scored += [space.removed(k) for k in kids]
            for n, keep in zip(fid[:-1], (max(1, len(kids) // 4), max(1, len(kids) // 16))):
                scores = fitness(kids, n)
                kids = [k for _, k in sorted(zip(scores, kids), key=lambda sk: sk[0])][:keep]
            for k, f in zip(kids, fitness(kids, top)):
                if f < best:
                    parent, best = k, f
            pos.parent = parent
            bar.set_postfix(kl=f"{best:.4f}")
            state.after_step(it * gens + gen + 1, s["iterations"] * gens,
                             {"trace": self.trace + ([(best, scored)] if gen + 1 == gens else []), "best": best,
                              "scored": scored, "generation": gen + 1})
        return best, scored

    def _fitness(self, model, space: _Space, variants, cands, windows, dense) -> list[float]:
        """KL(dense || candidate) per token on `windows`, for each candidate.

        Up to `candidate_batch` candidates share a forward: the batch holds each candidate's copy
        of the windows, and o_proj / down_proj apply each candidate's own weights to its part
        (a batched matmul), which is what keeps a GPU busy on one-window fidelities. Several ranks
        score the candidates in turns and exchange the scores.
        """
        group = self.settings["candidate_batch"] or (8 if windows.is_cuda else 1)
        out, mine = [], self.world.turns(cands)
        for a in range(0, len(mine), group):
            chunk = mine[a:a + group]
            if len(chunk) == 1:
                repl = {name: variants[i][chunk[0][i]] for i, name in enumerate(space.names)}
                with replaced_weights(model, repl):
                    logp = self._logprobs(model, windows)
                out.append(float((dense.exp() * (dense - logp)).sum(-1).mean()))
                continue
            stacks = [torch.stack([variants[i][c[i]] for c in chunk]) for i in range(len(space.modules))]
            with _per_candidate(space.modules, stacks):
                out += self._grouped_kl(model, windows, dense, len(chunk))
        return self.world.gather(out, len(cands), dense.device)

    def _grouped_kl(self, model, windows, dense, G: int) -> list[float]:
        b = max(1, self.settings["calib_batch_size"] // G)
        sums = torch.zeros(G, dtype=torch.float64, device=dense.device)
        with torch.inference_mode():
            for j in range(0, windows.shape[0], b):
                ref = dense[j:j + b]
                logits = model(input_ids=windows[j:j + b].repeat(G, 1), use_cache=False).logits.float()
                logp = torch.log_softmax(logits, -1).view(G, *ref.shape)
                sums += (ref.exp() * (ref - logp)).sum(-1).flatten(1).sum(1).double()
        return (sums / (dense.shape[0] * dense.shape[1])).tolist()

    def _final(self, model, adapter, space: _Space, hess, counts):
        """Prune to `counts`, each sublayer's Hessian from the pruned sublayers before it."""
        weights, orders = {}, []
        for i, h in self._hessians(model, adapter, space, hess, weights, "tyr final"):
            mod = space.modules[i]
            ws, order = progressive_obs(mod.weight, damped_inverse(h), space.pools[i], [counts[i]])
            orders.append(order)
            if counts[i]:
                weights[space.names[i]] = ws[counts[i]].to(mod.weight.dtype)
        return weights, orders
