"""Plan + dense weights -> physically smaller tensors, index buffers and a SlimConfig.

Every tensor is taken through the adapter's `LayerParts`, so this file knows no family.
`replaced` holds tensors a method rewrote (FLAP's bias compensation), keyed by the dense
model's parameter names; a bias the dense model lacks may appear there.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.adapters import Adapter, FusedSlice
from compress.helpers import head_rows
from compress.plan import Plan
from compress.slim import SlimConfig, SlimForCausalLM
from compress.slim import AUTO_MAP

__all__ = ["slim_config", "slim_state_dict", "slim_shared_state_dict", "slim_layer_state_dict", "build_slim_model",
           "slim_model", "layer_tables", "final_tensors"]


class _Weights:
    """Reads a module's weight/bias, preferring a replaced tensor of the same dense name."""

    def __init__(self, model: nn.Module, replaced: dict[str, torch.Tensor] | None):
        self.names = {m: n for n, m in model.named_modules()}
        self.replaced = replaced or {}

    def get(self, module: nn.Module | FusedSlice, attr: str) -> torch.Tensor | None:
        if isinstance(module, FusedSlice):
            t = self.get(module.module, attr)
            return None if t is None else t[module.start:module.stop]
        name = f"{self.names[module]}.{attr}"
        if name in self.replaced:
            return self.replaced[name]
        t = getattr(module, attr, None)
        return None if t is None else t.detach()


