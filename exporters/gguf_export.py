"""A slim folder as one GGUF file that llama.cpp runs natively, in its "deci" architecture
(Nemotron-NAS): per-layer query heads, KV heads and MLP widths, attention-free layers.

Where deci cannot say what the slim model computes, an exact stand-in is written instead:

- uneven GQA groups (one KV head keeps more query heads than another): KV heads are repeated so
  every group has the same size, the gcd of the kept counts (query heads are ordered by group);
- attention removed in layer 0 (llama.cpp reads the head size from layer 0) or with a bias left
  (FLAP's compensation; a deci layer without heads adds no bias): one head of zero weights, whose
  output is exactly 0 (+ the bias);
- MLP removed: a zero-weight MLP of width `mlp_multiple` (+ its bias), since llama.cpp ends a
  layer of width 0 before adding the attention output to the residual (src/models/deci.cpp);
- DISP's residual subsets: written dense along the residual, zero rows and columns (exact; the
  bytes it costs are counted in `GgufLayout.residual_zeros`);
- q/k rows permuted per head from rotate-half pairs to llama.cpp's adjacent pairs;
- RoPE frequencies of any scaling (llama3 ...) as per-frequency factors on a base: `rope_freqs`.

`mlp_multiple` pads MLP widths with zero channels (exact) so a quantizer's blocks fit the rows.
The file is written in two passes over the tensors (shapes first, then bytes), so memory holds
one tensor at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compress.errors import UnsupportedModelError
from exporters.gguf_tokenizer import add_tokenizer
from exporters.hf_folder import open_safetensors, weight_map

__all__ = ["FLOAT_TYPES", "GgufLayout", "unsupported_reason", "write_gguf"]

ARCH = "deci"
FLOAT_TYPES = ("f32", "f16", "bf16")


def unsupported_reason(config: dict) -> str | None:
    """Why llama.cpp's deci architecture cannot run this slim config, in one line; None if it can."""
    family = config.get("base_model_type", "this model")
    if config.get("probe"):
        return "Probe Pruning chooses heads and channels per batch at run time; a GGUF holds fixed widths"
    if config.get("norm") != "rms" or config.get("positions") != "rope":
        return f"{family}: LayerNorm and learned positions (OPT) have no deci counterpart (RMSNorm, RoPE)"
    if not config.get("gated_mlp") or config.get("hidden_act") not in ("silu", "swish"):
        gated = "" if config.get("gated_mlp") else ", ungated"
        return f"{family}: deci's MLP is SwiGLU; this one is {config.get('hidden_act')}{gated}"
    if config.get("qk_norm"):
        return f"{family}: deci has no per-head q/k norms (Qwen3's)"
    if config.get("rope_dim") != config.get("head_dim"):
        return (f"{family}: rotary on {config.get('rope_dim')} of {config.get('head_dim')} head dimensions; "
                "deci rotates all")
    if abs(config.get("rope_attention_scaling", 1.0) - 1.0) > 1e-6:
        return f"{family}: RoPE attention scaling {config['rope_attention_scaling']} (YaRN) is not written"
    return None


@dataclass
class LayerLayout:
    heads: int  # query heads in the GGUF
    kv_heads: int
    ff: int  # MLP width in the GGUF
    q_order: list[int] = field(default_factory=list)  # the slim layer's query heads, grouped by KV head
    kv_order: list[int] = field(default_factory=list)  # the slim KV head behind each GGUF KV head
    attn_standin: bool = False
    mlp_standin: bool = False


@dataclass
class GgufLayout:
    layers: list[LayerLayout]
    rope_base: float
    rope_factors: list[float] | None  # None: plain RoPE on rope_base
    context_length: int
    residual_zeros: int = 0  # elements written as zeros to make residual subsets dense
    elements: int = 0  # elements of every tensor written
    notes: list[str] = field(default_factory=list)


class _Folder:
    """Tensors of a slim folder by name, as float32 torch tensors (None when absent)."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.names, self.folder, self.stack, self.files = weight_map(folder), folder, stack, {}

    def get(self, name: str) -> torch.Tensor | None:
        file = self.names.get(name)
        if file is None:
            return None
        if file not in self.files:
            self.files[file] = self.stack.enter_context(open_safetensors(self.folder / file))
        t = self.files[file].get_tensor(name)
        return t if not t.is_floating_point() else t.float()


def _rope(config: dict) -> tuple[float, list[float] | None]:
    """(base, factors) with base^(-2i/d) / factor_i == the slim model's inv_freq[i]."""
    inv = np.asarray(config["rope_inv_freq"], dtype=np.float64)
    d = 2 * len(inv)
    base = float(inv[1] ** (-d / 2)) if len(inv) > 1 else 10000.0
    if abs(base - round(base)) < 1e-5 * base:  # rope_theta is a whole number; inv_freq is float32
        base = float(round(base))
    factors = base ** (-2 * np.arange(len(inv)) / d) / inv
    return base, None if np.abs(factors - 1).max() < 1e-6 else factors.tolist()


