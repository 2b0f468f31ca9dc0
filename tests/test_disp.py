"""DISP: plans meet the ratio, are reproducible, and their slim models equal the masked dense model."""

from __future__ import annotations

import argparse
import contextlib
import math

import pytest
import torch

from compress.adapters import get_adapter
from compress.masking import LayerMasks, masked, plan_masks, replaced_weights
from compress.methods import METHODS
from compress.methods.disp import DISP, build_plan, select, structures
from compress.methods.options import add_method_arguments
from compress.methods.refit import refit_plan
from compress.methods.tyr_obs import DAMPING
from compress.methods.disp_hypernet import HyperNetwork, budget_loss, layer_params, relax
from compress.plan import LayerPlan, linear_params
from compress.slimming import build_slim_model
from compress.slim.modeling_slim import CACHE_NAME
from compress.training import checkpointed, frozen
from tiny import TINY_CONFIGS, tiny_model

FAST = {"steps": 3, "batch_size": 2}


def _calib(n=4, seq=16, seed=0):
    return torch.randint(0, 4096, (n, seq), generator=torch.Generator().manual_seed(seed))


def _prune(family="llama", ratio=0.5, seed=0, **settings):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    plan = DISP(**{**FAST, **settings}).prune(model, adapter, ratio, _calib(), seed).plan
    plan.check(adapter.geometry())
    return model, adapter, plan


def _max_channel_cost(g, heads: bool) -> int:
    """Parameters that one channel (or one KV group) of any structure costs in the dense layer."""
    full = dict(structures(g, True))
    return max(linear_params(g) - layer_params(g, **{**full, kind: full[kind] - 1}) for kind, _ in structures(g, heads))


