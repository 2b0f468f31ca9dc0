"""GGUF for llama.cpp (`compress gguf`): llama.cpp itself runs each written file and its logits and
greedy tokens match the slim PyTorch model loaded from the folder by transformers, for a keep-all
plan and for FLAP, Wanda-sp and Týr plans with attention and MLPs removed, on every tiny family
llama.cpp's deci architecture runs and on the reference model; families and plans it cannot run
are refused in one line. Tests that run llama.cpp skip without llama-cpp-python.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.adapters import get_adapter
from compress.cli import main
from compress.loading import load_model, load_tokenizer
from compress.methods import METHODS, PruneResult
from compress.plan import LayerPlan, Plan
from compress.reference import CALIB_TEXT, MODEL_DIR
from compress.slimming import slim_config, slim_state_dict
from compress.textdata import calibration_windows, load_text, token_stream
from compress.errors import UnsupportedModelError
from exporters.gguf_card import gguf_section
from exporters.gguf_export import write_gguf
from exporters.gguf_tokenizer import LLAMA3_SPLIT, pre_tokenizer_name
from exporters.hf_folder import write_model_files, write_weights
from tiny import TINY_CONFIGS, tiny_model

needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python is not installed: pip install 'compress-llm[llamacpp]'")

# The tiny families deci runs (Mistral without its sliding window, Phi-3 with full rotary), and those refused.
RUNS = {"llama": {}, "qwen2": {}, "mistral": dict(sliding_window=None),
        "phi3": dict(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})}
REFUSED = {"qwen3": "q/k norms", "opt": "LayerNorm", "phi3": "rotary on 4 of 8"}
# Per method: (layer whose attention is removed, layer whose MLP is removed). FLAP's layer 0 takes the
# zero-head stand-in, its layer 1 a zero MLP carrying the compensation bias; the others a real
# head-free layer (no KV cache) and a zero MLP without bias.
REMOVED = {"flap": (0, 1), "wanda-sp": (1, 2), "tyr": (2, 0)}
SETTINGS = {"tyr": dict(iterations=2, generations=2, offspring=4, fidelity_windows=[1, 2, 4], hessian_windows=8)}
STEPS = 32  # greedy tokens compared


def write_folder(model, tokenizer, result: PruneResult, out: Path) -> Path:
    """A slim folder as `compress export` writes it (weights, config, modeling files, tokenizer)."""
    adapter = get_adapter(model.config)
    out.mkdir(parents=True)
    write_weights(out, slim_state_dict(model, adapter, result.plan, result.replaced))
    write_model_files(out, slim_config(model, adapter, result.plan, result.replaced), tokenizer)
    return out


def pruned(model, method: str, calib: torch.Tensor) -> PruneResult:
    """`method` at 0.3, then one layer's attention and another's MLP removed by hand."""
    if method == "keep-all":
        return PruneResult(Plan.keep_all(get_adapter(model.config).geometry()))
    result = METHODS[method](**SETTINGS.get(method, {})).prune(model, get_adapter(model.config), 0.3, calib, 0)
    attn, mlp = REMOVED[method]
    result.plan.layers[attn].heads, result.plan.layers[attn].kv_heads = [], None
    result.plan.layers[mlp].mlp_hidden = []
    return result


def llamacpp_matches_slim(folder: Path, gguf: Path, prompt: torch.Tensor) -> dict:
    from compress.runtime.llamacpp_runner import LlamaCppModel
    from validation.gguf_parity import compare_gguf

    slim = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    model = LlamaCppModel(gguf, n_ctx=128, threads=1)
    try:
        return compare_gguf(slim, model, prompt, steps=STEPS)
    finally:
        model.close()


def assert_same(r: dict, tol: float) -> None:
    assert r["float64_error"] <= tol, r
    assert r["greedy_tokens_equal"], r


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL_DIR)


@needs_llamacpp
@pytest.mark.parametrize("method", ["keep-all", "flap", "wanda-sp", "tyr"])
@pytest.mark.parametrize("family", sorted(RUNS))
def test_llamacpp_runs_each_plan_like_the_slim_model(family, method, tokenizer, tmp_path):
    model = tiny_model(family, **RUNS[family])
    calib = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(1))
    folder = write_folder(model, tokenizer, pruned(model, method, calib), tmp_path / "slim")
    write_gguf(folder, tmp_path / "m.gguf")
    prompt = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(2))
    assert_same(llamacpp_matches_slim(folder, tmp_path / "m.gguf", prompt), 1e-4)


@needs_llamacpp
def test_residual_subsets_are_written_dense_and_exact(tokenizer, tmp_path):
    """DISP-style plan: partial residual reads/writes, uneven GQA groups (heads 0, 1, 5 of 8 with 2 KV heads)."""
    model = tiny_model("llama")
    H, I = 64, 96
    plan = Plan(layers=[
        LayerPlan(heads=[], mlp_out=list(range(0, H, 2))),
        LayerPlan(attn_in=list(range(0, H, 2)), attn_out=list(range(1, H, 3)), mlp_in=list(range(8, H)),
                  heads=[0, 1, 5], mlp_hidden=list(range(0, I, 2))),
        LayerPlan(mlp_hidden=[], heads=[2, 3], attn_out=list(range(H // 2))),
    ])
    folder = write_folder(model, tokenizer, PruneResult(plan), tmp_path / "slim")
    layout = write_gguf(folder, tmp_path / "m.gguf")
    assert [(x.heads, x.kv_heads) for x in layout.layers] == [(1, 1), (3, 3), (2, 1)]  # groups of 2 and 1: KV repeated
    assert layout.residual_zeros > 0
    prompt = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(2))
    assert_same(llamacpp_matches_slim(folder, tmp_path / "m.gguf", prompt), 1e-4)


@pytest.fixture(scope="module")
def reference_flap(tmp_path_factory, tokenizer):
    """The reference model (real tokenizer, trained weights) pruned by FLAP with layer 0's attention
    and layer 1's MLP removed, exported by `compress gguf` as f32 and q8_0."""
    model = load_model()
    calib = calibration_windows(token_stream(tokenizer, load_text(CALIB_TEXT)), 64, 8)
    result = pruned(model, "flap", calib)
    root = tmp_path_factory.mktemp("gguf_ref")
    folder = write_folder(model, tokenizer, result, root / "slim")
    (folder / "report.json").write_text("{}\n")
    return folder