def _layout(config: dict, t: _Folder, mlp_multiple: int) -> GgufLayout:
    layers = []
    for i in range(config["num_hidden_layers"]):
        h, m = config["layer_heads"][i], config["layer_intermediate"][i]
        if h:
            kv_map = t.get(f"model.layers.{i}.self_attn.kv_map").tolist()
            order = sorted(range(h), key=lambda j: kv_map[j])
            groups = {kv: kv_map.count(kv) for kv in sorted(set(kv_map))}
            g = math.gcd(*groups.values())
            lay = LayerLayout(h, h // g, 0, order, [kv for kv, n in groups.items() for _ in range(n // g)])
        else:
            standin = i == 0 or config["layer_o_bias"][i]
            lay = LayerLayout(int(standin), int(standin), 0, attn_standin=bool(standin))
        lay.ff = -(-max(m, 1) // mlp_multiple) * mlp_multiple
        lay.mlp_standin = not m
        layers.append(lay)
    base, factors = _rope(config)
    context = config["max_position_embeddings"]
    notes = []
    if config.get("attention_window") and config["attention_window"] < context:
        context = config["attention_window"]
        notes.append(f"sliding window {context}: llama.cpp attends to the whole context, so the GGUF's context "
                     f"length is the window (identical logits up to {context} tokens)")
    return GgufLayout(layers, base, factors, context, notes=notes)


def _heads(w: torch.Tensor, order: list[int], hd: int) -> torch.Tensor:
    """Rows of `w` (a weight or bias) taken head by head in `order`."""
    return w.reshape(-1, hd, *w.shape[1:])[order].reshape(-1, *w.shape[1:])


def _adjacent_pairs(w: torch.Tensor, hd: int) -> torch.Tensor:
    """Rotate-half row order (i, i + hd/2) -> llama.cpp's adjacent pairs (2i, 2i + 1), per head."""
    return w.reshape(-1, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _Writer:
    """Builds each GGUF tensor from the slim tensors; counts the zeros written for residual subsets."""

    def __init__(self, config: dict, t: _Folder, layout: GgufLayout):
        self.c, self.t, self.layout, self.hidden, self.hd = config, t, layout, config["hidden_size"], config["head_dim"]
        self.residual_zeros = 0

    def _scatter(self, w: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
        """`w` spread along the residual (dim) at `index`, zeros elsewhere."""
        if index is None:
            return w
        shape = list(w.shape)
        shape[dim] = self.hidden
        out = w.new_zeros(shape)
        out.index_copy_(dim, index, w)
        self.residual_zeros += out.numel() - w.numel()
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield "token_embd.weight", self.t.get("model.embed_tokens.weight")
        for i, lay in enumerate(self.layout.layers):
            yield from self._attention(i, lay)
            yield from self._mlp(i, lay)
        yield "output_norm.weight", self.t.get("model.norm.weight")
        head = self.t.get("lm_head.weight")
        if head is not None and not self.c.get("tie_word_embeddings"):
            yield "output.weight", head
        if self.layout.rope_factors is not None:
            yield "rope_freqs.weight", torch.tensor(self.layout.rope_factors, dtype=torch.float32)

    def _attention(self, i: int, lay: LayerLayout) -> Iterator[tuple[str, torch.Tensor]]:
        pre, out, hd = f"model.layers.{i}.", f"blk.{i}.", self.hd
        if not lay.heads:
            return
        yield out + "attn_norm.weight", self.t.get(pre + "input_layernorm.weight")
        a_in, a_out = self.t.get(pre + "attn_in_index"), self.t.get(pre + "attn_out_index")
        if lay.attn_standin:
            zero = torch.zeros(hd, self.hidden)
            yield from ((out + f"attn_{p}.weight", zero) for p in "qkv")
            yield out + "attn_output.weight", zero.T.contiguous()
            bias = self.t.get(pre + "self_attn.out_bias")
            if bias is not None:
                yield out + "attn_output.bias", self._scatter(bias, a_out, 0)
            return
        a = pre + "self_attn."
        q = _heads(self.t.get(a + "q_proj.weight"), lay.q_order, hd)
        yield out + "attn_q.weight", self._scatter(_adjacent_pairs(q, hd), a_in, 1)
        for p in "kv":
            w = _heads(self.t.get(a + f"{p}_proj.weight"), lay.kv_order, hd)
            yield out + f"attn_{p}.weight", self._scatter(_adjacent_pairs(w, hd) if p == "k" else w, a_in, 1)
        o = _heads(self.t.get(a + "o_proj.weight").T, lay.q_order, hd).T
        yield out + "attn_output.weight", self._scatter(o, a_out, 0)
        for p, order in (("q", lay.q_order), ("k", lay.kv_order), ("v", lay.kv_order)):
            b = self.t.get(a + f"{p}_proj.bias")
            if b is not None:
                b = _heads(b, order, hd)
                yield out + f"attn_{p}.bias", _adjacent_pairs(b, hd) if p in "qk" else b
        bias = self.t.get(a + "o_proj.bias")
        if bias is not None:
            yield out + "attn_output.bias", self._scatter(bias, a_out, 0)

    def _mlp(self, i: int, lay: LayerLayout) -> Iterator[tuple[str, torch.Tensor]]:
        pre, out = f"model.layers.{i}.", f"blk.{i}."
        m_in, m_out = self.t.get(pre + "mlp_in_index"), self.t.get(pre + "mlp_out_index")
        yield out + "ffn_norm.weight", self.t.get(pre + "post_attention_layernorm.weight")
        m = self.c["layer_intermediate"][i]
        mlp = pre + "mlp."
        for p in ("gate", "up"):
            w = torch.zeros(0, self.c["layer_mlp_in"][i]) if lay.mlp_standin else self.t.get(mlp + f"{p}_proj.weight")
            yield out + f"ffn_{p}.weight", self._scatter(_pad(w, lay.ff, 0), m_in, 1)
            b = self.t.get(mlp + f"{p}_proj.bias")
            if b is not None:
                yield out + f"ffn_{p}.bias", _pad(b, lay.ff, 0)
        w = torch.zeros(self.c["layer_mlp_out"][i], 0) if lay.mlp_standin else self.t.get(mlp + "down_proj.weight")
        yield out + "ffn_down.weight", self._scatter(_pad(w, lay.ff, 1), m_out, 0)
        bias = self.t.get(mlp + ("out_bias" if not m else "down_proj.bias"))
        if bias is not None:
            yield out + "ffn_down.bias", self._scatter(bias, m_out, 0)


def _pad(w: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """`w` with zeros appended along `dim` up to n (zero MLP channels add nothing)."""
    extra = n - w.shape[dim]
    if not extra:
        return w
    shape = list(w.shape)
    shape[dim] = extra
    return torch.cat([w, w.new_zeros(shape)], dim)


def _array(t: torch.Tensor, gguf_type: str):
    """(numpy array, raw GGML type or None): 1-D tensors stay float32, as llama.cpp's converter keeps them."""
    from gguf import GGMLQuantizationType, quants

    a = t.detach().to(torch.float32).contiguous().numpy()
    if a.ndim == 1 or gguf_type == "f32":
        return a, None
    if gguf_type == "f16":
        return a.astype(np.float16), None
    return quants.quantize(a, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16


def write_gguf(folder: str | Path, path: str | Path, gguf_type: str = "f32", mlp_multiple: int = 1,
               name: str | None = None) -> GgufLayout:
    """Write the slim `folder` as a GGUF file at `path` (f32, f16 or bf16 weights); returns its layout.
    UnsupportedModelError (one line) for a model deci cannot express or a tokenizer llama.cpp cannot repeat."""
    from gguf import GGUFWriter, LlamaFileType

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    reason = unsupported_reason(config)
    if reason:
        raise UnsupportedModelError(f"GGUF (llama.cpp deci): {reason}")
    if gguf_type not in FLOAT_TYPES:
        raise ValueError(f"write_gguf writes {', '.join(FLOAT_TYPES)}; quantized types come from llama.cpp's quantizer")
    with ExitStack() as stack:
        t = _Folder(folder, stack)
        layout = _layout(config, t, mlp_multiple)
        w = GGUFWriter(str(path), arch=ARCH)
        w.add_name(name or folder.name)
        w.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                         "bf16": LlamaFileType.MOSTLY_BF16}[gguf_type])
        _add_hparams(w, config, layout)
        add_tokenizer(w, folder, config["vocab_size"])
        writer = _Writer(config, t, layout)
        for tensor_name, tensor in writer.tensors():  # pass 1: names, shapes, sizes
            a, raw = _array(tensor, gguf_type)
            w.add_tensor_info(tensor_name, a.shape, a.dtype, a.nbytes, raw_dtype=raw)
            layout.elements += tensor.numel()
        layout.residual_zeros = writer.residual_zeros
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, tensor in _Writer(config, t, layout).tensors():  # pass 2: the bytes
            w.write_tensor_data(_array(tensor, gguf_type)[0])
        w.close()
    return layout


def _add_hparams(w, config: dict, layout: GgufLayout) -> None:
    layers = layout.layers
    w.add_block_count(len(layers))
    w.add_context_length(layout.context_length)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length([lay.ff for lay in layers])
    w.add_head_count([lay.heads for lay in layers])
    w.add_head_count_kv([lay.kv_heads for lay in layers])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(layout.rope_base)
    w.add_layer_norm_rms_eps(config["norm_eps"])
    w.add_vocab_size(config["vocab_size"])
