"""Slim model -> one ONNX graph written node by node with onnxruntime's fused operators.

The traced export (`onnx_export`, the dynamo exporter) spells every operation out: about 2,000
nodes for a 30-layer model, attention as MatMul/Softmax, a KV cache grown by Concat (a copy of
the whole cache per step). This graph has about 350 (SmolLM2-135M) and lets the runner append
to fixed KV buffers in place (`onnx_runner.SharedCache`); per layer it uses:

- `SkipSimplifiedLayerNormalization` (residual add + RMSNorm in one kernel; `SkipLayerNormalization`
  for OPT's LayerNorm) wherever a sublayer writes the whole residual width; where it writes a
  subset (DISP), one `ScatterElements` with reduction "add" (float16 graphs keep the
  traced graph's GatherElements + Add + ScatterElements, which onnxruntime's CPU kernel needs) on
  constant int32 indices, and `SimplifiedLayerNormalization` (`LayerNormalization`); where it
  reads a subset, `GatherElements` after the norm;
- one MatMul for q, k and v together (three where q and k are normed per head, Qwen3: each norm
  a `SimplifiedLayerNormalization` over the head dimension), `GroupQueryAttention` (rotary
  embedding, causal and padding mask, sliding window and the KV cache append inside; per-layer
  head counts), one MatMul for o_proj;
- MatMuls for gate, up and down_proj, SiLU as x * Sigmoid(x) (onnxruntime fuses it).

Inputs and outputs are those of the traced graph (the runner and the parity checks do not know
which they run): `input_ids`, `attention_mask` [batch, past + seq], `position_ids`, the past
tensors, `logits` and the present tensors. Padding reaches the attention as an additive bias;
the causal mask and rotary positions come from `position_ids` and the cache length. A padded
query row (left padding) is not a real token: its output differs from the PyTorch model's and
is never used.

Covers static models (no Probe Pruning) with head and rotary dimensions that are multiples of 16
(the operator rotates the first rotary dimensions of each head, so Phi-3's partial rotary
embedding fits; OPT's learned positions are added to the embeddings and nothing is rotated),
and query heads spread
evenly over their KV heads (whole KV groups pruned, or the same number of heads in every group);
`supported` says why not otherwise, and the traced graph is written instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from compress.helpers import ONNX_TYPES, dtype_name

__all__ = ["supported", "build_fused", "weight_groups", "genai_config", "GENAI_NAME"]

GENAI_NAME = "genai_config.json"

MS = "com.microsoft"
_ACTIVATIONS = {"silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh"}


def _even_groups(attn) -> bool:
    """Whether each KV head serves the next heads // kv_heads query heads, as GroupQueryAttention reads them."""
    if attn.kv_heads == attn.heads:
        return True
    if attn.heads % attn.kv_heads:
        return False
    want = torch.arange(attn.kv_heads).repeat_interleave(attn.heads // attn.kv_heads)
    return bool(torch.equal(attn.kv_map.cpu(), want))


def supported(slim) -> str | None:
    """None if the fused graph can express this model, else why not (one phrase)."""
    c = slim.config
    reasons = [(bool(c.probe), "Probe Pruning"),
               (c.head_dim % 16 != 0, "head dimension not a multiple of 16"),
               (c.positions == "rope" and c.rope_dim % 16 != 0, "rotary dimension not a multiple of 16"),
               (c.hidden_act not in _ACTIVATIONS, f"activation {c.hidden_act}")]
    reasons += [(layer.self_attn.heads and not _even_groups(layer.self_attn), f"layer {i}'s uneven GQA groups")
                for i, layer in enumerate(slim.model.layers)]
    return next((why for bad, why in reasons if bad), None)


class _Builder:
    def __init__(self, dtype: torch.dtype):
        from onnx import helper

        self.helper, self.dtype = helper, dtype
        self.np_dtype = np.dtype(dtype_name(dtype)).type
        self.nodes, self.inits, self.count = [], [], 0

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, t: torch.Tensor) -> str:
        return self.const(name, t.detach().to("cpu", self.dtype))

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        if isinstance(outputs, int):
            self.count += 1
            outputs = [f"{op_type}_{self.count}" + (f"_{j}" if outputs > 1 else "") for j in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outputs, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def linear(self, x: str, name: str, linears: list) -> str:
        """x @ cat(weights).T (+ cat(biases)): one MatMul for projections that read the same input."""
        weights, biases = [m.weight for m in linears], [m.bias for m in linears]
        y = self.op("MatMul", [x, self.weight(f"{name}.weight_t", torch.cat(weights).T.contiguous())])
        if any(b is not None for b in biases):
            full = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
            y = self.op("Add", [y, self.weight(f"{name}.bias", full)])
        return y

    def head_norm(self, x: str, weight: torch.Tensor, name: str, head_dim: int, eps: float) -> str:
        """RMSNorm over each head's dimensions of [B, T, heads * head_dim] (Qwen3's q/k norms)."""
        heads = self.op("Reshape", [x, self.const(f"{name}.heads_shape", np.array([0, 0, -1, head_dim], np.int64))])
        y = self.op("SimplifiedLayerNormalization", [heads, self.weight(name, weight)], axis=-1, epsilon=eps)
        return self.op("Reshape", [y, self.const(f"{name}.flat_shape", np.array([0, 0, -1], np.int64))])


def weight_groups(config, layer, pre: str) -> dict[str, list]:
    """{MatMul name: the slim linears whose weights it holds, concatenated} of one decoder layer;
    the graph stores each as "{name}.weight_t" ([in, out]). q, k and v share one MatMul unless
    q and k are normed per head (Qwen3), which needs them apart."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = {}
    if attn.heads:
        if config.qk_norm:
            groups.update({f"{pre}.self_attn.{p}": [getattr(attn, p)] for p in ("q_proj", "k_proj", "v_proj")})
        else:
            groups[f"{pre}.self_attn.qkv"] = [attn.q_proj, attn.k_proj, attn.v_proj]
        groups[f"{pre}.self_attn.o_proj"] = [attn.o_proj]
    if mlp.width:
        parts = ("gate_proj", "up_proj", "down_proj") if mlp.gated else ("up_proj", "down_proj")
        groups.update({f"{pre}.mlp.{p}": [getattr(mlp, p)] for p in parts})
    return groups


class _Residual:
    """The residual stream with at most one full-width write not yet added: the next norm adds it
    in its own kernel (SkipSimplifiedLayerNormalization)."""

    def __init__(self, b: _Builder, x: str, eps: float, rows_shape: list[str]):
        self.b, self.x, self.pending, self.eps = b, x, None, eps
        self.rows_shape, self.rows = rows_shape, None

    def expand(self, index: str) -> str:
        """A constant channel index [width] repeated for every position: [batch, seq, width], what
        GatherElements and ScatterElements take."""
        if self.rows is None:  # [batch, seq, 1], made once
            self.rows = self.b.op("Concat", self.rows_shape, axis=0)
        return self.b.op("Expand", [index, self.rows])

    def read(self, y: str, index: str | None) -> str:
        """Channels `index` of a normed stream `y`. GatherElements, not Gather: onnxruntime's Gather
        on the last axis copies one element per call."""
        return y if index is None else self.b.op("GatherElements", [y, self.expand(index)], axis=-1)

    def norm(self, module, name: str) -> str:
        """`module` (RMSNorm, or LayerNorm with its bias: OPT) applied to the stream, stored as `name`.*."""
        gamma = [self.b.weight(f"{name}.weight", module.weight)]
        beta = [] if getattr(module, "bias", None) is None else [self.b.weight(f"{name}.bias", module.bias)]
        if self.pending is None:
            op = "LayerNormalization" if beta else "SimplifiedLayerNormalization"
            return self.b.op(op, [self.x, *gamma, *beta], axis=-1, epsilon=self.eps)
        self.b.count += 1
        y, total = f"SkipNorm_{self.b.count}", f"SkipNorm_{self.b.count}_sum"  # unused outputs left unnamed
        op = "SkipLayerNormalization" if beta else "SkipSimplifiedLayerNormalization"
        self.b.op(op, [self.x, self.pending, *gamma, *beta], [y, "", "", total], domain=MS, epsilon=self.eps)
        self.x = total
        self.pending = None
        return y

    def add_constant(self, v: str) -> None:
        """A constant [hidden] vector added to every position (a removed sublayer's bias)."""
        if self.pending is not None:
            self.x, self.pending = self.b.op("Add", [self.x, self.pending]), None
        self.x = self.b.op("Add", [self.x, v])

    def write(self, y: str | None, index: str | None) -> None:
        if y is None:
            return
        if index is None and self.pending is None:
            self.pending = y
            return
        if self.pending is not None:
            self.x, self.pending = self.b.op("Add", [self.x, self.pending]), None
        if index is None:
            self.x = self.b.op("Add", [self.x, y])
            return
        idx = self.expand(index)
        if self.b.dtype == torch.float32:
            self.x = self.b.op("ScatterElements", [self.x, idx, y], axis=-1, reduction="add")
        else:  # onnxruntime's CPU kernel has no float16 "add" reduction: gather, add, scatter
            total = self.b.op("Add", [self.b.op("GatherElements", [self.x, idx], axis=-1), y])
            self.x = self.b.op("ScatterElements", [self.x, idx, total], axis=-1)


def _scattered(bias: torch.Tensor, index: torch.Tensor | None, c) -> torch.Tensor:
    """A bias written at residual channels `index` (None: all), as a full-width vector."""
    if index is None:
        return bias
    return torch.zeros(c.hidden_size, dtype=bias.dtype).index_add(0, index.cpu(), bias.detach().cpu())


def _activation(b: _Builder, act: str, x: str) -> str:
    if act in ("silu", "swish"):
        return b.op("Mul", [x, b.op("Sigmoid", [x])])
    if act == "relu":
        return b.op("Relu", [x])
    return b.op("Gelu", [x], domain=MS) if act == "gelu" else b.op("FastGelu", [x], domain=MS)


def build_fused(slim, layers: list[int], inputs: list[str], outputs: list[str], dtype: torch.dtype):
    """The ModelProto (weights inside; the caller saves them as external data)."""
    from onnx import TensorProto, helper

    c, m = slim.config, slim.model
    b = _Builder(dtype)
    elem = ONNX_TYPES[dtype_name(dtype)][0]
    ids, mask, pos = inputs[:3]
    past = dict(zip([(i, kv) for i in layers for kv in ("key", "value")], inputs[3:]))
    present = dict(zip([(i, kv) for i in layers for kv in ("key", "value")], outputs[1:]))

    x = b.op("Gather", [b.weight("model.embed_tokens.weight", m.embed_tokens.weight), ids])
    # What GroupQueryAttention needs to know of the cache: total length (past + new), each row's
    # last slot, and the padding as an additive bias [batch, 1, seq, total].
    one = b.const("one_i64", np.array([1], np.int64))
    batch = b.op("Shape", [ids], start=0, end=1)
    seq = b.op("Shape", [ids], start=1, end=2)
    total = b.op("Shape", [mask], start=1, end=2)
    total32 = b.op("Cast", [b.op("Squeeze", [total])], to=TensorProto.INT32)
    seqlens = b.op("Cast", [b.op("Expand", [b.op("Sub", [total, one]), batch])], to=TensorProto.INT32)
    padding = b.op("Equal", [mask, b.const("zero_i64", np.array(0, np.int64))])
    neg = b.const("mask_value", np.array(np.finfo(b.np_dtype).min, b.np_dtype))
    bias = b.op("Where", [padding, neg, b.const("zero_f", np.array(0, b.np_dtype))])
    bias = b.op("Unsqueeze", [bias, b.const("axes_12", np.array([1, 2], np.int64))])
    bias = b.op("Expand", [bias, b.op("Concat", [batch, one, seq, total], axis=0)])
    rotary = c.positions == "rope"
    if rotary:
        angles = torch.arange(c.max_position_embeddings, dtype=torch.float32)[:, None] * m.rope_inv_freq[None, :]
        cos = b.weight("rope.cos", angles.cos() * c.rope_attention_scaling)
        sin = b.weight("rope.sin", angles.sin() * c.rope_attention_scaling)
    else:  # learned positions (OPT): added to the embeddings, nothing rotated
        cos = sin = ""
        shifted = b.op("Add", [pos, b.const("position_offset", np.array(c.position_offset, np.int64))])
        x = b.op("Add", [x, b.op("Gather", [b.weight("model.embed_positions.weight", m.embed_positions.weight),
                                             shifted])])

    res = _Residual(b, x, c.norm_eps, [batch, seq, one])
    for i, layer in enumerate(m.layers):
        pre = f"model.layers.{i}"
        idx = {k: None if getattr(layer, f"{k}_index") is None
               else b.const(f"{pre}.{k}_index", getattr(layer, f"{k}_index").int())
               for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
        attn, mlp = layer.self_attn, layer.mlp
        groups = weight_groups(c, layer, pre)
        a = res.read(res.norm(layer.input_layernorm, f"{pre}.input_layernorm"), idx["attn_in"])
        y = None
        if attn.heads:
            if c.qk_norm:  # q and k normed per head before the rotary embedding GroupQueryAttention applies
                qkv = [b.linear(a, f"{pre}.self_attn.{p}", groups[f"{pre}.self_attn.{p}"])
                       for p in ("q_proj", "k_proj", "v_proj")]
                qkv[:2] = [b.head_norm(qkv[j], norm.weight, f"{pre}.self_attn.{n}.weight", c.head_dim, c.norm_eps)
                           for j, (n, norm) in enumerate((("q_norm", attn.q_norm), ("k_norm", attn.k_norm)))]
            else:
                qkv = [b.linear(a, f"{pre}.self_attn.qkv", groups[f"{pre}.self_attn.qkv"]), "", ""]
            ctx = f"{pre}.self_attn.context"
            b.op("GroupQueryAttention", [*qkv, past[(i, "key")], past[(i, "value")], seqlens, total32, cos,
                                         sin, pos if rotary else "", bias],
                 [ctx, present[(i, "key")], present[(i, "value")]], domain=MS,
                 num_heads=attn.heads, kv_num_heads=attn.kv_heads, scale=1.0 / math.sqrt(c.head_dim),
                 do_rotary=int(rotary), local_window_size=c.attention_window or -1)
            y = b.linear(ctx, f"{pre}.self_attn.o_proj", groups[f"{pre}.self_attn.o_proj"])
        elif getattr(attn, "out_bias", None) is not None:
            res.add_constant(b.weight(f"{pre}.self_attn.out_bias", _scattered(attn.out_bias, layer.attn_out_index, c)))
        res.write(y, idx["attn_out"])

        h = res.read(res.norm(layer.post_attention_layernorm, f"{pre}.post_attention_layernorm"), idx["mlp_in"])
        y = None
        if mlp.width:
            # Two MatMuls: one gate-up MatMul needs a Split and was no faster at decode.
            if mlp.gated:
                gate = b.linear(h, f"{pre}.mlp.gate_proj", groups[f"{pre}.mlp.gate_proj"])
                up = b.linear(h, f"{pre}.mlp.up_proj", groups[f"{pre}.mlp.up_proj"])
                act = b.op("Mul", [_activation(b, c.hidden_act, gate), up])
            else:
                act = _activation(b, c.hidden_act, b.linear(h, f"{pre}.mlp.up_proj", groups[f"{pre}.mlp.up_proj"]))
            y = b.linear(act, f"{pre}.mlp.down_proj", groups[f"{pre}.mlp.down_proj"])
        elif getattr(mlp, "out_bias", None) is not None:
            res.add_constant(b.weight(f"{pre}.mlp.out_bias", _scattered(mlp.out_bias, layer.mlp_out_index, c)))
        res.write(y, idx["mlp_out"])

    x = res.norm(m.norm, "model.norm")
    head = slim.lm_head
    if head.weight.data_ptr() == m.embed_tokens.weight.data_ptr():  # tied: the embedding read transposed, not stored twice
        flat = b.op("Reshape", [x, b.const("flat_shape", np.array([-1, c.hidden_size], np.int64))])
        logits = b.op("Gemm", [flat, "model.embed_tokens.weight"], transB=1)
        vocab = b.const("vocab", np.array([c.vocab_size], np.int64))
        b.op("Reshape", [logits, b.op("Concat", [batch, seq, vocab], axis=0)], [outputs[0]])
    else:
        b.op("MatMul", [x, b.weight("lm_head.weight_t", head.weight.T.contiguous())], [outputs[0]])

    kv = {i: c.layer_kv_heads[i] for i in layers}
    graph_inputs = [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"]),
                    helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "total_sequence"]),
                    helper.make_tensor_value_info(pos, TensorProto.INT64, ["batch", "sequence"])]
    graph_inputs += [helper.make_tensor_value_info(past[(i, t)], elem, ["batch", kv[i], "past_sequence", c.head_dim])
                     for i in layers for t in ("key", "value")]
    graph_outputs = [helper.make_tensor_value_info(outputs[0], elem, ["batch", "sequence", c.vocab_size])]
    graph_outputs += [helper.make_tensor_value_info(present[(i, t)], elem,
                                                    ["batch", kv[i], "total_sequence", c.head_dim])
                      for i in layers for t in ("key", "value")]
    graph = helper.make_graph(b.nodes, "slim", graph_inputs, graph_outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)],
                             producer_name="compress")


