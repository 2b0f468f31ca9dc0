"""Recovery by distillation: it lowers held-out KL to the dense model, and what it trains is written
back so that the result is still a plan plus dense-named tensors that every parity check accepts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress import export, prune
from compress.adapters import get_adapter
from compress.cli import main
from compress.errors import ParityError
from compress.helpers import positions
from compress.loading import load_model, load_tokenizer
from compress.masking import masked, plan_masks, replaced_weights
from compress.plan import Plan
from compress.recover import recover, writeback
from compress.recover import budget
from compress.recover.distill import held_out_kl, student_model
from compress.reference import CALIB_TEXT, MODEL_DIR, TEST_TEXT
from compress.slimming import build_slim_model
from compress.textdata import calibration_windows, load_text, token_stream, windows
from test_slim import odd_plan
from tiny import TINY_CONFIGS, tiny_model
from validation.parity import equivalence_checks, parity_batch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def text_windows():
    """Reference-tokenized calibration windows (the tiny models share its 4096-token vocabulary)."""
    return calibration_windows(token_stream(load_tokenizer(MODEL_DIR), load_text(CALIB_TEXT)), 32, 160)


def _trained(student, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the student moved, as training would move it."""
    gen = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.05 * torch.randn(p.shape, generator=gen)
            for n, p in student.named_parameters() if writeback.trainable(n)}


