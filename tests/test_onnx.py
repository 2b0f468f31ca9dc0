"""ONNX export with per-layer KV cache: onnxruntime (CPU) == slim PyTorch, prefill and decode.

One export per family (the dynamo exporter takes seconds per graph), shared by the tests of
that family; the plan prunes residual channels and heads (KV heads differ per layer), removes
the first layer's attention and the last layer's MLP. The families the fused graph covers are
exported both ways ("<family>:fused": 4 heads of 16 dimensions, as GroupQueryAttention needs).
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from compress.adapters import get_adapter
from compress.plan import LayerPlan, Plan
from compress.slim.modeling_slim import CACHE_NAME
from compress.slimming import build_slim_model
from exporters.onnx_export import CONFIG_NAME, DATA_NAME, export_onnx
from exporters.onnx_fused import GENAI_NAME, supported
from compress.runtime.onnx_runner import OnnxRunner
from tiny import TINY_CONFIGS, VOCAB, tiny_model
from validation.onnx_parity import compare_onnx

TOL_FP32 = 1e-4
TOL_FP16 = 1e-2


# Fewer, wider heads (head_dim 16) and even GQA groups: what the fused graph's attention needs.
WIDE = {"llama": dict(num_attention_heads=4, head_dim=16),
        "mistral": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        "qwen2": dict(num_attention_heads=4, head_dim=16),
        "qwen3": dict(num_attention_heads=4, num_key_value_heads=2),  # q/k norms: three MatMuls, two head norms
        "phi3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),  # rotary on 16 of 32 dimensions
        "opt": dict(hidden_size=128, word_embed_proj_dim=128)}  # learned positions, LayerNorm with biases, ReLU


def pruning_plan(g) -> Plan:
    """Layer 0: attention removed (its cache would be empty); layer 1: partial residual reads and
    writes, 3 heads (2 of 4 on wide models: one per KV group), narrower MLP; layer 2: MLP removed,
    2 heads (fewer KV heads than layer 1)."""
    H = g.hidden
    return Plan(layers=[
        LayerPlan(heads=[], mlp_out=list(range(0, H, 2))),
        LayerPlan(attn_in=list(range(0, H, 2)), attn_out=list(range(1, H, 3)), mlp_in=list(range(8, H)),
                  heads=[0, 1, 5] if g.num_heads == 8 else [0, 2], mlp_hidden=list(range(0, g.intermediate, 2))),
        LayerPlan(mlp_hidden=[], heads=[2, 3], attn_out=list(range(H // 2))),
    ])


def prompts(batch: int = 2, length: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS) + [f"{f}:fused" for f in sorted(WIDE)])
def exported(request, tmp_path_factory):
    family, _, graph = request.param.partition(":")
    model = tiny_model(family, **(WIDE[family] if graph else {}))
    adapter = get_adapter(model.config)
    slim = build_slim_model(model, adapter, pruning_plan(adapter.geometry()))
    out = tmp_path_factory.mktemp(f"onnx_{family}_{graph or 'traced'}")
    export_onnx(slim, out, graph=graph or "traced")
    return slim, OnnxRunner(out), out


def test_prefill_decode_and_greedy_match_slim(exported):
    slim, runner, _ = exported
    r = compare_onnx(slim, runner, prompts(), steps=8)
    assert "error" not in r, r
    assert r["prefill_max_abs_diff"] <= TOL_FP32
    assert len(r["decode_max_abs_diff"]) == 8 and max(r["decode_max_abs_diff"]) <= TOL_FP32
    assert r["step_argmax_equal"] and r["greedy_tokens_equal"], r


def test_left_padded_batch_matches_slim_generate(exported):
    slim, runner, _ = exported
    ids = prompts(length=9, seed=1)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    got = runner.generate(ids, max_new_tokens=6, attention_mask=mask, eos_token_id=None)
    want = slim.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                         max_new_tokens=6, eos_token_id=None, pad_token_id=0, **{CACHE_NAME: DynamicCache()})
    np.testing.assert_array_equal(got.ids, want.numpy())


def test_graph_and_config_describe_the_cache(exported):
    slim, runner, out = exported
    cfg = json.loads((out / CONFIG_NAME).read_text())
    heads = slim.config.layer_kv_heads
    assert cfg["num_kv_heads"] == heads and heads[0] == 0 and heads[1] != heads[2]
    assert cfg["cache_layers"] == [1, 2]  # the attention-free layer has no cache tensors
    assert runner.past_names == ["past_key_values.1.key", "past_key_values.1.value",
                                 "past_key_values.2.key", "past_key_values.2.value"]
    assert runner.present_names == [n.replace("past_key_values", "present") for n in runner.past_names]
    assert runner.kv_heads == [heads[1], heads[1], heads[2], heads[2]]
    assert (out / DATA_NAME).stat().st_size > 0
    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    fused = cfg["graph"] == "fused"
    # 2 partial reads, each a GatherElements (Gather copies one element per call on the last axis);
    # 3 partial writes: traced GatherElements + Add + ScatterElements, fused (float32) one
    # ScatterElements with reduction add
    assert ops["GatherElements"] == (2 if fused else 5) and ops["ScatterElements"] == 3, ops
    assert ops["GroupQueryAttention"] == (2 if fused else 0) and runner.shares_cache == fused, ops
    assert not (out / GENAI_NAME).exists()  # KV heads differ per layer: onnxruntime-genai cannot hold the cache
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["past_key_values.2.key"] == ["batch", heads[2], "past_sequence", cfg["head_dim"]]
    assert dims["input_ids"] == ["batch", "sequence"]


def test_onnxruntime_fuses_every_rms_norm(exported, tmp_path):
    """The slim RMSNorm is written so that onnxruntime's optimizer turns each into one kernel."""
    import onnxruntime as ort

    slim, _, out = exported
    if slim.config.norm != "rms":
        pytest.skip("LayerNorm family")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)
    # every norm the graph computes (a layer without attention or MLP skips its norm) is fused
    norms = ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"]
    assert norms >= slim.config.num_hidden_layers and "ReduceMean" not in ops, ops


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    _, runner, _ = exported
    ids = prompts(batch=1)
    a = runner.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.9, seed=3, eos_token_id=None)
    b = runner.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.9, seed=3, eos_token_id=None)
    np.testing.assert_array_equal(a.ids, b.ids)
    greedy = runner.generate(ids, max_new_tokens=5, eos_token_id=None)
    top1 = runner.generate(ids, max_new_tokens=5, do_sample=True, top_k=1, seed=0, eos_token_id=None)
    np.testing.assert_array_equal(greedy.new_ids, top1.new_ids)


