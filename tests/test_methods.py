"""The score-based methods (magnitude, wanda-sp, flap) and the selection they share."""

from __future__ import annotations

import pytest
import torch

from compress.adapters import get_adapter
from compress.calibration import collect_input_stats
from compress.masking import masked, plan_masks, replaced_weights
from compress.methods import METHODS
from compress.methods.flap import compensation_biases
from compress.methods.select import head_units, select
from compress.plan import LayerPlan, linear_params
from compress.slimming import build_slim_model

from tiny import TINY_CONFIGS, tiny_model

BASELINES = ("magnitude", "wanda-sp", "flap")


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(family):
        if family not in cache:
            model = tiny_model(family)
            cache[family] = (model, get_adapter(model.config))
        return cache[family]
    return get


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(1))


def _prune(name, model, adapter, ratio, calib, **settings):
    method = METHODS[name](**settings)
    return method.prune(model, adapter, ratio, calib if method.needs_calibration else None, seed=0)


def _channel_cost(g):
    return linear_params(g, LayerPlan(heads=[], mlp_hidden=[0]))


def _max_unit_cost(g, granularity):
    """The largest parameter cost of one removable unit: an MLP channel or a head unit
    (the last head unit of a layer also takes the k/v projections with it)."""
    units, _ = head_units(g, torch.zeros(g.num_heads), granularity)
    kept, costs = list(range(g.num_heads)), [_channel_cost(g)]
    for u in units:
        before = linear_params(g, LayerPlan(heads=kept, mlp_hidden=[]))
        kept = [h for h in kept if h not in u]
        costs.append(before - linear_params(g, LayerPlan(heads=kept, mlp_hidden=[])))
    return max(costs)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("name", BASELINES)
def test_plan_ratio_and_slim_parity(name, family, tiny, calib):
    model, adapter = tiny(family)
    g = adapter.geometry()
    total = g.num_layers * linear_params(g)
    x = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(2))
    for ratio in (0.3, 0.5):
        res = _prune(name, model, adapter, ratio, calib)
        plan = res.plan
        plan.check(g)
        assert plan.method == name and plan.seed == 0
        assert all(lp.attn_in is lp.attn_out is lp.mlp_in is lp.mlp_out is None for lp in plan.layers)
        if plan.settings.get("allocation", "uniform") == "uniform":
            tol = g.num_layers * _channel_cost(g) / 2 / total  # equal widths: half a channel per layer
        else:
            tol = _max_unit_cost(g, plan.settings["head_granularity"]) / total
        assert abs(plan.ratio(g) - ratio) <= tol, (plan.ratio(g), ratio)
        slim = build_slim_model(model, adapter, plan, res.replaced)
        with torch.no_grad():
            got = slim(input_ids=x).logits
            with replaced_weights(model, res.replaced), masked(model, adapter, plan_masks(plan, g)):
                want = model(input_ids=x).logits
        assert (got - want).abs().max().item() < 1e-5


