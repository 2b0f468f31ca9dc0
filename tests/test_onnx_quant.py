"""int4 weights (MatMulNBits) in the fused graph: onnxruntime == the slim model holding the
weights we read back from the graph ourselves, the float slim model is measurably not that, and
`compress onnx --weights` writes, checks and records it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from transformers import AutoTokenizer

from compress.adapters import get_adapter
from compress.cli import main
from compress.reference import MODEL_DIR
from compress.slimming import build_slim_model
from exporters.onnx_export import CONFIG_NAME, export_onnx
from exporters.onnx_fused import weight_groups
from exporters.onnx_quant import dequantized_reference
from compress.runtime.onnx_runner import OnnxRunner
from test_onnx import TOL_FP16, TOL_FP32, WIDE, prompts, pruning_plan
from tiny import tiny_model
from validation.onnx_parity import compare_onnx


@pytest.mark.parametrize("weights", ["int4"])
@pytest.mark.parametrize("family", sorted(WIDE))
def test_quantized_graph_computes_the_dequantized_weights(family, weights, tmp_path):
    """Pruned (partial residual reads, odd widths that are no multiple of the block) and quantized."""
    model = tiny_model(family, **WIDE[family])
    adapter = get_adapter(model.config)
    slim = build_slim_model(model, adapter, pruning_plan(adapter.geometry()))
    path = export_onnx(slim, tmp_path, graph="fused", weights=weights)
    ops = [n for n in onnx.load(str(path), load_external_data=False).graph.node]
    quantized = [n for n in ops if n.op_type == "MatMulNBits"]
    float_layers = [n for n in ops if n.op_type == "MatMul" and n.input[1].startswith("model.layers.")]
    groups = sum(len(weight_groups(slim.config, layer, f"model.layers.{i}")) for i, layer in enumerate(slim.model.layers))
    assert len(quantized) == groups and not float_layers  # llama: gate/up/down; qkv, o, gate/up/down; qkv, o
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["weights"]["type"] == weights
    runner = OnnxRunner(tmp_path)
    r = compare_onnx(dequantized_reference(slim, path), runner, prompts(), steps=8)
    assert "error" not in r, r
    assert r["prefill_max_abs_diff"] <= TOL_FP32 and max(r["decode_max_abs_diff"]) <= TOL_FP32
    assert r["greedy_tokens_equal"]
    off = compare_onnx(slim, runner, prompts(), steps=2)["prefill_max_abs_diff"]
    assert off > 10 * TOL_FP32, off  # the float model is not what the graph computes


def test_float16_int4_graph_matches_its_dequantized_reference(tmp_path):
    model = tiny_model("llama", **WIDE["llama"])
    adapter = get_adapter(model.config)
    slim = build_slim_model(model, adapter, pruning_plan(adapter.geometry()))
    path = export_onnx(slim, tmp_path, dtype="float16", graph="fused", weights="int4")
    r = compare_onnx(dequantized_reference(slim, path).half(), OnnxRunner(tmp_path), prompts(), steps=4)
    assert "error" not in r and r["float64_error"] <= TOL_FP16 and r["greedy_tokens_equal"], r


def test_traced_graph_refuses_quantized_weights(tmp_path):
    model = tiny_model("opt")
    adapter = get_adapter(model.config)
    slim = build_slim_model(model, adapter, pruning_plan(adapter.geometry()))
    with pytest.raises(ValueError, match="int4 weights need the fused ONNX graph"):
        export_onnx(slim, tmp_path, weights="int4")


def test_compress_onnx_int4_writes_checks_and_records(tmp_path, capsys):
    dense = tmp_path / "dense"
    tiny_model("llama", **WIDE["llama"]).save_pretrained(dense)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(dense)
    out = tmp_path / "slim"
    args = ["export", "--model", str(dense), "--method", "magnitude", "--ratio", "0.3", "--calib-samples", "8",
            "--seq-len", "32", "--eval-windows", "2"]
    assert main([*args, "--out", str(out), "--onnx-weights", "int4"]) == 2  # refused before any work
    assert "--onnx-weights needs --onnx" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--out", str(tmp_path / "both"), "--onnx", "--onnx-weights", "int4"]) == 0
    assert (tmp_path / "both" / "onnx-int4" / "model.onnx").is_file()
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["onnx", str(out), "--weights", "int4"]) == 0
    printed = capsys.readouterr().out
    assert "onnx int4" in printed and "dequantized int4" in printed and "KL" in printed
    assert (out / "onnx-int4" / "model.onnx").is_file() and not (out / "onnx").exists()
    report = json.loads((out / "report.json").read_text())
    assert all(c["passed"] for c in report["onnx"]["float32-int4"])
    cost = report["onnx_quantization"]["float32-int4"]
    assert cost["kl"] > 0 and np.isfinite(cost["quantized_ppl"])
    assert OnnxRunner(out / "onnx-int4").generate(prompts(1), max_new_tokens=4).new_ids.shape == (1, 4)
