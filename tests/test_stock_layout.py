"""The stock layout (compress.stock): a plan with the same widths in every layer is written as the
dense family's own model, which transformers loads with trust_remote_code=False and which
computes what the masked dense model computes (float64); other plans stay slim, or are refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress import export, prune
from compress.adapters import get_adapter
from compress.errors import CompressError
from compress.masking import masked, plan_masks, replaced_weights
from compress.methods import PruneResult
from compress.plan import LayerPlan, Plan
from compress.stock import choose_layout
from validation.parity import parity_batch, _logits
from tiny import TINY_CONFIGS, tiny_model

CALIB = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(0))


def uniform_plan(model, seed: int = 0) -> Plan:
    """Different indices in every layer, the same counts: half the KV groups with half their query
    heads each (all heads where the family cannot prune them), two thirds of the MLP."""
    g, rng = get_adapter(model.config).geometry(), random.Random(seed)
    layers = []
    for _ in range(g.num_layers):
        heads = None
        if get_adapter(model.config).stock_head_dim:
            kv = sorted(rng.sample(range(g.num_kv_heads), max(1, g.num_kv_heads // 2)))
            per = max(1, g.group_size // 2)
            heads = sorted(h for k in kv for h in rng.sample(range(k * g.group_size, (k + 1) * g.group_size), per))
        layers.append(LayerPlan(heads=heads, mlp_hidden=sorted(rng.sample(range(g.intermediate),
                                                                          2 * g.intermediate // 3))))
    return Plan(layers)


def masked_logits(model, plan: Plan, replaced: dict, ids, mask) -> torch.Tensor:
    adapter = get_adapter(model.config)
    dense = AutoModelForCausalLM.from_config(model.config).to(torch.float64).eval()
    dense.load_state_dict(model.state_dict())
    with replaced_weights(dense, {k: v.double() for k, v in replaced.items()}), \
            masked(dense, adapter, plan_masks(plan, adapter.geometry())):
        return _logits(dense, ids, mask)


def check_stock(model, result, folder) -> None:
    report = export(model, result, folder, calib=CALIB, layout="stock")
    assert report["layout"] == "stock" and all(c["passed"] for c in report["parity"])
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and not list(folder.glob("*.py"))
    assert config["architectures"] == [type(model).__name__]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, dtype=torch.float64).eval()
    assert type(loaded).__name__ == type(model).__name__
    ids, mask = parity_batch(torch.randint(0, 4096, (3, 32), generator=torch.Generator().manual_seed(2)))
    diff = (masked_logits(model, result.plan, result.replaced, ids, mask) - _logits(loaded, ids, mask))
    assert diff[mask.bool()].abs().max().item() < 1e-9


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_uniform_plan_exports_the_stock_family(family, tmp_path):
    model = tiny_model(family)
    check_stock(model, PruneResult(uniform_plan(model)), tmp_path / "stock")


def test_wanda_sp_plan_is_stock_under_auto(tmp_path):
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    six_heads = prune(model, "wanda-sp", 0.3, CALIB).plan  # LlamaConfig wants hidden_size % heads == 0
    with pytest.raises(CompressError, match=r"LlamaConfig refuses these widths \(The hidden size \(64\)"):
        choose_layout("stock", model, adapter, six_heads, set())
    result = prune(model, "wanda-sp", 0.5, CALIB)
    assert choose_layout("auto", model, adapter, result.plan, set(result.replaced)) == "stock"
    check_stock(model, result, tmp_path / "stock")


def test_flap_plan_falls_back_to_slim_and_stock_is_refused(tmp_path):
    model = tiny_model("llama")
    result = prune(model, "flap", 0.4, CALIB)
    report = export(model, result, tmp_path / "auto", calib=CALIB, layout="auto")
    assert report["layout"] == "slim" and (tmp_path / "auto" / "modeling_slim.py").is_file()
    with pytest.raises(CompressError, match=r"^--layout stock: .+; export with --layout slim") as e:
        export(model, result, tmp_path / "stock", calib=CALIB, layout="stock")
    assert "\n" not in str(e.value) and not (tmp_path / "stock").exists()


@pytest.mark.parametrize("change, why", [
    (lambda lp, g: setattr(lp, "attn_in", list(range(g.hidden - 1))), "subset of the residual channels"),
    (lambda lp, g: setattr(lp, "heads", []), "attention is removed"),
    (lambda lp, g: setattr(lp, "mlp_hidden", list(range(g.intermediate - 1))), "MLP widths differ"),
    (lambda lp, g: setattr(lp, "heads", [0, 1, 2, 4]), "unequal numbers of query heads per KV head"),
])
def test_plans_the_stock_family_cannot_hold(change, why):
    model = tiny_model("llama")  # 8 heads in 2 KV groups
    adapter = get_adapter(model.config)
    plan = Plan.keep_all(adapter.geometry())
    change(plan.layers[1], adapter.geometry())
    assert choose_layout("auto", model, adapter, plan, set()) == "slim"
    with pytest.raises(CompressError, match=why):
        choose_layout("stock", model, adapter, plan, set())


def test_opt_heads_and_added_biases_are_not_stock():
    opt = tiny_model("opt")
    plan = Plan([LayerPlan(heads=list(range(4))) for _ in range(3)])
    with pytest.raises(CompressError, match="heads cannot be pruned"):
        choose_layout("stock", opt, get_adapter(opt.config), plan, set())
    llama = tiny_model("llama")
    plan = Plan.keep_all(get_adapter(llama.config).geometry())
    with pytest.raises(CompressError, match="o_proj.bias, which stock LlamaForCausalLM has no place for"):
        choose_layout("stock", llama, get_adapter(llama.config), plan, {"model.layers.0.self_attn.o_proj.bias"})


def test_cli_stock_folder_validates_runs_onnx_and_gguf_refuses(tmp_path, capsys):
    from compress.cli import main
    from exporters.model_card import model_card
    from test_pipeline import FAST, save_dense

    dense, out = save_dense(tiny_model("mistral"), tmp_path / "dense"), tmp_path / "stock"
    argv = ["export", "--model", str(dense), "--ratio", "0.4", *FAST, "--threads", "1"]
    assert main([*argv, "--method", "magnitude", "--out", str(out), "--layout", "stock"]) == 0
    report, config = (json.loads((out / name).read_text()) for name in ("report.json", "config.json"))
    assert report["layout"] == "stock"
    card = model_card(report, config, "me/stock")
    assert "trust_remote_code=True" not in card and "stock `MistralForCausalLM`" in card
    assert main(["validate", str(out), "--model", str(dense), "--threads", "1"]) == 0
    assert main(["onnx", str(out), "--threads", "1"]) == 0 and (out / "onnx").is_dir()
    assert main(["bench", "--model", str(dense), "--slim", str(out), "--no-onnx", "--no-peer", "--prompt", "8",
                 "--new-tokens", "2", "--repeats", "1", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["gguf", str(out)]) == 2
    assert "convert_hf_to_gguf.py" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*argv, "--method", "flap", "--out", str(tmp_path / "flap"), "--layout", "stock"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--layout stock: " in err[-1] and not (tmp_path / "flap").exists()


def test_streamed_stock_export_validates_layer_by_layer(tmp_path):
    from compress.cli import main
    from test_pipeline import FAST, save_dense

    dense, out = save_dense(tiny_model("qwen3"), tmp_path / "dense"), tmp_path / "stock"
    assert main(["export", "--model", str(dense), "--method", "wanda-sp", "--ratio", "0.4", "--out", str(out), *FAST,
                 "--threads", "1", "--streaming", "on", "--layout", "stock"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["layout"] == "stock" and report["streamed"] and all(c["passed"] for c in report["parity"])
    assert main(["validate", str(out), "--model", str(dense), "--streaming", "on", "--threads", "1"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    assert type(loaded).__name__ == "Qwen3ForCausalLM"


LOGITS = r"""
import sys, torch
for name in ("compress", "exporters", "validation"):
    sys.modules[name] = None  # as if this project were not installed
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=False, dtype=torch.float64)
torch.save(model(torch.arange(1, 30)[None]).logits, sys.argv[2])
"""


@pytest.mark.parametrize("site", [s for s in os.environ.get("COMPRESS_TRANSFORMERS_SITES", "").split(os.pathsep) if s])
@pytest.mark.parametrize("family", ["llama", "phi3"])  # llama3 rope scaling; partial rotary
def test_stock_folder_computes_the_same_under_each_release(family, site, tmp_path):
    """4.x reads rope_theta / rope_scaling at the top level (`write_legacy_rope`)."""
    model = tiny_model(family)
    export(model, PruneResult(uniform_plan(model)), tmp_path / "stock", calib=CALIB, layout="stock")
    assert "quantization_config" not in json.loads((tmp_path / "stock" / "config.json").read_text())
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": site, "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, "-c", LOGITS.replace("dtype=", "torch_dtype=" if "4." in site else "dtype="),
                          str(tmp_path / "stock"), str(tmp_path / "logits.pt")], capture_output=True, text=True,
                         cwd="/", env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    here = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", dtype=torch.float64)(torch.arange(1, 30)[None])
    assert (torch.load(tmp_path / "logits.pt") - here.logits).abs().max().item() < 1e-9
