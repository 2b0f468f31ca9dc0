"""`compress bench`: plans drawn in each method's shape, byte accounting, and a full run (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig

from compress.adapters import get_adapter
from compress.cli import main
from compress.loading import load_model
from compress.plan import Plan
from compress.slimming import build_slim_model
from compress.random_plan import PLAN_SHAPES, random_plan
from compress.speed import bytes_per_token


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


def test_bytes_per_token_of_stock_model_equals_keep_all_slim():
    """Two independent models of the same weights: the stock one and our keep-all slim one."""
    model = load_model()
    adapter = get_adapter(model.config)
    keep_all = build_slim_model(model, adapter, Plan.keep_all(adapter.geometry()))
    assert bytes_per_token(model, 2, 100) == bytes_per_token(keep_all, 2, 100)
    g = adapter.geometry()
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert bytes_per_token(model, 2, 100) == weights + 2 * 2 * g.num_kv_heads * g.head_dim * 100 * 4 * g.num_layers


def test_bench_runs_every_engine_and_records_into_a_folder(tmp_path, capsys):
    out = tmp_path / "slim"
    assert main(["export", "--method", "magnitude", "--ratio", "0.5", "--out", str(out), "--eval-windows", "0"]) == 0
    capsys.readouterr()
    assert main(["bench", "--slim", str(out), "--ratio", "0.5", "--random-plan", "disp", "uniform", "--prompt", "16",
                 "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--onnx-graph", "fused", "traced",
                 "--onnx-weights", "float", "int4"]) == 0
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