def _student_vs_masked_dense(model, adapter, plan, replaced, trained, ids) -> float:
    """Max |logit difference|, float64: the trained student against the dense model masked by the
    plan with `replaced` swapped in (what the parity checks take the slim model to be)."""
    d = copy.deepcopy(model).double()
    student = student_model(d, adapter, plan).double()
    student.load_state_dict({k: v.double() for k, v in trained.items()}, strict=False)
    x, mask = parity_batch(ids)
    kw = dict(input_ids=x, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    with torch.no_grad(), replaced_weights(d, {k: v.double() for k, v in replaced.items()}), \
            masked(d, adapter, plan_masks(plan, adapter.geometry())):
        ref = d(**kw).logits
    with torch.no_grad():
        out = student(**kw).logits
    return (ref - out)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_trained_tensors_written_back_equal_the_masked_dense_model(family, text_windows):
    """Every family, an odd plan (partial residual sets, uneven GQA, a removed attention and MLP):
    the written-back tensors rebuild the trained student exactly, and in float64 the trained student
    equals the masked dense model carrying them."""
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    plan = odd_plan(adapter.geometry())
    trained = _trained(student_model(model, adapter, plan))
    replaced = writeback.write_back(model, adapter, plan, {}, trained)
    writeback.check_round_trip(model, adapter, plan, replaced, trained)
    assert all(t.shape == model.state_dict()[k].shape for k, t in replaced.items() if k in model.state_dict())
    assert _student_vs_masked_dense(model, adapter, plan, replaced, trained, text_windows) < 1e-9


@pytest.mark.parametrize("mutation", ["rows", "transpose"])
def test_a_wrong_write_back_fails(mutation, text_windows, monkeypatch):
    """Trained values written to the wrong rows, or transposed: the round trip and the float64
    comparison with the masked dense model both fail."""
    model = tiny_model("llama")
    adapter = get_adapter(model.config)
    plan = odd_plan(adapter.geometry())
    trained = _trained(student_model(model, adapter, plan))

    def wrong(base, pos, values):
        out = base.detach().clone()
        if values.dim() == 2 and mutation == "transpose":
            values = values.T  # same number of elements, written in the wrong order
        elif values.dim() == 2 and mutation == "rows":
            values = values.roll(1, dims=0)
        out.view(-1)[pos] = values.reshape(-1).to(out.dtype)
        return out

    monkeypatch.setattr(writeback, "_scatter", wrong)
    replaced = writeback.write_back(model, adapter, plan, {}, trained)
    with pytest.raises(ParityError, match="do not rebuild"):
        writeback.check_round_trip(model, adapter, plan, replaced, trained)
    assert _student_vs_masked_dense(model, adapter, plan, replaced, trained, text_windows) > 1e-3


def test_recovery_lowers_held_out_kl_and_passes_parity(text_windows):
    """A tiny model pruned by FLAP (which rewrites biases too): held-out KL goes down, the plan is
    unchanged, only trained tensors are added, and the float64 equivalence checks pass. (Larger
    initial weights than the default: a near-uniform random model leaves nothing to distil.)"""
    model = tiny_model("qwen3", initializer_range=0.1)
    result = prune(model, "flap", 0.5, text_windows)
    rec = recover(model, result, text_windows, steps=60, lr=1e-3, progress=False)
    r = rec.record
    assert r["held_out_kl_after"] < 0.85 * r["held_out_kl_before"], r
    assert r["steps"] == 60 and r["tokens"] == 60 * 4 * 32 and r["lora"] is False
    assert rec.plan is result.plan and set(result.replaced) <= set(rec.replaced)
    adapter = get_adapter(model.config)
    assert all(c.passed for c in equivalence_checks(model, adapter, rec.plan, rec.replaced, text_windows, "model"))


def test_lora_recovery_merges_into_the_result(text_windows):
    pytest.importorskip("peft")
    model = tiny_model("llama", initializer_range=0.1)
    result = prune(model, "wanda-sp", 0.5, text_windows)
    rec = recover(model, result, text_windows, steps=30, lora=True, progress=False)
    assert rec.record["lora"] is True
    assert rec.record["held_out_kl_after"] < rec.record["held_out_kl_before"]
    assert not any("norm" in k for k in rec.replaced)  # LoRA trains the linears only
    adapter = get_adapter(model.config)
    assert all(c.passed for c in equivalence_checks(model, adapter, rec.plan, rec.replaced, text_windows, "model"))


def test_full_fine_tuning_gives_way_to_lora_when_it_does_not_fit(monkeypatch):
    full = {"total": 10_000}
    lora = {"total": 1_000}
    monkeypatch.setattr(budget, "available_bytes", lambda device: 2_000)
    assert budget.choose_lora(full, lora, torch.device("cpu")) is True
    monkeypatch.setattr(budget, "available_bytes", lambda device: 100_000)
    assert budget.choose_lora(full, lora, torch.device("cpu")) is False
    monkeypatch.setattr(budget, "available_bytes", lambda device: 100)
    with pytest.raises(MemoryError):
        budget.choose_lora(full, lora, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference():
    model, tok = load_model(MODEL_DIR), load_tokenizer(MODEL_DIR)
    calib = calibration_windows(token_stream(tok, load_text(CALIB_TEXT)), 64, 64)
    test = windows(token_stream(tok, load_text(TEST_TEXT)), 64)
    return model, tok, calib, test[torch.linspace(0, len(test) - 1, 16).round().long()]


def test_reference_model_recovers_and_exports(reference, tmp_path):
    """The shipped model at 0.5: KL to the dense model on the test slice goes down, the folder
    exported from the recovered result passes every check and loads with transformers."""
    model, tok, calib, test = reference
    adapter = get_adapter(model.config)
    result = prune(model, "wanda-sp", 0.5, calib)
    rec = recover(model, result, calib, steps=25, progress=False)
    before = held_out_kl(build_slim_model(model, adapter, result.plan, result.replaced), model, test)
    after = held_out_kl(build_slim_model(model, adapter, rec.plan, rec.replaced), model, test)
    assert after < 0.8 * before, (before, after)
    report = export(model, rec, tmp_path / "slim", tokenizer=tok, calib=calib)
    assert all(c["passed"] for c in report["parity"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim", trust_remote_code=True).eval()
    slim = build_slim_model(model, adapter, rec.plan, rec.replaced)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=test[:2]).logits, slim(input_ids=test[:2]).logits)


def test_default_steps_fit_the_budget(reference, capsys):
    model = reference[0]
    adapter = get_adapter(model.config)
    plan = Plan.keep_all(adapter.geometry())
    per_step = budget.step_flops(model, adapter, plan, 4 * 256)
    from compress.training import budget_steps

    assert budget_steps(per_step, "cpu", "recover", "4 x 256 tokens") == 2000  # the CPU cap
    assert budget_steps(per_step, "cpu", "recover", "4 x 256 tokens", flops=100 * per_step) == 100
    assert "recover: 100 steps of 4 x 256 tokens" in capsys.readouterr().out


def test_recover_command_rewrites_a_folder(reference, tmp_path):
    """`compress recover`: same plan, trained tensors in replaced.safetensors, a recovery record, and
    the folder still validates against its dense model."""
    model, tok, calib, _ = reference
    slim = tmp_path / "slim"
    export(model, prune(model, "flap", 0.5, calib), slim, tokenizer=tok, calib=calib,
           extra={"base_model": "reference"})
    out = tmp_path / "recovered"
    assert main(["recover", str(slim), "--out", str(out), "--steps", "3", "--calib-samples", "24", "--seq-len", "64",
                 "--eval-windows", "2"]) == 0
    assert json.loads((out / "plan.json").read_text()) == json.loads((slim / "plan.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"] == 3 and report["recovery"]["held_out_windows"] == 6
    assert all(c["passed"] for c in report["parity"])
    assert main(["validate", str(out)]) == 0
    assert main(["recover", str(slim), "--out", str(out), "--steps", "1"]) == 2  # exists: refused


def test_export_recover_records_recovery_and_passes_parity(tmp_path, capsys):
    """`compress export --recover`: the method's plan kept, trained tensors written, a recovery record,
    every check passed, no training state left; refused in one line where it cannot run."""
    out = tmp_path / "slim"
    common = ["--method", "wanda-sp", "--ratio", "0.5", "--calib-samples", "24", "--seq-len", "64",
              "--eval-windows", "2"]
    assert main(["export", "--out", str(out), *common, "--recover", "--recover-steps", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    rec = report["recovery"]
    assert rec["steps"] == 4 and rec["held_out_kl_after"] < rec["held_out_kl_before"]
    assert all(c["passed"] for c in report["parity"]) and (out / "replaced.safetensors").exists()
    assert not (tmp_path / "slim.partial").exists()
    assert "recover: held-out KL" in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert main(["export", "--out", str(plain), *common]) == 0
    assert (plain / "plan.json").read_text() == (out / "plan.json").read_text()  # recovery leaves the plan
    assert main(["export", "--out", str(tmp_path / "p"), "--method", "probe", "--recover"]) == 2
    assert "Probe Pruning chooses its channels at run time" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "s"), *common, "--recover", "--streaming", "on"]) == 2
    assert "--recover trains the slim model against the whole dense model" in capsys.readouterr().err
