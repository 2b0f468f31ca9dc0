"""Bad input at the front door: each case is refused with exit status 2 and one complete line on
stderr starting with "error:" (the last thing printed) that names the file and the fix, checked
in the order a user fixes things (model folder, architecture, weights, tokenizer, calibration),
and nothing is left behind: no staging folder, no partial --out, no new file anywhere."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from compress.cli import main
from test_pipeline import save_dense
from tiny import tiny_model

QUICK = ["--method", "magnitude", "--calib-samples", "4", "--seq-len", "32", "--eval-windows", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def ready(tmp_path_factory) -> dict[str, Path]:
    """Inputs that are fine: a dense tiny Llama folder, another model, and an export of the first."""
    root = tmp_path_factory.mktemp("inputs")
    dense = save_dense(tiny_model("llama"), root / "dense")
    other = save_dense(tiny_model("llama", seed=1), root / "other")
    slim = root / "slim"
    assert main(["export", "--model", str(dense), "--ratio", "0.3", "--out", str(slim), *QUICK]) == 0
    return {"root": root, "dense": dense, "other": other, "slim": slim}


def export(model, out, *more) -> list[str]:
    return ["export", "--model", str(model), "--ratio", "0.3", "--out", str(out), *QUICK, *more]


def copy_dense(ready, tmp: Path, name: str, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the dense folder without the files matching `drop`."""
    folder = tmp / name
    shutil.copytree(ready["dense"], folder, ignore=shutil.ignore_patterns(*drop))
    return folder


def text_file(tmp: Path, data: bytes) -> Path:
    path = tmp / "calib.txt"
    path.write_bytes(data)
    return path


# --- model folder ---------------------------------------------------------------------------------

def no_such_folder(ready, tmp, mp):
    return export(tmp / "nope", tmp / "out"), "no such model folder"


def model_is_a_file(ready, tmp, mp):
    shard = tmp / "model.safetensors"
    shutil.copy(ready["dense"] / "model.safetensors", shard)
    return export(shard, tmp / "out"), "is a file: give the model folder"


def no_config(ready, tmp, mp):
    return export(copy_dense(ready, tmp, "m", ("config.json",)), tmp / "out"), "no config.json"


def config_not_json(ready, tmp, mp):
    folder = copy_dense(ready, tmp, "m")
    (folder / "config.json").write_text("{not json")
    return export(folder, tmp / "out"), "config.json is not a JSON object"


def hub_id_offline(ready, tmp, mp):
    return export("someone/not-downloaded-model", tmp / "out"), "cannot be downloaded offline"


# --- architecture ---------------------------------------------------------------------------------

def gpt2_config_only(ready, tmp, mp):
    """The user's report: before, `no .safetensors weights`; the architecture comes first."""
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp / "gpt2")
    return export(tmp / "gpt2", tmp / "out"), "gpt2/config.json: unsupported architecture 'gpt2'; supported: llama"


def gguf_of_unsupported_architecture(ready, tmp, mp):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return export(path, tmp / "out"), "gpt2.gguf: unsupported architecture 'gpt2'"


# --- weights --------------------------------------------------------------------------------------

def no_weights(ready, tmp, mp):
    return export(copy_dense(ready, tmp, "m", ("*.safetensors",)), tmp / "out"), "no *.safetensors weights"


def pickle_weights_only(ready, tmp, mp):
    folder = copy_dense(ready, tmp, "m", ("*.safetensors",))
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    return export(folder, tmp / "out"), "weights only as pickle (pytorch_model.bin)"


def truncated_shard(ready, tmp, mp):
    folder = copy_dense(ready, tmp, "m")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return export(folder, tmp / "out"), "m/model.safetensors: unreadable safetensors file"


def truncated_shard_streamed(ready, tmp, mp):
    argv, expect = truncated_shard(ready, tmp, mp)
    return [*argv, "--streaming", "on"], expect


def index_names_a_missing_shard(ready, tmp, mp):
    folder = copy_dense(ready, tmp, "m")
    names = {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    return export(folder, tmp / "out"), "names model-00002-of-00002.safetensors, which is not in the folder"


# --- tokenizer ------------------------------------------------------------------------------------

def no_tokenizer(ready, tmp, mp):
    """The user's report: before, `text too short: 0 tokens` or a message cut mid-sentence."""
    folder = copy_dense(ready, tmp, "notok", ("tokenizer*", "special_tokens_map.json"))
    return export(folder, tmp / "out"), "notok: no tokenizer (tokenizer.json"


def corrupt_tokenizer(ready, tmp, mp):
    folder = copy_dense(ready, tmp, "m")
    (folder / "tokenizer.json").write_text("{")
    return export(folder, tmp / "out"), "cannot load tokenizer from"


def tokenizer_error_spanning_lines(ready, tmp, mp):
    """transformers' message for a tokenizer it cannot build spans five lines; all of them reach the
    user, on one line (the first alone stopped at "from one of:")."""
    import transformers

    def fail(*args, **kwargs):
        raise ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a `tokenizers` library "
                         "serialization file, \n(2) a slow tokenizer instance to convert or \n(3) an equivalent "
                         "slow tokenizer class to instantiate and convert. \nYou need to have sentencepiece or "
                         "tiktoken installed to convert a slow tokenizer to a fast one.")

    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        mp.setattr(cls, "from_pretrained", fail)
    return export(ready["dense"], tmp / "out"), "from one of: (1) a `tokenizers` library serialization file,"