def _idx(ids: list[int], device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def slim_config(model, adapter: Adapter, plan: Plan, replaced=None) -> SlimConfig:
    g = adapter.geometry()
    w = _Weights(model, replaced)
    layers = [lp.resolved(g) for lp in plan.layers]
    parts = [adapter.parts(layer) for layer in adapter.layers(model)]
    inv_freq, attn_scaling = adapter.rotary(model)
    settings = adapter.slim_settings()
    dense = model.config
    return SlimConfig(
        vocab_size=dense.vocab_size,
        hidden_size=g.hidden,
        num_hidden_layers=g.num_layers,
        head_dim=g.head_dim,
        qkv_bias=parts[0].q.bias is not None,
        mlp_bias=parts[0].up.bias is not None,
        rope_inv_freq=None if inv_freq is None else inv_freq.tolist(),
        rope_attention_scaling=attn_scaling,
        layer_heads=[len(r.heads) for r in layers],
        layer_kv_heads=[len(r.kv_heads) for r in layers],
        layer_intermediate=[len(r.mlp_hidden) for r in layers],
        layer_attn_in=[len(r.attn_in) for r in layers],
        layer_attn_out=[len(r.attn_out) for r in layers],
        layer_mlp_in=[len(r.mlp_in) for r in layers],
        layer_mlp_out=[len(r.mlp_out) for r in layers],
        layer_o_bias=[w.get(p.o, "bias") is not None for p in parts],
        layer_down_bias=[w.get(p.down, "bias") is not None for p in parts],
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        auto_map=dict(AUTO_MAP),
        architectures=["SlimForCausalLM"],
        base_model_type=dense.model_type,
        **settings,
    )


def slim_state_dict(model, adapter: Adapter, plan: Plan, replaced=None) -> dict[str, torch.Tensor]:
    """The slim model's tensors, named as in `SlimForCausalLM`, contiguous and detached."""
    plan.check(adapter.geometry())
    w = _Weights(model, replaced)
    sd = slim_shared_state_dict(model, adapter, replaced)
    for i, (layer, lp) in enumerate(zip(adapter.layers(model), plan.layers)):
        sd.update(_layer_tensors(w, adapter, layer, lp, f"model.layers.{i}."))
    return {k: v.contiguous() for k, v in sd.items()}


def slim_shared_state_dict(model, adapter: Adapter, replaced=None) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers (embeddings, final norm, LM head): never pruned."""
    w = _Weights(model, replaced)
    sd: dict[str, torch.Tensor] = {}
    sd["model.embed_tokens.weight"] = w.get(adapter.embed_tokens(model), "weight")
    pos = adapter.embed_positions(model)
    if pos is not None:
        sd["model.embed_positions.weight"] = w.get(pos, "weight")
    _norm(sd, "model.norm", w, adapter.final_norm(model))
    if not model.config.tie_word_embeddings:
        sd["lm_head.weight"] = w.get(model.get_output_embeddings(), "weight")
    return sd


def slim_layer_state_dict(model, adapter: Adapter, plan: Plan, i: int, replaced=None) -> dict[str, torch.Tensor]:
    """Layer i's slim tensors, named as in `SlimDecoderLayer` (layer-by-layer parity)."""
    sd = _layer_tensors(_Weights(model, replaced), adapter, adapter.layers(model)[i], plan.layers[i], "")
    return {k: v.contiguous() for k, v in sd.items()}


def _layer_tensors(w: _Weights, adapter: Adapter, layer, lp, pre: str) -> dict[str, torch.Tensor]:
    g, sd = adapter.geometry(), {}
    p, r = adapter.parts(layer), lp.resolved(g)
    dev = p.q.weight.device
    _norm(sd, pre + "input_layernorm", w, p.attn_norm)
    _norm(sd, pre + "post_attention_layernorm", w, p.mlp_norm)
    for field, key in (("attn_in", "attn_in_index"), ("attn_out", "attn_out_index"),
                       ("mlp_in", "mlp_in_index"), ("mlp_out", "mlp_out_index")):
        ids = getattr(r, field)
        if len(ids) < g.hidden:
            sd[pre + key] = _idx(ids, dev)
    a_in, a_out = _idx(r.attn_in, dev), _idx(r.attn_out, dev)
    if r.heads:
        q_rows = head_rows(r.heads, g.head_dim, dev)
        kv_rows = head_rows(r.kv_heads, g.head_dim, dev)
        _linear(sd, pre + "self_attn.q_proj", w, p.q, q_rows, a_in)
        _linear(sd, pre + "self_attn.k_proj", w, p.k, kv_rows, a_in)
        _linear(sd, pre + "self_attn.v_proj", w, p.v, kv_rows, a_in)
        _linear(sd, pre + "self_attn.o_proj", w, p.o, a_out, q_rows)
        kv_pos = {kv: j for j, kv in enumerate(r.kv_heads)}
        sd[pre + "self_attn.kv_map"] = _idx([kv_pos[h // g.group_size] for h in r.heads], dev)
        for name, norm in (("q_norm", p.q_norm), ("k_norm", p.k_norm)):
            if norm is not None:
                _norm(sd, pre + "self_attn." + name, w, norm)
    elif w.get(p.o, "bias") is not None:
        sd[pre + "self_attn.out_bias"] = w.get(p.o, "bias")[a_out]
    m_in, m_out, hid = _idx(r.mlp_in, dev), _idx(r.mlp_out, dev), _idx(r.mlp_hidden, dev)
    if r.mlp_hidden:
        if p.gate is not None:
            _linear(sd, pre + "mlp.gate_proj", w, p.gate, hid, m_in)
        _linear(sd, pre + "mlp.up_proj", w, p.up, hid, m_in)
        _linear(sd, pre + "mlp.down_proj", w, p.down, m_out, hid)
    elif w.get(p.down, "bias") is not None:
        sd[pre + "mlp.out_bias"] = w.get(p.down, "bias")[m_out]
    return sd


def _linear(sd, name, w: _Weights, module, rows, cols) -> None:
    sd[name + ".weight"] = w.get(module, "weight")[rows][:, cols]
    bias = w.get(module, "bias")
    if bias is not None:
        sd[name + ".bias"] = bias[rows]


def _norm(sd, name, w: _Weights, module) -> None:
    sd[name + ".weight"] = w.get(module, "weight")
    bias = w.get(module, "bias")
    if bias is not None:
        sd[name + ".bias"] = bias


def layer_tables(config: SlimConfig, x: torch.Tensor) -> tuple:
    """(cos, sin, mask) a SlimDecoderLayer takes for hidden states x [B, T, hidden] of unpadded
    windows starting at position 0 (cos/sin None for learned positions): running slim layers
    one at a time, outside a SlimModel."""
    from compress.slim.modeling_slim import SlimModel

    with torch.device("meta"):
        skeleton = SlimModel(config)  # rotary frequencies and masking only; no weights
    B, T = x.shape[:2]
    cos, sin = skeleton.rotary(torch.arange(T, device=x.device).expand(B, T), x)
    return cos, sin, skeleton._mask(torch.ones(B, T, dtype=torch.long, device=x.device), 0, T, x.device)


def final_tensors(shared: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(final norm's state dict, LM head weight) from `slim_shared_state_dict`'s tensors (a tied
    head is the embedding)."""
    norm = {k.removeprefix("model.norm."): v for k, v in shared.items() if k.startswith("model.norm.")}
    return norm, shared.get("lm_head.weight", shared["model.embed_tokens.weight"])


def build_slim_model(model, adapter: Adapter, plan: Plan, replaced=None) -> SlimForCausalLM:
    """An in-memory slim model (same dtype and device as the dense one), for parity and export."""
    return slim_model(slim_config(model, adapter, plan, replaced), slim_state_dict(model, adapter, plan, replaced))


def slim_model(config: SlimConfig, sd: dict[str, torch.Tensor]) -> SlimForCausalLM:
    """A slim model around the tensors of `sd` themselves (no copy: a 7B export holds one set)."""
    with torch.device("meta"):
        slim = SlimForCausalLM(config)
    slim.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        slim.lm_head.weight = slim.model.embed_tokens.weight
    missing = [n for n, t in list(slim.named_parameters()) + list(slim.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"slim model left without weights: {missing[:5]}")
    return slim.to(dtype=sd["model.embed_tokens.weight"].dtype).eval()
