"""The shipped reference model and text slices: present, loadable, trained, reproducible."""

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from compress import corpus
from compress.errors import CompressError
from compress.reference import CALIB_TEXT, MODEL_DIR, TEST_TEXT
from compress.textdata import load_text, token_stream
from compress.commands import eval as eval_command
from validation.quality import perplexity

SEQ = 256
N_WINDOWS = 12


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def test_ids():
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    return token_stream(tok, load_text(TEST_TEXT))


def test_shipped_files():
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    assert not [p for p in MODEL_DIR.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert 100_000 < CALIB_TEXT.stat().st_size < 1_000_000
    assert 100_000 < TEST_TEXT.stat().st_size < 1_000_000
    notice = (CALIB_TEXT.parent / "NOTICE").read_text(encoding="utf-8")
    assert "PSF LICENSE AGREEMENT" in notice and "Python Software Foundation" in notice


def test_model_and_tokenizer_load(model):
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (4, 256, 8, 2, 768, 4096)
    assert cfg.tie_word_embeddings
    assert 3_500_000 < sum(p.numel() for p in model.parameters()) < 4_500_000
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id is not None
    text = "def f(x):\n    return x  # ünïcode\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless round trip


def test_trained_model_far_better_than_random(model, test_ids):
    trained = perplexity(model, test_ids, SEQ, 4, "cpu", max_windows=N_WINDOWS, progress=False)
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(model.config).eval()
    rand = perplexity(random_model, test_ids, SEQ, 4, "cpu", max_windows=N_WINDOWS, progress=False)
    assert rand.perplexity > 1000  # ~ uniform over 4096 tokens
    assert trained.perplexity < 0.1 * rand.perplexity
    assert trained.perplexity < 100


def test_eval_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    eval_command.configure(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--reference", str(MODEL_DIR), "--windows", "3", "--device", "cpu", "--text",
                              str(TEST_TEXT), "--json", str(out)])
    assert args.model == MODEL_DIR and args.seq_len == 256
    assert eval_command.run(args) == 0
    printed = capsys.readouterr().out
    assert "perplexity on python-docs (3 windows of 256 tokens spread over " in printed
    [res] = json.loads(out.read_text())["texts"]
    assert res["windows"] == len(res["offsets"]) == 3 and res["mode"] == "fixed"
    assert abs(res["kl"]) < 1e-6 and res["top1_agreement"] == 1.0
    with pytest.raises(CompressError, match="no such model folder"):
        eval_command.run(parser.parse_args(["--model", str(tmp_path / "nope")]))


def test_split_is_deterministic():
    if not corpus.SOURCE_DIR.is_dir():
        pytest.skip(f"Debian corpus absent: {corpus.SOURCE_DIR}")
    a, b = corpus.build_split(seed=0), corpus.build_split(seed=0)
    assert a == b
    assert corpus.build_split(seed=1) != a
    parts = [set(a.train), set(a.calib), set(a.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(corpus.list_documents())
    # the shipped slices are exactly the seed-0 split of this corpus
    assert corpus.join_documents(corpus.SOURCE_DIR, a.test) == load_text(TEST_TEXT)
    assert corpus.join_documents(corpus.SOURCE_DIR, a.calib) == load_text(CALIB_TEXT)
