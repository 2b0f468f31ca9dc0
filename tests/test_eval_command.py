"""`compress eval` runs no model code but ours unless asked (--trust-remote-code), and takes Hub
ids like `export` does; offline (HF_HUB_OFFLINE=1, conftest), no network."""

from __future__ import annotations

import json
import shutil

import pytest

from compress.cli import main
from compress.commands.eval import _tokenizer_source, exported_by_us
from compress.reference import MODEL_DIR
from tiny import tiny_model

@pytest.fixture
def short(tmp_path):
    """eval's options for a short text on the CPU (some 38 windows of 256 tokens; new eval spreads 32 over each text), so runs are quick."""
    text = tmp_path / "short.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 700, encoding="utf-8")
    return ["--device", "cpu", "--text", str(text)]


def _foreign_folder(folder, marker):
    """A model folder that ships its own code (auto_map): a llama whose configuration file, once
    imported, writes `marker`."""
    tiny_model("llama").save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="foreign", architectures=["ForeignForCausalLM"],
                  auto_map={"AutoConfig": "configuration_foreign.ForeignConfig",
                            "AutoModelForCausalLM": "modeling_foreign.ForeignForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_foreign.py").write_text(
        f"from pathlib import Path\n\nfrom transformers import LlamaConfig\n\n"
        f"Path({str(marker)!r}).write_text('ran')\n\n\nclass ForeignConfig(LlamaConfig):\n    model_type = 'foreign'\n")
    (folder / "modeling_foreign.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_foreign import ForeignConfig\n\n\n"
        "class ForeignForCausalLM(LlamaForCausalLM):\n    config_class = ForeignConfig\n")
    return folder


def test_a_folder_with_its_own_code_is_not_trusted_unless_asked(tmp_path, capsys, short):
    marker = tmp_path / "ran"
    folder = _foreign_folder(tmp_path / "foreign", marker)
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), *short]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "--trust-remote-code" in err, err
    assert not marker.exists()
    assert main(["eval", "--reference", str(folder), *short]) == 2  # nor as the reference
    assert not marker.exists()
    assert main(["eval", "--model", str(folder), "--trust-remote-code", *short]) == 0
    assert marker.exists()


def test_a_hub_id_not_cached_is_a_one_line_error(capsys, short):
    for args in (["--model", "no-such-owner/no-such-model"], ["--reference", "no-such-owner/no-such-model"]):
        assert main(["eval", *args, *short]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert "no-such-owner/no-such-model" in err


def test_a_missing_local_folder_is_a_one_line_error(tmp_path, capsys, short):
    assert main(["eval", "--model", str(tmp_path / "nope"), *short]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'}: no such model folder"


def test_tokenizer_comes_from_the_first_model_that_has_one(tmp_path):
    bare = tmp_path / "bare"  # a folder without tokenizer files
    bare.mkdir()
    assert _tokenizer_source(bare, "owner/model") == "owner/model"  # a Hub id: fetched or read from the cache
    assert _tokenizer_source(bare, MODEL_DIR) == MODEL_DIR
    assert _tokenizer_source("owner/model", MODEL_DIR) == "owner/model"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "slim"
    assert main(["export", "--method", "magnitude", "--ratio", "0.5", "--out", str(out), "--eval-windows", "0"]) == 0
    return out


def test_our_export_is_trusted_without_asking_and_a_changed_copy_is_not(exported, tmp_path, capsys, short):
    assert exported_by_us(exported)
    assert main(["eval", "--model", str(exported), "--reference", str(MODEL_DIR), *short]) == 0
    capsys.readouterr()

    marker = tmp_path / "ran"
    changed = shutil.copytree(exported, tmp_path / "changed")
    with (changed / "modeling_slim.py").open("a") as f:
        f.write(f"\nfrom pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    assert not exported_by_us(changed)
    assert main(["eval", "--model", str(changed), *short]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err and not marker.exists()
    assert main(["eval", "--model", str(changed), "--trust-remote-code", *short]) == 0 and marker.exists()


@pytest.mark.parametrize("change", ["no plan.json", "no report.json", "other auto_map", "extra code file missing"])
def test_what_makes_a_folder_ours(exported, tmp_path, change):
    folder = shutil.copytree(exported, tmp_path / "copy")
    if change == "no plan.json":
        (folder / "plan.json").unlink()
    elif change == "no report.json":
        (folder / "report.json").unlink()
    elif change == "other auto_map":
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"]["AutoModelForCausalLM"] = "modeling_other.OtherForCausalLM"
        (folder / "config.json").write_text(json.dumps(config))
    else:
        (folder / "configuration_slim.py").unlink()
    assert not exported_by_us(folder)
