"""An exported folder, loaded by a fresh process without this project, generates what the masked
dense model generates: with the KV cache, without it, under every transformers release we support.

The installed transformers is always tried. `.ci/run` also installs the oldest releases we
support (the last 4.x for loading folders, the package's lower bound for the pipeline) into
folders of their own and lists them in COMPRESS_TRANSFORMERS_SITES (separated by os.pathsep);
each is put first on PYTHONPATH of the loading process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress import export, prune
from compress.adapters import get_adapter
from compress.masking import masked, plan_masks, replaced_weights
from compress.loading import load_model, load_tokenizer
from compress.reference import CALIB_TEXT
from compress.textdata import calibration_windows, load_text, token_stream

PROMPTS = ["def f(x):", "The Python tutorial explains how"]
NEW_TOKENS = 12
SITES = [s for s in os.environ.get("COMPRESS_TRANSFORMERS_SITES", "").split(os.pathsep) if s]

# Runs with this project unimportable and stdin closed: a prompt for remote code would fail it.
LOAD = r"""
import json, sys
for name in ("compress", "exporters", "validation"):
    sys.modules[name] = None  # as if this project were not installed
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
folder, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
# 4.x's AutoTokenizer reads tokenizer_config.json alone; 5.x's also reads config.json, whose
# auto_map names the folder's model code, so it is told not to run it (the tokenizer needs none).
auto = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
tok = PreTrainedTokenizerFast.from_pretrained(folder)
tok.padding_side = auto.padding_side = "left"
batch = tok(prompts, return_tensors="pt", padding=True)
assert set(batch) == {"input_ids", "attention_mask"}, sorted(batch)
assert auto(prompts, return_tensors="pt", padding=True)["input_ids"].tolist() == batch["input_ids"].tolist()
# the slim layout runs its own code; the stock layout (compress.stock) must load without any
own_code = "auto_map" in json.load(open(folder + "/config.json"))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=own_code)
kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
cached = model.generate(**batch, **kw)
uncached = model.generate(**batch, use_cache=False, **kw)
print(json.dumps({"version": transformers.__version__, "input_ids": batch["input_ids"].tolist(),
                  "attention_mask": batch["attention_mask"].tolist(),
                  "cached": cached.tolist(), "uncached": uncached.tolist()}))
"""


@pytest.fixture(scope="module", params=["slim", "stock"])
def folder_and_reference(request, tmp_path_factory):
    """The reference model pruned by FLAP (heads, channels, rewritten biases: the slim layout) or by
    Wanda-sp (the same widths in every layer: the stock layout), and its masked dense model.

    A trained model, not a random one: a random tiny model's greedy output soon repeats one
    token, which a decode step that lost its KV cache reproduces just as well.
    """
    model, tok = load_model(), load_tokenizer()
    calib = calibration_windows(token_stream(tok, load_text(CALIB_TEXT)), 64, 8)
    result = prune(model, "flap" if request.param == "slim" else "wanda-sp", 0.4, calib)
    out = tmp_path_factory.mktemp("compat") / request.param
    assert export(model, result, out, tokenizer=tok, calib=calib, layout=request.param)["layout"] == request.param
    return out, model, result


def _masked_dense_greedy(model, result, ids, mask) -> torch.Tensor:
    adapter = get_adapter(model.config)
    with torch.no_grad(), replaced_weights(model, result.replaced), \
            masked(model, adapter, plan_masks(result.plan, adapter.geometry())):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("site", ["installed", *SITES])
def test_fresh_process_generates_the_masked_dense_tokens(folder_and_reference, site):
    folder, model, result = folder_and_reference
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TRANSFORMERS_VERBOSITY": "error"}
    if site != "installed":
        assert Path(site).is_dir(), f"{site} listed in COMPRESS_TRANSFORMERS_SITES does not exist"
        env["PYTHONPATH"] = site
    res = subprocess.run([sys.executable, "-c", LOAD, str(folder), json.dumps(PROMPTS), str(NEW_TOKENS)],
                         capture_output=True, text=True, cwd="/", env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    mask = torch.tensor(got["attention_mask"])
    assert mask[0].sum() != mask[1].sum()  # the batch really is left-padded
    ref = _masked_dense_greedy(model, result, torch.tensor(got["input_ids"]), mask)
    assert ref.shape[1] == mask.shape[1] + NEW_TOKENS
    assert got["cached"] == ref.tolist(), f"KV-cache generation under transformers {got['version']}"
    assert got["uncached"] == ref.tolist(), f"no-cache generation under transformers {got['version']}"


@pytest.mark.parametrize("site", SITES)
def test_pipeline_runs_under_each_supported_release(site, tmp_path):
    """The package's own lower bound (transformers 5.17) runs the whole export, checks included;
    4.x sites only load folders (the package needs 5.17+)."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": site, "TRANSFORMERS_VERBOSITY": "error"}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    if int(version.split(".")[0]) < 5:
        pytest.skip(f"transformers {version}: exported folders load with it; the pipeline needs 5.17+")
    out = tmp_path / "slim"
    code = "import sys; from compress.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "export", "--method", "wanda-sp", "--ratio", "0.3", "--out",
                          str(out), "--calib-samples", "8", "--seq-len", "64", "--eval-windows", "2"],
                         capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert all(c["passed"] for c in report["parity"]) and len(report["parity"]) == 4