@needs_llamacpp
def test_command_checks_records_and_quantizes_the_reference_model(reference_flap, capsys):
    folder = reference_flap
    assert main(["gguf", str(folder), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "ok   gguf " in out and "ok   gguf-tokens" in out, out
    assert main(["gguf", str(folder), "--type", "q8_0", "--threads", "1"]) == 0
    report = json.loads((folder / "report.json").read_text())["gguf"]
    f32, q8 = report["f32"], report["q8_0"]
    assert all(c["passed"] for c in f32["checks"]) and (folder / f32["file"]).is_file()
    assert f32["attention_standins"] == [0] and f32["mlp_standins"] == [1]
    assert q8["bytes"] < 0.4 * f32["bytes"]
    assert q8["quality"]["kl"] < 0.01 and q8["quality"]["agreement"] > 0.95, q8["quality"]
    assert set(q8["feed_forward_length"][i] % 32 for i in range(4)) == {0}  # padded so every row quantizes
    assert not [p for p in (folder / "gguf").iterdir() if p.name.startswith(".")]  # no staging file left


@needs_llamacpp
def test_reference_greedy_text_matches_in_llamacpp(reference_flap, tokenizer, tmp_path):
    write_gguf(reference_flap, tmp_path / "m.gguf")
    prompt = token_stream(tokenizer, "def read_file(path):\n    with open(path) as f:")[None]
    assert_same(llamacpp_matches_slim(reference_flap, tmp_path / "m.gguf", prompt), 1e-4)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_deci_cannot_run_are_refused_in_one_line(family, tokenizer, tmp_path, capsys):
    model = tiny_model(family)
    folder = write_folder(model, tokenizer, PruneResult(Plan.keep_all(get_adapter(model.config).geometry())),
                          tmp_path / "slim")
    assert main(["gguf", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write a GGUF llama.cpp runs") and err.count("\n") == 1
    assert REFUSED[family] in err
    assert not (folder / "gguf").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["gguf", str(tmp_path)]) == 2
    assert "not a model folder" in capsys.readouterr().err
    config = {"probe": {"positions": 0.5}, "norm": "rms", "positions": "rope"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["gguf", str(tmp_path)]) == 2
    assert "Probe Pruning" in capsys.readouterr().err


def test_sliding_window_becomes_the_context_length(tokenizer, tmp_path):
    model = tiny_model("mistral")  # sliding_window 16
    folder = write_folder(model, tokenizer, PruneResult(Plan.keep_all(get_adapter(model.config).geometry())),
                          tmp_path / "slim")
    layout = write_gguf(folder, tmp_path / "m.gguf")
    assert layout.context_length == 16 and "sliding window" in layout.notes[0]


def test_every_tiny_family_is_run_or_refused():
    assert set(TINY_CONFIGS) == set(RUNS) | set(REFUSED)


@pytest.mark.parametrize("steps,name", [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                             {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT},
                                              "behavior": "Isolated", "invert": False},
                                             {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    ({"type": "Metaspace"}, None),
])
def test_pre_tokenizers_map_to_llamacpp_names_or_are_refused(steps, name):
    tokenizer = {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}, "pre_tokenizer": steps}
    if name is None:
        with pytest.raises(UnsupportedModelError, match="pre-tokenizer"):
            pre_tokenizer_name(tokenizer)
    else:
        assert pre_tokenizer_name(tokenizer) == name


def test_model_card_section_names_the_pushed_files():
    report = {"gguf": {"f32": {"file": "gguf/m-F32.gguf", "bytes": 2e6, "checks": [
        {"name": "gguf-tokens", "passed": True, "max_abs_diff": 0.0},
        {"name": "gguf", "passed": True, "max_abs_diff": 3e-6}]},
        "q4_k_m": {"file": "gguf/m-Q4_K_M.gguf", "bytes": 5e5, "quality": {
            "float_ppl": 10.0, "quantized_ppl": 10.5, "kl": 0.02, "agreement": 0.9}}}}
    text = gguf_section(report, "me/m", ("gguf/m-F32.gguf", "gguf/m-Q4_K_M.gguf"))
    assert "ollama run hf.co/me/m:Q4_K_M" in text and "llama-cli -hf me/m:Q4_K_M" in text
    assert "logits within 3e-06" in text and "KL 0.0200" in text
    assert gguf_section(report, "me/m", ("config.json",)) == ""


QUICK = ["--calib-samples", "4", "--seq-len", "32", "--eval-windows", "0", "--threads", "1"]


@needs_llamacpp
def test_export_writes_the_checked_gguf(tmp_path, capsys):
    """`compress export --gguf` writes and checks the file as `compress gguf` does, recorded in the report."""
    from test_pipeline import save_dense

    dense, out = save_dense(tiny_model("llama"), tmp_path / "dense"), tmp_path / "slim"
    argv = ["export", "--model", str(dense), "--method", "flap", "--ratio", "0.3", "--out", str(out), *QUICK]
    assert main([*argv, "--gguf", "f32"]) == 0
    entry = json.loads((out / "report.json").read_text())["gguf"]["f32"]
    assert entry["file"] == "gguf/slim-F32.gguf" and (out / entry["file"]).is_file()
    assert [c["name"] for c in entry["checks"] if c["passed"]] == ["gguf-tokens", "gguf"]


@pytest.mark.parametrize("family,argv,reason", [
    ("llama", ["--method", "probe"], "Probe Pruning"), ("llama", ["--runtime", "probe"], "Probe Pruning"),
    ("qwen3", [], "q/k norms"), ("opt", [], "LayerNorm"), ("phi3", [], "rotary on 4 of 8")])
def test_export_refuses_a_gguf_before_pruning(family, argv, reason, tmp_path, capsys, monkeypatch):
    import compress.pipeline
    from test_pipeline import save_dense

    monkeypatch.setattr(compress.pipeline, "prune", lambda *a, **k: pytest.fail("pruning started"))
    dense, out = save_dense(tiny_model(family), tmp_path / "dense"), tmp_path / "slim"
    argv = ["export", "--model", str(dense), "--ratio", "0.3", "--out", str(out), *QUICK, *argv, "--gguf", "f32"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write a GGUF llama.cpp runs") and err.count("\n") == 1 and reason in err
    assert not out.exists()


@needs_llamacpp
def test_bench_times_dense_and_slim_ggufs_in_llamacpp(tmp_path, capsys):
    """`compress bench --llamacpp TYPE`: a llama.cpp row for the dense and each slim model, their
    ideal decode speedup from the GGUF files' bytes (no timing asserted)."""
    argv = ["bench", "--no-onnx", "--no-peer", "--ratio", "0.5", "--repeats", "1", "--prompt", "8", "--new-tokens", "2",
            "--threads", "1", "--llamacpp", "q8_0", "--json", str(tmp_path / "speed.json"), "--no-pytorch"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| llama.cpp (q8_0) | dense |" in out and "| llama.cpp (q8_0) | magnitude@0.5 |" in out, out
    assert "| pytorch |" not in out
    rows = {r["model"]: r for r in json.loads((tmp_path / "speed.json").read_text())["data"]["rows"]
            if r["engine"] == "llama.cpp (q8_0)"}
    assert 1.5 < rows["dense"]["bytes_per_token"] / rows["magnitude@0.5"]["bytes_per_token"] < 2.5


def test_bench_without_llamacpp_is_one_line(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else find_spec(name, *a))
    assert main(["bench", "--no-onnx", "--no-peer", "--llamacpp", "q4_k_m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'compress-llm[llamacpp]'" in err