def save_fused(proto, path: Path, data_name: str) -> None:
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)


def genai_config(slim, inputs: list[str], outputs: list[str]) -> dict | None:
    """onnxruntime-genai's description of this graph (so its runtime can generate with it: KV
    buffers shared in place, the loop in C++), or None where genai cannot hold the cache: it
    allocates one KV shape for every layer, so every layer must keep attention and the same
    number of KV heads."""
    c = slim.config
    kv = set(c.layer_kv_heads)
    if len(kv) != 1 or 0 in kv:
        return None
    past = [n for n in inputs if n.startswith("past_key_values.")]
    present = [n for n in outputs if n.startswith("present.")]
    assert past[:2] == ["past_key_values.0.key", "past_key_values.0.value"] and len(past) == 2 * c.num_hidden_layers
    pad = c.pad_token_id if c.pad_token_id is not None else c.eos_token_id
    tokens = {k: v for k, v in (("bos_token_id", c.bos_token_id), ("eos_token_id", c.eos_token_id),
                                ("pad_token_id", pad)) if v is not None}  # genai wants numbers or nothing
    return {
        "model": {
            "type": "llama",  # a decoder-only model with a KV cache; the graph itself says the rest
            **tokens,
            "context_length": c.max_position_embeddings, "vocab_size": c.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": c.head_dim,
                "hidden_size": c.hidden_size,
                "num_attention_heads": max(c.layer_heads),
                "num_key_value_heads": kv.pop(),
                "num_hidden_layers": c.num_hidden_layers,
                "inputs": {"input_ids": inputs[0], "attention_mask": inputs[1], "position_ids": inputs[2],
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": outputs[0], "present_key_names": present[0].replace(".0.", ".%d."),
                            "present_value_names": present[1].replace(".0.", ".%d.")},
            },
        },
        "search": {"do_sample": False, "max_length": c.max_position_embeddings, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "temperature": 1.0, "top_k": 50,
                   "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": True,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
