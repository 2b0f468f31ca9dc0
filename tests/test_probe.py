"""Probe Pruning: its checks pass on correct code and fail on broken gathers or decode reuse;
its choice follows the paper's score, computed here independently; its counts meet the ratio;
export, load through transformers, `compress validate`, `compress onnx` and the onnxruntime
runner work end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress import prune
from compress.adapters import get_adapter
from compress.cli import main
from compress.errors import CompressError
from compress.loading import load_model, load_tokenizer
from compress.plan import Plan
from compress.probe import probe_runtime, random_selection, runtime_ratio, with_probe
from compress.reference import CALIB_TEXT
from compress.slim import modeling_slim
from compress.slimming import build_slim_model
from compress.textdata import calibration_windows, load_text, token_stream
from validation.parity import probe_checks
from tiny import tiny_model


@pytest.fixture(scope="module")
def reference():
    model, tok = load_model(), load_tokenizer()
    calib = calibration_windows(token_stream(tok, load_text(CALIB_TEXT)), 64, 16)
    return model, get_adapter(model.config), calib


def _tiny_pp(family, ratio=0.3, method="wanda-sp", runtime_ratio=0.3):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    calib = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = prune(model, method, ratio, calib).plan
    plan.runtime = probe_runtime(runtime_ratio, heads=True)
    pp = with_probe(build_slim_model(model, adapter, plan), plan.runtime, calib)
    return model, adapter, plan, pp, calib


def _failed(checks):
    return {c.name for c in checks if not c.passed}


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_checks_pass_and_catch_a_wrong_gather(family, monkeypatch):
    model, adapter, plan, pp, calib = _tiny_pp(family)
    assert any(layer.self_attn.probed for layer in pp.model.layers) and any(layer.mlp.probed for layer in pp.model.layers)
    checks = probe_checks(pp, model, adapter, plan, None, calib)
    assert not _failed(checks), [c.line() for c in checks]

    def shifted(gather):  # the last kept index swapped for one not kept: an off-by-one in the gather
        def wrong(self, index):
            n = self.heads if isinstance(self, modeling_slim.SlimAttention) else self.width
            absent = sorted(set(range(n)) - set(index.tolist()))
            if absent:
                index = torch.cat([index[:-1], torch.tensor(absent[:1])]).sort().values
            return gather(self, index)
        return wrong

    for cls in (modeling_slim.SlimMLP, modeling_slim.SlimAttention):
        with monkeypatch.context() as m:
            m.setattr(cls, "gather", shifted(cls.gather))
            assert "probe-gather" in _failed(probe_checks(pp, model, adapter, plan, None, calib)), cls.__name__


def test_decode_check_catches_a_request_that_forgets_its_choice(reference, monkeypatch):
    model, adapter, calib = reference
    plan = Plan.keep_all(adapter.geometry())
    plan.runtime = probe_runtime(0.4)
    pp = with_probe(build_slim_model(model, adapter, plan), plan.runtime, calib)
    assert not _failed(probe_checks(pp, model, adapter, plan, None, calib))
    run = modeling_slim.probe_run
    monkeypatch.setattr(modeling_slim, "probe_run",
                        lambda model, cache, past, mask, pos: run(model, cache, 0, mask, pos))  # re-probe every step
    assert _failed(probe_checks(pp, model, adapter, plan, None, calib)) == {"probe-decode"}


def test_choice_is_the_pp_score_and_changes_with_the_batch(reference):
    """Recompute layer 2's MLP choice from the paper's formula: probe = top half of positions by
    L2 over the batch, then the top sample by L2 over those; fuse with the history; score each
    channel by fused_j * ||W[:, j]^2||_2; keep the top ones."""
    model, adapter, calib = reference
    plan = Plan.keep_all(adapter.geometry())
    plan.runtime = probe_runtime(0.4, skip_layers=1)
    pp = with_probe(build_slim_model(model, adapter, plan), plan.runtime, calib)
    layer = pp.model.layers[2]
    seen = {}
    layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.update(x=a[0], b=out))
    choices = []
    for batch in (calib[:8], calib[8:16]):
        cache = pp(input_ids=batch, use_cache=True).past_key_values
        x, b = seen["x"], seen["b"]
        norms = x.norm(dim=-1)
        pos = norms.norm(dim=0).topk(math.ceil(x.shape[1] / 2)).indices.sort().values
        smp = norms[:, pos].norm(dim=1).argmax()
        mlp = layer.mlp
        with torch.no_grad():
            act = mlp.act(mlp.gate_proj(b[smp, pos])) * mlp.up_proj(b[smp, pos])
        probe, hist = act.pow(2), mlp.probe_history[pos]
        r = probe / (probe + hist + 1e-6)
        fused = ((1 - r) * hist + r * probe).sum(0)
        score = fused * mlp.down_proj.weight.pow(2).norm(dim=0)
        want = score.topk(mlp.probe_keep).indices.sort().values
        got = cache.probe_selection[(2, "mlp")]["index"]
        assert torch.equal(got, want)
        choices.append(got)
    assert not torch.equal(*choices)  # chosen per batch, not once


def test_counts_meet_the_ratio_and_refuse_what_cannot_be_met(reference):
    model, adapter, calib = reference
    static = build_slim_model(model, adapter, Plan.keep_all(adapter.geometry()))
    for ratio, heads in ((0.2, False), (0.4, False), (0.4, True), (0.6, True)):
        pp = with_probe(static, probe_runtime(ratio, heads=heads, history_windows=2), calib)
        assert abs(runtime_ratio(pp.config) - ratio) < 0.002, (ratio, heads)
        assert pp.config.layer_probe_intermediate[0] < pp.config.layer_intermediate[0]  # 4 layers: none skipped
    with pytest.raises(CompressError, match="run-time ratio"):
        with_probe(static, probe_runtime(0.95, skip_layers=3), calib)
    with pytest.raises(CompressError, match="strictly between"):
        probe_runtime(1.0)


def test_cli_export_load_generate_validate_onnx(tmp_path, capsys):
    out = tmp_path / "pp"
    assert main(["export", "--method", "probe", "--ratio", "0.4", "--out", str(out), "--calib-samples", "16",
                 "--eval-windows", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["runtime"]["achieved_ratio"] - 0.4) < 0.002
    assert {c["name"] for c in report["parity"]} >= {"probe-full", "probe-gather", "probe-decode", "files"}
    loaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    ids = torch.tensor([[1, 17, 99, 401, 23, 7]])
    with torch.no_grad():
        gen = loaded.generate(input_ids=ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    cache = getattr(gen, "cache", None) or gen.past_key_values
    assert cache.probe_selection  # the decode steps ran on the prefill's choice
    assert main(["validate", str(out)]) == 0
    assert main(["onnx", str(out)]) == 0  # its own checks: same indices, logits, 32 greedy tokens
    from compress.runtime.onnx_runner import OnnxRunner

    data = {f.name: f.stat().st_size for f in (out / "onnx").glob("*.onnx.data")}
    assert sum(data.values()) < 1.05 * data["prefill.onnx.data"]  # the step graph shares the prefill's weights
    runner = OnnxRunner(out / "onnx")
    assert runner.prefill is not None and runner.probe_names
    onnx_tokens = runner.generate(ids.numpy(), max_new_tokens=8, eos_token_id=None).new_ids
    assert (onnx_tokens == gen.sequences[:, ids.shape[1]:].numpy()).all()
    assert main(["export", "--method", "flap", "--ratio", "0.2", "--runtime", "probe", "--runtime-ratio", "1.5",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--runtime-ratio" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_history_moves_only_with_momentum_and_only_where_probed(reference):
    model, adapter, calib = reference
    plan = Plan.keep_all(adapter.geometry())
    static = build_slim_model(model, adapter, plan)
    for momentum in (None, 0.9):
        pp = with_probe(static, probe_runtime(0.4, momentum=momentum, history_windows=4), calib)
        mlp = pp.model.layers[1].mlp
        before = mlp.probe_history.clone()
        with torch.no_grad():
            cache = pp(input_ids=calib[:4, :32], use_cache=True).past_key_values
        changed = (mlp.probe_history != before).nonzero()
        if momentum is None:
            assert changed.numel() == 0  # serving is deterministic by default
            continue
        kept = cache.probe_selection[(1, "mlp")]["index"]
        assert changed.numel() and changed[:, 0].max() < 32 and torch.isin(changed[:, 1], kept).all()