def test_uniform_methods_give_every_layer_the_same_heads(tiny, calib):
    model, adapter = tiny("qwen3")
    g = adapter.geometry()
    for name in ("magnitude", "wanda-sp"):
        plan = _prune(name, model, adapter, 0.5, calib).plan
        kept = [len(lp.resolved(g).heads) for lp in plan.layers]
        widths = [len(lp.resolved(g).mlp_hidden) for lp in plan.layers]
        assert len(set(kept)) == 1 and kept[0] < g.num_heads
        assert len(set(widths)) == 1  # what a stock config can hold (compress.stock)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_head_granularity_keeps_gqa_groups_uniform(allocation, tiny, calib):
    model, adapter = tiny("llama")  # 8 query heads in 2 KV groups
    g = adapter.geometry()
    plan = _prune("flap", model, adapter, 0.5, calib, head_granularity="head", allocation=allocation).plan
    assert plan.settings["head_granularity"] == "head"
    pruned_some = False
    for lp in plan.layers:
        r = lp.resolved(g)
        if not r.heads:
            continue  # the whole attention sublayer went (global allocation only)
        per_group = [sum(1 for h in r.heads if h // g.group_size == k) for k in range(g.num_kv_heads)]
        assert len(set(per_group)) == 1 and per_group[0] >= 1
        assert r.kv_heads == list(range(g.num_kv_heads))  # k/v stay
        pruned_some |= len(r.heads) < g.num_heads
    assert pruned_some


def test_auto_granularity(tiny, calib):
    """Whole KV groups, unless there are fewer than 4 of them to step through."""
    llama, qwen3 = tiny("llama"), tiny("qwen3")  # 2 and 4 KV groups
    assert _prune("magnitude", *llama, 0.3, calib).plan.settings["head_granularity"] == "head"
    assert _prune("magnitude", *qwen3, 0.3, calib).plan.settings["head_granularity"] == "group"
    assert _prune("flap", *llama, 0.3, calib).plan.settings["head_granularity"] == "head"


def test_group_granularity_removes_whole_kv_groups(tiny, calib):
    model, adapter = tiny("llama")
    g = adapter.geometry()
    plan = _prune("wanda-sp", model, adapter, 0.5, calib, head_granularity="group").plan
    for lp in plan.layers:
        r = lp.resolved(g)
        assert len(r.kv_heads) == g.num_kv_heads // 2
        assert sorted(r.heads) == [k * g.group_size + j for k in r.kv_heads for j in range(g.group_size)]


def test_flap_bias_compensation_reduces_layer_output_error(tiny, calib):
    """The removed inputs' mean contribution is the best constant stand-in for them, so the
    error on the calibration data drops by exactly ||W_removed @ mean_removed||^2 per token."""
    model, adapter = tiny("opt")  # ReLU MLP: fc2 inputs have a clearly non-zero mean
    g = adapter.geometry()
    res = _prune("flap", model, adapter, 0.5, calib)
    stats = collect_input_stats(model, adapter, calib, progress=False)
    names = {m: n for n, m in model.named_modules()}
    again = {k: v for layer, lp, s in zip(adapter.layers(model), res.plan.layers, stats)
             for k, v in compensation_biases(adapter, layer, names[layer] + ".", lp, s).items()}
    assert again.keys() == res.replaced.keys() and all(torch.equal(again[k], res.replaced[k]) for k in again)
    layer, lp = adapter.layers(model)[1], res.plan.layers[1]
    down = adapter.parts(layer).down
    captured = []
    handle = down.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calib)
    handle.remove()
    x = torch.cat(captured).double()
    w, b = down.weight.double(), down.bias.double()
    mask = torch.zeros(g.intermediate, dtype=torch.float64)
    mask[lp.mlp_hidden] = 1.0
    dense = x @ w.T + b
    plain = (x * mask) @ w.T + b
    compensated = (x * mask) @ w.T + res.replaced[f"{names[down]}.bias"].double()
    err_plain = (plain - dense).pow(2).sum(-1).mean()
    err_comp = (compensated - dense).pow(2).sum(-1).mean()
    assert err_comp < 0.95 * err_plain
    shift = w[:, mask == 0] @ x[:, mask == 0].mean(0)
    torch.testing.assert_close(err_plain - err_comp, shift.pow(2).sum(), rtol=1e-6, atol=1e-9)
    assert _prune("flap", model, adapter, 0.5, calib, bias_compensation=False).replaced == {}


def test_flap_is_deterministic(tiny, calib):
    model, adapter = tiny("qwen2")
    a, b = (_prune("flap", model, adapter, 0.4, calib) for _ in range(2))
    assert a.plan.to_dict() == b.plan.to_dict()
    assert a.replaced.keys() == b.replaced.keys()
    assert all(torch.equal(a.replaced[k], b.replaced[k]) for k in a.replaced)


def test_global_allocation_can_remove_a_sublayer(tiny):
    """A layer whose heads all score far below the rest loses its attention entirely."""
    model, adapter = tiny("mistral")
    g = adapter.geometry()
    heads = torch.rand(g.num_layers, g.num_heads, generator=torch.Generator().manual_seed(0)) + 10
    heads[1] -= 100
    mlp = torch.rand(g.num_layers, g.intermediate, generator=torch.Generator().manual_seed(1)) + 10
    layers = select(g, heads, mlp, 0.3, allocation="global", head_granularity="group", standardize="type")
    assert layers[1].heads == []
    assert layers[0].heads is None and layers[2].heads is None


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_open_interval_is_an_error(ratio, tiny, calib):
    model, adapter = tiny("llama")
    g = adapter.geometry()
    with pytest.raises(ValueError, match="ratio"):
        select(g, torch.zeros(g.num_layers, g.num_heads), torch.zeros(g.num_layers, g.intermediate), ratio)
    for name in BASELINES:
        with pytest.raises(ValueError, match="ratio"):
            _prune(name, model, adapter, ratio, calib)


def test_bad_settings_are_errors(tiny, calib):
    model, adapter = tiny("llama")
    g = adapter.geometry()
    with pytest.raises(TypeError):
        METHODS["flap"](allocaton="global")
    with pytest.raises(ValueError, match="granularity"):
        _prune("magnitude", model, adapter, 0.3, calib, head_granularity="kv")
    with pytest.raises(ValueError, match="allocation"):
        select(g, torch.zeros(g.num_layers, g.num_heads), torch.zeros(g.num_layers, g.intermediate), 0.3,
               allocation="layerwise")
