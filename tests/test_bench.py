"""`compress bench`: plans drawn in each method's shape, byte accounting, and a full run (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig

from compress.adapters import get_adapter
from compress.cli import main
from compress.plan import Plan
from compress.slimming import build_slim_model
from compress.random_plan import PLAN_SHAPES, random_plan
from compress.speed import bytes_per_token
from tiny import tiny_model


@pytest.mark.parametrize("shape", sorted(PLAN_SHAPES))
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_random_plans_have_their_shape_and_ratio(shape, ratio):
    g = get_adapter(LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=16,
                                num_key_value_heads=8)).geometry()
    plan = random_plan(g, shape, ratio)
    plan.check(g)
    assert abs(plan.ratio(g) - ratio) < 0.02
    layers = [lp.resolved(g) for lp in plan.layers]
    residual_subsets = any(len(lp.attn_in) < g.hidden or len(lp.mlp_out) < g.hidden for lp in layers)
    assert residual_subsets == shape.startswith("disp")
    assert any(len(lp.kv_heads) < g.num_kv_heads for lp in layers) == (shape == "disp-heads")
    if shape == "uniform":
        assert len({len(lp.heads) for lp in layers}) == 1 and len({len(lp.mlp_hidden) for lp in layers}) == 1
    if shape == "adaptive":
        assert len({len(lp.mlp_hidden) for lp in layers}) == g.num_layers  # every layer its own width


# What a decode step reads, written out from the config numbers of tests/tiny.py (float32: 4 bytes).
B, CTX = 2, 100  # sequences, cached tokens


def test_bytes_per_token_of_an_untied_model_reads_one_embedding_row_per_sequence():
    model = tiny_model("llama")  # vocab 4096, hidden 64, 3 layers, 8 heads of 8, 2 KV heads, MLP 96, untied
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.tie_word_embeddings) == (4096, 64, 3, 8, 2, 96, False)
    layer = (64 * 64          # q_proj: 8 heads x 8
             + 2 * 64 * 16    # k_proj, v_proj: 2 KV heads x 8
             + 64 * 64        # o_proj
             + 3 * 64 * 96    # gate, up, down
             + 2 * 64)        # two RMSNorms
    weights = B * 64 + 3 * layer + 64 + 4096 * 64  # an embedding row per sequence, layers, final norm, LM head
    kv = 3 * 2 * 16 * CTX * B  # layers x (K and V) x (2 heads x 8) x tokens x sequences
    assert bytes_per_token(model, B, CTX) == 4 * (weights + kv)
    adapter = get_adapter(model.config)
    keep_all = build_slim_model(model, adapter, Plan.keep_all(adapter.geometry()))
    assert bytes_per_token(keep_all, B, CTX) == 4 * (weights + kv)  # our slim model, the same weights


def test_bytes_per_token_of_a_tied_model_reads_the_table_once_as_the_lm_head():
    model = tiny_model("qwen2")  # as llama above, tied, with q/k/v biases
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.tie_word_embeddings) == \
        (4096, 64, 3, 2, True)
    layer = 64 * 64 + 2 * 64 * 16 + 64 * 64 + 3 * 64 * 96 + 2 * 64 + (64 + 2 * 16)  # + q, k, v biases
    weights = 3 * layer + 64 + 4096 * 64  # the table whole, once (as the LM head), no separate row
    kv = 3 * 2 * 16 * CTX * B
    assert bytes_per_token(model, B, CTX) == 4 * (weights + kv)
    adapter = get_adapter(model.config)
    keep_all = build_slim_model(model, adapter, Plan.keep_all(adapter.geometry()))
    assert bytes_per_token(keep_all, B, CTX) == 4 * (weights + kv)


def test_bytes_per_token_of_learned_positions_reads_one_row_per_sequence():
    model = tiny_model("opt")  # vocab 4096, hidden 64, 3 layers, 8 heads of 8, MLP 96, tied, learned positions
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.ffn_dim,
            c.word_embed_proj_dim, c.tie_word_embeddings) == (4096, 64, 3, 8, 96, 64, True)
    layer = (4 * (64 * 64 + 64)  # q, k, v, o with biases
             + 64 * 96 + 96 + 96 * 64 + 64  # fc1, fc2 with biases
             + 2 * 2 * 64)  # two LayerNorms, weight and bias
    weights = 4096 * 64 + B * 64 + 3 * layer + 2 * 64  # tied table, a position row per sequence, final LayerNorm
    kv = 3 * 2 * 64 * CTX * B  # no grouped KV heads: 8 x 8
    assert bytes_per_token(model, B, CTX) == 4 * (weights + kv)


def test_bytes_per_token_of_an_int4_graph_counts_its_blocks_scales_and_zero_points(tmp_path):
    """The fused graph of an untied llama as above with its layers' MatMuls as int4 MatMulNBits:
    per K x N weight, ceil(K / 32) blocks per column, each 16 bytes of nibbles, a float32 scale
    and a 4-bit zero point (a column's zero points packed two to a byte)."""
    pytest.importorskip("onnxruntime")
    from exporters.onnx_export import export_onnx

    model = tiny_model("llama", num_attention_heads=4, head_dim=16)  # the fused graph's head size: 4 heads of 16
    adapter = get_adapter(model.config)
    slim = build_slim_model(model, adapter, Plan.keep_all(adapter.geometry()))
    path = export_onnx(slim, tmp_path, graph="fused", weights="int4")

    def int4(k, n):
        blocks = -(-k // 32)
        return n * (blocks * 16 + blocks * 4 + -(-blocks // 2))

    # qkv packed (64 -> 64 + 2 x 16 + 2 x 16), o, gate and up (two MatMuls), down (96 -> 64)
    layer = int4(64, 128) + int4(64, 64) + 2 * int4(64, 96) + int4(96, 64) + 4 * 2 * 64  # + norms, float32
    weights = 4 * (B * 64 + 64 + 4096 * 64) + 3 * layer  # embedding rows, final norm, LM head stay float32
    kv = 4 * 3 * 2 * 32 * CTX * B
    assert bytes_per_token(slim, B, CTX, graph=path) == weights + kv


def test_bench_runs_every_engine_and_records_into_a_folder(tmp_path, capsys):
    out = tmp_path / "slim"
    assert main(["export", "--method", "magnitude", "--ratio", "0.5", "--out", str(out), "--eval-windows", "0"]) == 0
    capsys.readouterr()
    assert main(["bench", "--slim", str(out), "--ratio", "0.5", "--random-plan", "disp", "uniform", "--prompt", "16",
                 "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--onnx-graph", "fused", "traced",
                 "--onnx-weights", "float", "int4", "--json", str(tmp_path / "speed-test.json"),
                 "--note", "shared with nothing"]) == 0
    printed = capsys.readouterr().out
    assert "read bandwidth" in printed and "1 threads" in printed
    for row in ("| pytorch | stock transformers |", "| pytorch | dense |", "| pytorch | slim |",
                "| pytorch | random disp@0.5 |", "| pytorch | random uniform@0.5 |",
                "| onnxruntime (CPUExecutionProvider, fused graph) | random disp@0.5 |",
                "| onnxruntime (CPUExecutionProvider, traced graph) | dense |",
                "| onnxruntime (CPUExecutionProvider, fused graph, int4 weights) | random disp@0.5 |"):
        assert row in printed, row
    assert "int4 skipped for dense, traced graph" in printed
    peer = importlib.util.find_spec("onnxruntime_genai") is not None  # CI installs the [peer] extra
    assert ("| onnxruntime-genai (peer) | dense |" in printed) == peer
    assert ("| onnxruntime-genai (ours, fused graph) | random disp@0.5 |" in printed) == peer
    assert ("| onnxruntime-genai (peer, int4) | dense |" in printed) == peer
    assert ("peer skipped: onnxruntime-genai is not installed" in printed) == (not peer)
    record = json.loads((tmp_path / "speed-test.json").read_text())  # the table as printed, and its raw rows
    assert record["section"] == "speed-test" and record["notes"] == ["shared with nothing"]
    table = record["tables"][0]["markdown"]
    assert table in printed and "| pytorch | random disp@0.5 |" in table
    assert {"python", "torch", "transformers", "onnxruntime", "onnxruntime-genai"} <= record["versions"].keys()
    assert record["machine"]["cores"] and record["machine"]["cpu"] and record["machine"]["memory_gib"]
    assert {r["model"] for r in record["data"]["rows"]} >= {"stock transformers", "dense", "slim", "random disp@0.5"}
    speed = json.loads((out / "report.json").read_text())["speed"]
    assert {r["model"] for r in speed["rows"]} == {"stock transformers", "dense", "slim"}
    assert speed["bandwidth"] > 1e8 and speed["batch"] == 1
    torch.set_num_threads(torch.get_num_threads())


def test_random_plan_without_ratio_is_a_one_line_error(capsys):
    assert main(["bench", "--random-plan", "disp", "--no-onnx", "--no-peer"]) == 2
    assert capsys.readouterr().err.strip() == "error: --random-plan draws plans at the --ratio values: give at least one"


def test_table_puts_decode_over_the_peer_of_the_same_weights():
    from compress.speed import Speed, format_table, peer_engine

    rows = [Speed("ours", "dense", 100, 30, 1000), Speed("ours", "slim", 150, 45, 500),
            Speed("ours, int4", "dense", 100, 60, 250), Speed(peer_engine(), "dense", 100, 50, 1000),
            Speed(peer_engine("int4"), "dense", 100, 40, 250)]
    lines = format_table(rows, bandwidth=1e6, batch=1).splitlines()
    assert lines[0].endswith("| decode vs peer |") and lines[1].count("---") == 10
    assert [line.split("|")[-2].strip() for line in lines[2:]] == ["0.60x", "0.90x", "1.50x", "1.00x", "1.00x"]
    assert "vs peer" not in format_table(rows[:2], bandwidth=1e6, batch=1)  # no peer, no column
