"""Slim model == dense model with the plan applied as masks, for every family and odd plans."""

from __future__ import annotations

import random

import pytest
import torch

from compress.adapters import SUPPORTED_FAMILIES, get_adapter
from compress.errors import PlanMismatchError, UnsupportedModelError
from compress.helpers import positions
from compress.masking import masked, plan_masks
from compress.plan import LayerPlan, Plan, linear_params, model_identity
from compress.slimming import build_slim_model
from tiny import TINY_CONFIGS, tiny_model
from validation.parity import parity_batch

FAMILIES = sorted(TINY_CONFIGS)


def test_every_supported_family_has_a_tiny_config():
    assert set(SUPPORTED_FAMILIES) == set(TINY_CONFIGS)


def odd_plan(g, seed=0) -> Plan:
    """Partial residual sets, a one-channel write, uneven GQA, a removed attention and a removed MLP."""
    rng = random.Random(seed)

    def sub(n, k):
        return sorted(rng.sample(range(n), k))

    layers = []
    for i in range(g.num_layers):
        kv = sub(g.num_kv_heads, max(1, g.num_kv_heads // 2))
        heads = [h for h in range(g.num_heads) if h // g.group_size in kv]
        heads = heads[: max(1, len(heads) - 1)]  # uneven heads per group
        layers.append(LayerPlan(
            attn_in=sub(g.hidden, g.hidden // 2), attn_out=[rng.randrange(g.hidden)],
            mlp_in=sub(g.hidden, 40), mlp_out=sub(g.hidden, 50),
            heads=[] if i == 1 else heads, kv_heads=None if i == 1 else kv,
            mlp_hidden=[] if i == 2 else sub(g.intermediate, 1 if i == 0 else 10),
        ))
    return Plan(layers=layers)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_slim_equals_masked_dense(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    ids, mask = parity_batch(torch.randint(0, 4096, (3, 24), generator=torch.Generator().manual_seed(0)))
    for plan in (Plan.keep_all(g), odd_plan(g)):
        slim = build_slim_model(model, adapter, plan)
        with masked(model, adapter, plan_masks(plan, g)):
            ref = _logits(model, ids, mask)
        diff = (ref - _logits(slim, ids, mask))[mask.bool()].abs().max().item()
        assert diff < 1e-5, (family, diff)
    keep_all = build_slim_model(model, adapter, Plan.keep_all(g))
    assert (_logits(model, ids, mask) - _logits(keep_all, ids, mask))[mask.bool()].abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_kv_cache_matches_masked_dense(family):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    plan = odd_plan(g, seed=1)
    slim = build_slim_model(model, adapter, plan)
    ids, mask = parity_batch(torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(2)))
    kw = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with masked(model, adapter, plan_masks(plan, g)):
        ref = model.generate(ids, **kw)
    out = slim.generate(ids, **kw)
    assert torch.equal(ref, out)
    # The cache really has per-layer KV head counts (0 where attention was removed).
    res = slim(input_ids=ids, attention_mask=mask, use_cache=True)
    kv = [layer.keys.shape[1] for layer in res.past_key_values.layers]
    assert kv == [len(lp.resolved(g).kv_heads) for lp in plan.layers]


def test_linear_params_counts_the_modules():
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dense = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in names)
    assert g.num_layers * linear_params(g) == dense
    plan = odd_plan(g)
    slim = build_slim_model(model, adapter, plan)
    slim_linear = sum(p.numel() for n, p in slim.named_parameters()
                      if n.endswith(".weight") and n.split(".")[-2] in names)
    assert plan.linear_params(g) == (dense, slim_linear)


def test_plan_json_round_trip_and_identity(tmp_path):
    model = tiny_model("qwen3")
    g = get_adapter(model.config).geometry()
    plan = odd_plan(g)
    plan.base = model_identity(model, g)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    again.check_identity(model_identity(model, g))
    other = tiny_model("qwen3", seed=1)
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        again.check_identity(model_identity(other, g))


def test_plan_errors_are_clear():
    g = get_adapter(tiny_model("llama").config).geometry()  # 8 heads, 2 KV heads
    with pytest.raises(PlanMismatchError, match=r"KV heads \[1\] are pruned"):
        Plan(layers=[LayerPlan(heads=[0, 5], kv_heads=[0])] + [LayerPlan()] * 2).check(g)
    with pytest.raises(PlanMismatchError, match="out of range"):
        Plan(layers=[LayerPlan(mlp_hidden=[96])] + [LayerPlan()] * 2).check(g)
    with pytest.raises(PlanMismatchError, match="model has 3"):
        Plan(layers=[LayerPlan()]).check(g)
    with pytest.raises(PlanMismatchError, match="empty"):
        Plan(layers=[LayerPlan(attn_in=[])] + [LayerPlan()] * 2).check(g)


def test_unknown_family_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="supported: llama, mistral, opt, phi3, qwen2, qwen3$"):
        get_adapter(GPT2Config())