def _assert_parity(model, adapter, plan, tol=1e-5):
    g = adapter.geometry()
    ids = _calib(2, 20, seed=1)
    slim = build_slim_model(model, adapter, plan)
    with torch.no_grad(), masked(model, adapter, plan_masks(plan, g)):
        ref = model(input_ids=ids).logits
    with torch.no_grad():
        out = slim(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= tol


def test_registered_with_cli_options():
    assert METHODS["disp"] is DISP
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    args = parser.parse_args(["--lambda", "4", "--steps", "7", "--prune-heads", "--objective", "kl"])
    options = {k: v for k, v in DISP.defaults.items() if k != "layer_targets"}  # set by tyr+disp, no option
    assert {k: getattr(args, k) for k in options} == {**options, "lam": 4.0, "steps": 7, "prune_heads": True,
                                                      "objective": "kl", "refit": None}  # None: the method's own
    assert not DISP.defaults["prune_heads"]


def test_hypernetwork_shape_and_seeding():
    g = get_adapter(TINY_CONFIGS["llama"]()).geometry()
    widths = [w for _ in range(g.num_layers) for _, w in structures(g, False)]
    assert len(widths) == 5 * g.num_layers
    state = torch.get_rng_state()
    a = HyperNetwork(widths, torch.Generator().manual_seed(3))
    b = HyperNetwork(widths, torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert a.inputs.shape == (len(widths), 1, 32) and a.gru.hidden_size == 64 and a.gru.bidirectional
    assert [t.shape[0] for t in a()] == widths
    assert all(torch.equal(x, y) for x, y in zip(a(), b()))


def test_relaxation_threshold_and_straight_through():
    logits = torch.tensor([-4.0, -3.1, -2.9, 0.0], requires_grad=True)
    soft, hard = relax(logits, None)
    assert torch.equal(soft > 0.5, logits + 3 > 0)
    assert hard.tolist() == [0.0, 0.0, 1.0, 1.0]
    hard.sum().backward()
    assert torch.allclose(logits.grad, soft * (1 - soft) / 0.4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_param_count_matches_plan_accounting(family):
    g = get_adapter(TINY_CONFIGS[family]()).geometry()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        n = [int(torch.randint(1, w + 1, (1,), generator=gen)) for w in (g.hidden, g.hidden, g.hidden,
                                                                         g.intermediate, g.hidden)]
        kv = int(torch.randint(0, g.num_kv_heads + 1, (1,), generator=gen))
        lp = LayerPlan(attn_in=list(range(n[0])), attn_out=list(range(n[1])), mlp_in=list(range(n[2])),
                       mlp_hidden=list(range(n[3])), mlp_out=list(range(n[4])),
                       heads=[q for q in range(g.num_heads) if q // g.group_size < kv], kv_heads=list(range(kv)))
        assert layer_params(g, *n, kv) == linear_params(g, lp)


def test_regulariser_zero_on_budget():
    target = 0.5 * 1000.0
    assert budget_loss(torch.tensor(500.0), target, 16.0).item() == 0.0
    above, below = budget_loss(torch.tensor(1000.0), target, 16.0), budget_loss(torch.tensor(250.0), target, 16.0)
    assert math.isclose(above.item(), 16 * math.log(2), rel_tol=1e-6) and math.isclose(below.item(), above.item())


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_ratio_met_within_one_channel(ratio):
    model, adapter, plan = _prune(ratio=ratio)
    g = adapter.geometry()
    assert abs(plan.ratio(g) - ratio) <= _max_channel_cost(g, False) / (g.num_layers * linear_params(g))
    assert all(lp.heads is None and lp.kv_heads is None for lp in plan.layers)  # heads are kept by default
    assert any(lp.attn_in is not None and lp.attn_in != lp.mlp_in for lp in plan.layers)  # independent selections


def test_same_seed_same_plan():
    a = _prune(seed=5)[2].to_dict()["layers"]
    assert a == _prune(seed=5)[2].to_dict()["layers"]


def test_kl_objective_distils_the_dense_model():
    """objective=kl: the masked model is trained towards the dense model's predictions, not the text."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    calib = _calib(8, 16)

    def kl_after(objective):
        method = DISP(steps=40, batch_size=4, lr=1e-2, objective=objective)
        plan = method.prune(model, adapter, 0.3, calib, 0).plan
        with torch.no_grad():
            dense = model(input_ids=calib).logits.log_softmax(-1)
            with masked(model, adapter, plan_masks(plan, adapter.geometry())):
                pruned = model(input_ids=calib).logits.log_softmax(-1)
        return (dense.exp() * (dense - pruned)).sum(-1).mean().item(), method.trace

    kl, trace = kl_after("kl")
    assert all(t[1] >= -1e-6 for t in trace)  # a KL, not a cross-entropy (which is ~log(vocab) here)
    assert trace[0][1] < 0.5 * math.log(4096)
    assert kl < kl_after("lm")[0]
    with pytest.raises(ValueError, match="objective"):
        DISP(objective="mse").prune(model, adapter, 0.3, calib, 0)


def test_snapshot_is_the_shorter_run():
    """The plan kept at step k of a longer run is what `--steps k` gives (the benchmarks' steps curve)."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    method = DISP(**{**FAST, "steps": 8})
    method.snapshot_steps = frozenset({4, 8, 20})
    last = method.prune(model, adapter, 0.5, _calib(), 0).plan
    assert sorted(method.snapshots) == [4]  # the last step is the result; steps past the end never come
    short = DISP(**{**FAST, "steps": 4}).prune(model, adapter, 0.5, _calib(), 0).plan
    assert method.snapshots[4].to_dict()["layers"] == short.to_dict()["layers"]
    assert last.to_dict()["layers"] != short.to_dict()["layers"]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_slim_equals_masked_dense(family):
    _assert_parity(*_prune(family))


def test_prune_heads_shrinks_kv_cache():
    model, adapter, plan = _prune(ratio=0.5, prune_heads=True)
    g = adapter.geometry()
    assert abs(plan.ratio(g) - 0.5) <= _max_channel_cost(g, True) / (g.num_layers * linear_params(g))
    kv = [g.num_kv_heads if lp.kv_heads is None else len(lp.kv_heads) for lp in plan.layers]
    assert sum(kv) < g.num_layers * g.num_kv_heads
    _assert_parity(model, adapter, plan)
    slim = build_slim_model(model, adapter, plan)
    with torch.no_grad():
        cache = slim(input_ids=_calib(1, 10), use_cache=True)[CACHE_NAME]
    keys = [layer.keys for layer in cache.layers]
    assert [k.shape[1] for k in keys] == kv
    assert sum(k.numel() for k in keys) < g.num_layers * g.num_kv_heads * g.head_dim * 10


def test_one_survivor_selections():
    """At an extreme ratio most selections shrink to their floor of one channel: 1-element lists."""
    model = tiny_model("qwen3")
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    gen = torch.Generator().manual_seed(0)
    scores = [{k: torch.randn(w, generator=gen, dtype=torch.float64) for k, w in structures(g, True)}
              for _ in range(g.num_layers)]
    scores[0]["attn_in"] = torch.full((g.hidden,), -1.0, dtype=torch.float64)
    scores[0]["attn_in"][7] = 5.0
    plan = build_plan(g, select(g, scores, 0.999))
    plan.check(g)
    assert plan.layers[0].attn_in == [7]
    ones = [getattr(lp, f) for lp in plan.layers for f in ("attn_out", "mlp_in", "mlp_out", "mlp_hidden")]
    assert sum(len(ids) == 1 for ids in ones) >= 2
    _assert_parity(model, adapter, plan)


def test_checkpointed_layers_give_the_same_mask_gradients():
    """The CUDA path recomputes each layer in backward; the mask hooks must still see the masks."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    ids = _calib(2, 12)

    norm = adapter.parts(adapter.layers(model)[0]).attn_norm
    calls = []

    def grad(ckpt: bool):
        calls.clear()
        mask = torch.linspace(0.2, 1.0, g.hidden, requires_grad=True)
        ctx = checkpointed(adapter.layers(model)) if ckpt else contextlib.nullcontext()
        hook = norm.register_forward_hook(lambda *a: calls.append(1))
        with frozen(model), ctx, masked(model, adapter, [LayerMasks(attn_in=mask, mlp_out=mask)] * g.num_layers):
            model(input_ids=ids).logits.square().mean().backward()
        hook.remove()
        return mask.grad, len(calls)

    (with_ckpt, n_ckpt), (plain, n_plain) = grad(True), grad(False)
    assert (n_ckpt, n_plain) == (2, 1)  # the layer really was recomputed in backward
    assert torch.allclose(with_ckpt, plain, atol=1e-6)
    assert "forward" not in vars(adapter.layers(model)[0])  # the wrapper is gone afterwards
    assert all(p.requires_grad for p in model.parameters())


def test_default_steps_follow_model_size():
    """The default fits a fixed compute budget: the reference model gets the 2,000-step cap, a
    SmolLM2-135M-shaped model (30 layers, hidden 576) the documented ~730, and double the tokens
    per step halves the steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.loading import load_model
    from compress.methods.disp import default_steps

    ref = load_model()
    assert default_steps(ref, get_adapter(ref.config).geometry(), 4, 256) == 2000
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):
        smol = LlamaForCausalLM(config)
    g = get_adapter(config).geometry()
    steps = default_steps(smol, g, 4, 256)
    assert 700 <= steps <= 760, steps
    assert abs(default_steps(smol, g, 8, 256) - steps / 2) <= 1


def test_layer_targets_are_met_layer_by_layer():
    """Per-layer budgets (as tyr+disp sets them): each layer lands within a few channels of its own."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    targets = [0.8, 0.3, 0.4]
    result = DISP(steps=3, batch_size=2, layer_targets=targets).prune(model, adapter, 0.5, _calib(4, 16), 0)
    for lp, t in zip(result.plan.layers, targets):
        assert abs(linear_params(g, lp) / linear_params(g) - t) < 0.02, (linear_params(g, lp) / linear_params(g), t)


def test_refit_is_the_damped_least_squares_solution():
    """Layer 0's refitted q/k/v and down_proj equal a ridge lstsq on the inputs computed here."""
    model, adapter, plan = _prune(ratio=0.5)
    lp, g = plan.layers[0], adapter.geometry()
    assert lp.attn_in is not None and lp.mlp_hidden is not None
    calib = _calib(4, 16, seed=3)
    replaced = refit_plan(model, adapter, plan, calib, batch_size=2)
    p = adapter.parts(adapter.layers(model)[0])
    with torch.no_grad():
        x = p.attn_norm(model.model.embed_tokens(calib)).reshape(-1, g.hidden).double()

    def ridge(x, w, cols):
        lam = DAMPING * (x.T @ x).diagonal().mean()
        k = torch.tensor(cols)
        a = torch.cat([x[:, k], lam.sqrt() * torch.eye(len(cols), dtype=x.dtype)])
        b = torch.cat([x @ w.double().T, lam.sqrt() * w.double()[:, k].T])
        out = torch.zeros_like(w, dtype=torch.float64)
        out[:, k] = torch.linalg.lstsq(a, b).solution.T
        return out

    for name, mod in (("q_proj", p.q), ("v_proj", p.v)):
        got = replaced[f"model.layers.0.self_attn.{name}.weight"].double()
        assert torch.allclose(got, ridge(x, mod.weight.detach(), lp.attn_in), atol=1e-5), name
    # down_proj reads the MLP channels of the layer as pruned and refitted so far
    seen = []
    h = p.down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])), prepend=True)
    with torch.no_grad(), masked(model, adapter, plan_masks(plan, g)[:1]), replaced_weights(model, replaced):
        model(input_ids=calib)
    h.remove()
    got = replaced["model.layers.0.mlp.down_proj.weight"].double()
    assert torch.allclose(got, ridge(seen[0].double(), p.down.weight.detach(), lp.mlp_hidden), atol=1e-5)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_refitted_slim_equals_masked_dense(family):
    """With --refit the slim model still equals the masked dense one with the refitted tensors swapped in,
    which differs from the plain masked one."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    g, calib = adapter.geometry(), _calib(4, 16)
    result = DISP(**FAST, refit=4, prune_heads=family != "opt").prune(model, adapter, 0.5, calib, 0)
    assert result.replaced
    slim = build_slim_model(model, adapter, result.plan, result.replaced)
    with torch.no_grad():
        with masked(model, adapter, plan_masks(result.plan, g)):
            plain = model(input_ids=calib).logits
            with replaced_weights(model, result.replaced):
                ref = model(input_ids=calib).logits
        out = slim(input_ids=calib).logits
    assert (out - ref).abs().max().item() <= 1e-5
    assert (ref - plain).abs().max().item() > 1e-3


def test_memory_plan_scales_to_the_whole_model():
    """The plan (two layers measured at 32, 64 and 128 tokens, scaled) matches the saved bytes of the whole
    model's step counted directly, at another batch and sequence length."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.methods.disp_memory import _saved_bytes, training_memory
    from compress.reference import MODEL_DIR

    config = AutoConfig.from_pretrained(MODEL_DIR)
    plan = training_memory(config, torch.float32, {}, batch_size=1, seq_len=200)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    adapter = get_adapter(config)
    disp = DISP()
    whole = sum(_saved_bytes(disp, model, adapter, structures(adapter.geometry(), False), 200))
    planned = plan["plain"] - plan["weights"] - plan["backward"] - 16 * sum(
        p.numel() for p in HyperNetwork([w for _ in range(config.num_hidden_layers)
                                         for _, w in structures(adapter.geometry(), False)],
                                        torch.Generator()).parameters())  # AdamW's state: not saved tensors
    assert abs(planned - whole) / whole < 0.01, (planned, whole)
    assert plan["plain"] > plan["checkpointed"] > plan["weights"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    from compress.cli import main

    out = tmp_path / "never"
    assert main(["export", "--method", "disp", "--ratio", "0.5", "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "DISP training memory" in printed and "step total" in printed and "available" in printed
    assert not out.exists()
    assert main(["export", "--method", "flap", "--ratio", "0.5", "--out", str(out), "--dry-run"]) == 2


def test_the_plan_per_process_splits_the_batch_and_shards_the_weights(tmp_path, capsys):
    """N processes: each runs 1/N of the batch (the step's tensors of a 1-process plan at that batch);
    sharded, each holds 1/N of the weights plus the embedding/LM head unit and two layers, each
    gathered twice. The dry run prints both; --world-size belongs to the dry run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.cli import main
    from compress.methods.disp_memory import training_memory
    from compress.reference import MODEL_DIR

    config = AutoConfig.from_pretrained(MODEL_DIR)
    one, two = (training_memory(config, torch.float32, {}, batch_size=b, seq_len=64, world_size=n)
                for b, n in ((2, 1), (4, 2)))
    assert two["plain"] == pytest.approx(one["plain"], rel=1e-9) and two["world_size"] == 2
    model = AutoModelForCausalLM.from_config(config)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    rest = total - config.num_hidden_layers * layer
    assert two["sharded_weights"] == pytest.approx(4 * (total / 2 + 2 * (rest + 2 * layer)))
    assert two["plain_fsdp"] == pytest.approx(two["plain"] - two["weights"] + two["sharded_weights"])

    out = tmp_path / "never"
    assert main(["export", "--method", "disp", "--out", str(out), "--dry-run", "--world-size", "2"]) == 0
    assert "each of 2 processes" in capsys.readouterr().out
    assert main(["export", "--method", "disp", "--out", str(out), "--world-size", "2"]) == 2
    assert "--world-size N (N >= 1) goes with --dry-run" in capsys.readouterr().err
