"""--model FILE.gguf: a tiny Llama written as GGUF the way llama.cpp writes it loads back into the
same model (logits equal to the original's) and the same tokenizer, and exports end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from compress.cli import main
from compress.errors import CompressError
from compress.loading import load_model, load_tokenizer
from compress.reference import MODEL_DIR

gguf = pytest.importorskip("gguf", reason="the [gguf] extra is not installed")


def _permute(w: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers undoes it on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).numpy()


def write_gguf(model: LlamaForCausalLM, tokenizer, path) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                arr = _permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                arr = _permute(t, c.num_key_value_heads)
            else:
                arr = t.numpy()
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_gguf(model, tok, path)
    return path, model, tok


def test_gguf_loads_the_same_model_and_tokenizer(gguf_file):
    path, model, tok = gguf_file
    loaded = load_model(path)
    ids = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5, diff
    text = "def f(x):\n    return x ** 2  # the square"
    assert load_tokenizer(path)(text)["input_ids"] == tok(text)["input_ids"]


def test_export_from_gguf(gguf_file, tmp_path, capsys):
    path, _, _ = gguf_file
    out = tmp_path / "slim"
    assert main(["export", "--model", str(path), "--method", "wanda-sp", "--ratio", "0.3", "--out", str(out),
                 "--calib-samples", "8", "--seq-len", "32", "--eval-windows", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(c["passed"] for c in report["parity"]) and report["base_model"] == str(path.resolve())
    assert main(["validate", str(out)]) == 0  # finds the GGUF base again from the report


def test_a_streamed_gguf_export_writes_the_same_bytes(gguf_file, tmp_path, capsys):
    """--streaming on rewrites the GGUF file as safetensors one tensor at a time and streams it:
    every file but the report equals the export from the model loaded whole; the temporary
    folder is gone afterwards; validate streams the GGUF base too."""
    import tempfile

    path, _, _ = gguf_file
    before = set(Path(tempfile.gettempdir()).glob("compress-gguf-*"))
    out = {}
    for streaming in ("off", "on"):
        out[streaming] = tmp_path / streaming
        assert main(["export", "--model", str(path), "--method", "flap", "--ratio", "0.3", "--out",
                     str(out[streaming]), "--streaming", streaming, "--calib-samples", "8", "--seq-len", "32",
                     "--eval-windows", "2"]) == 0
    files = [{p.name: p.read_bytes() for p in out[s].iterdir() if not p.name.startswith("report.")} for s in out]
    assert files[0].keys() == files[1].keys() and [n for n in files[0] if files[0][n] != files[1][n]] == []
    assert json.loads((out["on"] / "report.json").read_text())["streamed"]
    assert set(Path(tempfile.gettempdir()).glob("compress-gguf-*")) == before
    capsys.readouterr()
    assert main(["validate", str(out["on"]), "--streaming", "on"]) == 0
    assert "layers one at a time" in capsys.readouterr().out


def test_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(CompressError, match="no such GGUF file"):
        load_model(tmp_path / "absent.gguf")