# --- calibration ----------------------------------------------------------------------------------

def calibration_missing(ready, tmp, mp):
    return export(ready["dense"], tmp / "out", "--calib", str(tmp / "nope.txt")), "text file not found"


def calibration_binary(ready, tmp, mp):
    path = text_file(tmp, bytes(range(256)) * 4)
    return export(ready["dense"], tmp / "out", "--calib", str(path)), "calib.txt is not UTF-8 text"


def calibration_empty(ready, tmp, mp):
    path = text_file(tmp, b"\n  \n")
    return export(ready["dense"], tmp / "out", "--calib", str(path)), "text file is empty"


def calibration_too_short(ready, tmp, mp):
    path = text_file(tmp, b"just a few words")
    return [*export(ready["dense"], tmp / "out", "--calib", str(path)), "--method", "wanda-sp"], \
        "calib.txt: text too short"


# --- options --------------------------------------------------------------------------------------

def ratio_as_text(ready, tmp, mp):
    return [*export(ready["dense"], tmp / "out"), "--ratio", "half"], "argument --ratio: invalid float value"


def ratio_out_of_range(ready, tmp, mp):
    return [*export(ready["dense"], tmp / "out"), "--ratio", "1.0"], "strictly between 0 and 1"


def threads_zero(ready, tmp, mp):
    return [*export(ready["dense"], tmp / "out"), "--threads", "0"], "argument --threads"


def unknown_method(ready, tmp, mp):
    return [*export(ready["dense"], tmp / "out"), "--method", "sparsegpt"], "argument --method: invalid choice"


def shard_size_not_a_size(ready, tmp, mp):
    return export(ready["dense"], tmp / "out", "--max-shard-size", "big"), "not a size"


def int4_without_onnx(ready, tmp, mp):
    return export(ready["dense"], tmp / "out", "--onnx-weights", "int4"), "--onnx-weights needs --onnx"


# --- output ---------------------------------------------------------------------------------------

def out_is_a_file(ready, tmp, mp):
    (tmp / "out").write_text("mine")
    return export(ready["dense"], tmp / "out", "--overwrite"), "is not a folder"


def overwrite_a_users_folder(ready, tmp, mp):
    """--overwrite replaces only what this tool wrote: a user's file stays (the snapshot checks it)."""
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return export(ready["dense"], tmp / "out", "--overwrite"), "holds files this tool did not write (notes.txt)"


def existing_export_without_overwrite(ready, tmp, mp):
    shutil.copytree(ready["slim"], tmp / "out")
    return export(ready["dense"], tmp / "out"), "already exists (use --overwrite to replace it)"


def read_only_parent(ready, tmp, mp):
    parent = tmp / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: answer as the file system answers a user
        real = os.access
        mp.setattr(os, "access", lambda p, mode, **kw: Path(p) != parent and real(p, mode, **kw))
    return export(ready["dense"], parent / "out"), f"cannot write in {parent}"


def disk_full_while_writing(ready, tmp, mp):
    from exporters import hf_folder

    def full(self, name, t):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(hf_folder._Shard, "add", full)
    return export(ready["dense"], tmp / "deep" / "out"), "no space left on the device while writing"


# --- validate -------------------------------------------------------------------------------------

def validate_against_another_model(ready, tmp, mp):
    return (["validate", str(ready["slim"]), "--model", str(ready["other"]), "--threads", "1"],
            "give the dense model it was made from")


def validate_a_folder_not_exported(ready, tmp, mp):
    return ["validate", str(ready["dense"]), "--threads", "1"], "plan.json"


CASES = [no_such_folder, model_is_a_file, no_config, config_not_json, hub_id_offline, gpt2_config_only,
         gguf_of_unsupported_architecture, no_weights, pickle_weights_only, truncated_shard, truncated_shard_streamed,
         index_names_a_missing_shard, no_tokenizer, corrupt_tokenizer, tokenizer_error_spanning_lines,
         calibration_missing, calibration_binary, calibration_empty, calibration_too_short, ratio_as_text,
         ratio_out_of_range, threads_zero, unknown_method, shard_size_not_a_size, int4_without_onnx, out_is_a_file,
         overwrite_a_users_folder, existing_export_without_overwrite, read_only_parent, disk_full_while_writing,
         validate_against_another_model, validate_a_folder_not_exported]


def files_under(*folders: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for f in folders for p in f.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused_in_one_line_leaving_nothing(case, ready, tmp_path, capsys, monkeypatch):
    argv, expect = case(ready, tmp_path, monkeypatch)
    before = files_under(tmp_path, ready["root"])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    assert expect in errors[0], errors[0]
    assert not errors[0].rstrip().endswith((":", ",")), errors[0]  # complete, not cut mid-sentence
    assert files_under(tmp_path, ready["root"]) == before