def one_layer(family: str, **overrides):
    """A 1-layer model of the family: the checks below are per layer, and exports cost per node."""
    torch.manual_seed(0)
    config = TINY_CONFIGS[family]()
    config.num_hidden_layers = 1
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # as tiny_model: norms and biases away from 1 and 0
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("graph", ["traced", "fused"])
def test_dense_keep_all_export_equals_hf_model(tmp_path, graph):
    model = one_layer("qwen2", **(WIDE["qwen2"] if graph == "fused" else {}))
    adapter = get_adapter(model.config)
    export_onnx(build_slim_model(model, adapter, Plan.keep_all(adapter.geometry())), tmp_path, graph=graph)
    runner = OnnxRunner(tmp_path)
    ids = prompts()
    logits, _ = runner.forward(ids)
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - want).max() <= TOL_FP32
    tokens = model.generate(torch.from_numpy(ids), do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(runner.generate(ids, max_new_tokens=8, eos_token_id=None).ids, tokens.numpy())
    # EOS: the first row's third new token ends it; the row is padded after it, as transformers does.
    eos = int(tokens[0, ids.shape[1] + 2])
    pad = runner.config.get("pad_token_id")
    pad = eos if pad is None else pad
    stopped = model.generate(torch.from_numpy(ids), do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
    np.testing.assert_array_equal(runner.generate(ids, max_new_tokens=8, eos_token_id=eos).ids, stopped.numpy())
    assert (tmp_path / GENAI_NAME).is_file() == (graph == "fused")
    if graph == "fused" and importlib.util.find_spec("onnxruntime_genai"):  # CI installs the [peer] extra
        import onnxruntime_genai as og

        genai = og.Model(str(tmp_path))
        for row, want in zip(ids, tokens.numpy()):  # onnxruntime-genai's own loop and cache, row by row
            params = og.GeneratorParams(genai)
            params.set_search_options(max_length=len(row) + 8, do_sample=False, batch_size=1)
            generator = og.Generator(genai, params)
            generator.append_tokens(row[None].astype(np.int32))
            for _ in range(8):
                generator.generate_next_token()
            np.testing.assert_array_equal(np.asarray(generator.get_sequence(0)), want)


@pytest.mark.parametrize("graph", ["traced", "fused"])
def test_float16_export_runs_on_cpu(tmp_path, graph):
    model = one_layer("llama", **(WIDE["llama"] if graph == "fused" else {}))
    adapter = get_adapter(model.config)
    H = adapter.geometry().hidden
    heads = [0, 1, 4] if graph == "traced" else [1, 3]
    plan = Plan(layers=[LayerPlan(attn_in=list(range(0, H, 2)), mlp_out=list(range(H // 2)), heads=heads)])
    slim = build_slim_model(model, adapter, plan)
    export_onnx(slim, tmp_path, dtype="float16", graph=graph)
    runner = OnnxRunner(tmp_path)
    assert runner.dtype == np.float16 and json.loads((tmp_path / CONFIG_NAME).read_text())["dtype"] == "float16"
    assert next(slim.parameters()).dtype == torch.float32  # the caller's model is left as it was
    r = compare_onnx(slim, runner, prompts(), steps=4)
    assert "error" not in r, r
    assert r["max_abs_diff"] <= TOL_FP16


def test_fused_graph_says_what_it_cannot_express(tmp_path):
    """auto falls back to the traced graph and records it; asking for fused says why not."""
    cases = {"opt": ({}, "head dimension not a multiple of 16"), "llama": ({}, "head dimension not a multiple of 16"),
             "phi3": (dict(num_attention_heads=4), "rotary dimension not a multiple of 16")}  # 8 of 16 rotated
    for family, (overrides, why) in cases.items():
        model = one_layer(family, **overrides)
        adapter = get_adapter(model.config)
        assert why in supported(build_slim_model(model, adapter, Plan.keep_all(adapter.geometry())))
    model = one_layer("llama", **WIDE["llama"])  # 4 heads over 2 KV heads: 2 + 1 kept is uneven
    adapter = get_adapter(model.config)
    slim = build_slim_model(model, adapter, Plan(layers=[LayerPlan(heads=[0, 1, 2])]))
    assert "uneven GQA groups" in supported(slim)
    with pytest.raises(ValueError, match="uneven GQA groups"):
        export_onnx(slim, tmp_path / "fused", graph="fused")
    export_onnx(slim, tmp_path / "auto")
    assert json.loads((tmp_path / "auto" / CONFIG_NAME).read_text())["graph"] == "traced"
    with pytest.raises(ValueError, match="graph"):
        export_onnx(slim, tmp_path / "bad", graph="fast")


def test_shared_cache_is_written_in_place_and_bounded(exported):
    """A fused graph appends to the runner's buffers (no copy): the logits equal the growing cache's."""
    slim, runner, _ = exported
    if not runner.shares_cache:
        with pytest.raises(ValueError, match="need a fused graph"):
            runner.forward(prompts(length=3), past=runner.shared_cache(2, 4))
        return
    ids = prompts(length=7, seed=2)
    cache = runner.shared_cache(2, 9)
    before = [b.copy() for b in cache.buffers]
    shared, _ = runner.forward(ids, past=cache)
    grown, past = runner.forward(ids)
    assert cache.length == 7 and all(not np.array_equal(a, b) for a, b in zip(before, cache.buffers))
    np.testing.assert_allclose(shared, grown, atol=1e-6)
    np.testing.assert_allclose(cache.buffers[0][:, :, :7], past[0], atol=0)
    nxt = ids[:, :2]
    with pytest.raises(ValueError, match="holds 9 tokens"):
        runner.forward(np.concatenate([nxt, nxt], 1), past=cache)


def test_fused_graph_adds_the_biases_of_removed_sublayers(tmp_path):
    """FLAP-style: a layer whose attention (or MLP) is gone still adds its compensation bias, at its
    residual channels; the fused graph adds it as a constant."""
    model = tiny_model("llama", **WIDE["llama"])
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    H = g.hidden
    plan = Plan(layers=[LayerPlan(heads=[], attn_out=list(range(0, H, 3))),
                        LayerPlan(mlp_hidden=[]),
                        LayerPlan(heads=[1, 3])])
    gen = torch.Generator().manual_seed(0)
    replaced = {"model.layers.0.self_attn.o_proj.bias": torch.randn(H, generator=gen),
                "model.layers.1.mlp.down_proj.bias": torch.randn(H, generator=gen)}
    slim = build_slim_model(model, adapter, plan, replaced)
    assert slim.model.layers[0].self_attn.out_bias is not None and slim.model.layers[1].mlp.out_bias is not None
    export_onnx(slim, tmp_path, graph="fused")
    r = compare_onnx(slim, OnnxRunner(tmp_path), prompts(), steps=4)
    assert "error" not in r, r
    assert r["prefill_max_abs_diff"] <= TOL_FP32 and max(r["decode_max_abs_diff"]) <= TOL_FP32
