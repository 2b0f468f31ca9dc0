"""End to end through the CLI: export, load in a clean process, validate, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.cli import main
from compress.reference import MODEL_DIR
from tiny import TINY_CONFIGS, tiny_model

TOKENIZER_DIR = os.environ.get("TEST_TOKENIZER_DIR", MODEL_DIR)

FAST = ["--calib-samples", "8", "--seq-len", "32", "--eval-windows", "2"]


def save_dense(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Qwen3 (q/k norms, biases, GQA) exported with FLAP at 0.4: biases are rewritten too."""
    root = tmp_path_factory.mktemp("export")
    dense = save_dense(tiny_model("qwen3"), root / "dense")
    out = root / "slim"
    assert main(["export", "--model", str(dense), "--method", "flap", "--ratio", "0.4", "--out", str(out), *FAST]) == 0
    return dense, out


def test_export_writes_a_complete_smaller_folder(exported):
    dense, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "modeling_slim.py", "configuration_slim.py", "model.safetensors.index.json",
            "plan.json", "report.json", "report.md", "tokenizer.json", "replaced.safetensors"} <= names
    report = json.loads((out / "report.json").read_text())
    assert abs(report["ratio"]["achieved_linear"] - 0.4) < 0.05
    assert 0 < report["ratio"]["achieved_total"] < report["ratio"]["achieved_linear"]
    removed = report["params"]["total_before"] - report["params"]["total_after"]
    slim_bytes = sum(p.stat().st_size for p in out.glob("model*.safetensors"))
    dense_bytes = sum(p.stat().st_size for p in dense.glob("model*.safetensors"))
    assert dense_bytes - slim_bytes > 0.9 * 4 * removed  # float32: the files shrink by the pruned parameters
    assert all(c["passed"] for c in report["parity"])
    assert {c["name"] for c in report["parity"]} == {"equivalence", "generation", "identity", "files"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_validate_passes_then_catches_a_tampered_tensor(exported, tmp_path, capsys):
    dense, out = exported
    assert main(["validate", str(out), "--model", str(dense)]) == 0
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tamper(bad, "mlp.down_proj.weight")
    assert main(["validate", str(bad), "--model", str(dense)]) == 2
    assert "files" in capsys.readouterr().err


def test_layer_scope_when_float64_copies_do_not_fit(exported, tmp_path, monkeypatch, capsys):
    """`auto` falls back to the one-layer-at-a-time check when memory is short; it still catches a
    tampered tensor, and the report says which scope ran."""
    from compress import memory

    dense, out = exported
    monkeypatch.setattr(memory, "available_memory", lambda: 1024)
    small = tmp_path / "small"
    whole = ["--streaming", "off"]  # the model loaded whole (tests/test_streaming.py streams it)
    assert main(["export", "--model", str(dense), "--method", "flap", "--ratio", "0.4", "--out", str(small), *FAST,
                 *whole]) == 0
    report = json.loads((small / "report.json").read_text())
    assert report["parity_scope"] == "layers" and "streamed" not in report
    assert [c["name"] for c in report["parity"]] == ["layers", "files"]
    assert main(["validate", str(small), "--model", str(dense), *whole]) == 0
    assert "layers one at a time" in capsys.readouterr().out
    tamper(small, "self_attn.o_proj.weight")
    assert main(["validate", str(small), "--model", str(dense), *whole]) == 2
    assert "files" in capsys.readouterr().err


def tamper(folder: Path, suffix: str) -> None:
    """Add 1e-3 to one weight (the first tensor whose name ends in `suffix`) of an exported folder."""
    from safetensors.torch import load_file, save_file

    shard = next(folder.glob("model*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith(suffix))
    tensors[name][0, 0] += 1e-3
    save_file(tensors, shard, metadata={"format": "pt"})


def test_validate_catches_a_broken_modeling_file(exported, tmp_path, capsys):
    """Same tensors, wrong code: the files check compares with the masked dense model, not with
    a model the same code builds, so it fails."""
    import shutil

    dense, out = exported
    bad = tmp_path / "bad-code"
    shutil.copytree(out, bad)
    code = (bad / "modeling_slim.py").read_text()
    broken = code.replace("return x * cos + rotate_half(x) * sin", "return x * cos - rotate_half(x) * sin")
    assert broken != code
    (bad / "modeling_slim.py").write_text(broken)
    assert main(["validate", str(bad), "--model", str(dense)]) == 2
    assert "files" in capsys.readouterr().err


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_headline_disp_export_on_each_family(family, tmp_path, capsys):
    """`compress export --method disp --ratio 0.5` as a new user runs it, on a small checkpoint of each family."""
    dense = save_dense(tiny_model(family), tmp_path / "dense")
    out = tmp_path / "slim"
    assert main(["export", "--model", str(dense), "--method", "disp", "--ratio", "0.5", "--out", str(out),
                 "--steps", "4", "--batch-size", "2", *FAST]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert abs(report["ratio"]["achieved_linear"] - 0.5) < 0.01 and report["method"] == "disp"
    assert all(c["passed"] for c in report["parity"]) and len(report["parity"]) == 4
    assert len(report["quality"]) == 4
    for q in report["quality"]:
        assert q["windows"] == 2 and q["reference_perplexity"] > 1 and q["perplexity"] > 1 and q["kl"] >= 0
    assert f"achieved: {report['ratio']['achieved_linear']:.4f}" in printed
    assert "perplexity on wikitext-2-test (2 windows of 32 tokens spread over" in printed


def test_half_precision_export_validates_and_a_truncated_shard_is_one_line(tmp_path, capsys):
    dense = save_dense(tiny_model("mistral"), tmp_path / "dense")
    out = tmp_path / "slim"
    argv = ["--model", str(dense), "--method", "wanda-sp", "--ratio", "0.3", "--out", str(out), "--dtype", "float16"]
    assert main(["export", *argv, *FAST]) == 0
    files = json.loads((out / "report.json").read_text())["parity"][-1]
    assert files["name"] == "files" and files["dtype"] == "float16" and files["passed"]
    assert main(["validate", str(out), "--model", str(dense)]) == 0
    shard = next(out.glob("model*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _fails(["validate", str(out), "--model", str(dense)], capsys, "unreadable safetensors file")


def test_model_too_big_for_float32_is_held_in_the_export_dtype(tmp_path, monkeypatch, capsys):
    """--load-dtype auto on a machine short of memory: a bfloat16 export prunes a bfloat16 model,
    checked layer by layer; a float32 export keeps float32 (no silent rounding)."""
    from compress import memory
    from compress.loading import load_dtype

    dense = save_dense(tiny_model("qwen2"), tmp_path / "dense")
    config = AutoModelForCausalLM.from_pretrained(dense).config
    assert load_dtype(config, "auto", torch.bfloat16) == torch.float32  # fits: full precision
    monkeypatch.setattr(memory, "available_memory", lambda: 1024)
    assert load_dtype(config, "auto", torch.float32) == torch.float32
    out = tmp_path / "slim"
    argv = ["--model", str(dense), "--method", "wanda-sp", "--ratio", "0.3", "--out", str(out), "--dtype", "bfloat16"]
    assert main(["export", *argv, *FAST]) == 0
    assert "in bfloat16" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["parity_scope"] == "layers" and all(c["passed"] for c in report["parity"])
    assert main(["validate", str(out), "--model", str(dense)]) == 0


def test_python_api_round_trip(tmp_path):
    from compress import export, prune
    from compress.textdata import windows

    model = tiny_model("opt")
    calib = windows(torch.randint(0, 4096, (8 * 32,), generator=torch.Generator().manual_seed(0)), 32)
    result = prune(model, "wanda-sp", 0.3, calib)
    report = export(model, result, tmp_path / "slim", calib=calib)
    assert report["method"] == "wanda-sp" and all(c["passed"] for c in report["parity"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "slim", trust_remote_code=True)
    assert loaded.config.layer_intermediate != [96] * 3


def _fails(argv, capsys, match):
    capsys.readouterr()  # drop what the set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0] and err.endswith(errors[0]), err
