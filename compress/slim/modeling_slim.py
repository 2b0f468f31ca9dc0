"""A slim decoder-only LM: each layer reads and writes its own subset of the residual stream.

Copied into every exported folder and loaded through `auto_map`, so it imports only torch and
the public `transformers` API. Per layer (DISP, arXiv 2410.11988):

    a = norm_1(x)[..., attn_in]          # full-width norm, then index-select
    x = x.index_add(-1, attn_out, attn(a))
    b = norm_2(x)[..., mlp_in]
    x = x.index_add(-1, mlp_out, mlp(b))

Index tensors are buffers stored beside the weights; a full-width selection has no buffer and
costs nothing. Layers may keep different numbers of query/KV heads (the KV cache follows) or
none at all (the sublayer is skipped; a bias left by bias compensation is still added).
Probe Pruning's per-batch choice of heads and channels is in probing_slim.py beside this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_slim import SlimConfig
from .probing_slim import head_rows, probe_buffers, probe_run

# transformers 5.24 renamed the KV cache argument and output field `past_key_values` -> `cache`;
# earlier releases (4.57 included) know only the old name. Both are accepted; outputs use the
# name of the installed release, so generate() finds the cache where it looks for it.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# What generate() of some releases passes and this model does not need (4.57 always sends
# `cache_position`; positions here come from the attention mask and the cache's length).
IGNORED_ARGUMENTS = frozenset({"cache_position"})

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: SlimConfig, dim: int) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin, rope_dim: int):
    # x: [B, H, T, D]; cos/sin: [B, 1, T, rope_dim]
    if rope_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids: the number of real tokens before each token, 0 at padding. A copy of
    `compress.helpers.positions` (this folder imports nothing of compress), held equal by a test."""
    return (mask.cumsum(-1) - 1) * (mask != 0)


def index_buffer(module: nn.Module, name: str, width: int, full: int) -> None:
    """Register an int64 index buffer when a sublayer uses only part of the residual stream."""
    if width < full:
        module.register_buffer(name, torch.arange(width, dtype=torch.long))
    else:
        setattr(module, name, None)


class SlimAttention(nn.Module):
    def __init__(self, config: SlimConfig, i: int):
        super().__init__()
        self.heads, self.kv_heads = config.layer_heads[i], config.layer_kv_heads[i]
        self.head_dim, self.rope_dim = config.head_dim, config.rope_dim
        self.window = config.attention_window
        d_in, d_out, hd = config.layer_attn_in[i], config.layer_attn_out[i], config.head_dim
        has_o_bias = config.layer_o_bias[i]
        if self.heads:
            self.q_proj = nn.Linear(d_in, self.heads * hd, bias=config.qkv_bias)
            self.k_proj = nn.Linear(d_in, self.kv_heads * hd, bias=config.qkv_bias)
            self.v_proj = nn.Linear(d_in, self.kv_heads * hd, bias=config.qkv_bias)
            self.o_proj = nn.Linear(self.heads * hd, d_out, bias=has_o_bias)
            # kv_map[h]: which kept KV head query head h reads (any GQA grouping).
            self.register_buffer("kv_map", torch.zeros(self.heads, dtype=torch.long))
            if config.qk_norm:
                self.q_norm = RMSNorm(hd, config.norm_eps)
                self.k_norm = RMSNorm(hd, config.norm_eps)
        elif has_o_bias:
            self.out_bias = nn.Parameter(torch.zeros(d_out))
        self.qk_norm = config.qk_norm
        self.probe_keep = config.layer_probe_heads[i]
        self.probed = probe_buffers(self, config, self.probe_keep, self.heads, self.heads * hd)

    def forward(self, x, cos, sin, mask, cache, layer_idx, sel=None):
        if not self.heads:
            if cache is not None:  # keep the cache's length bookkeeping uniform across layers
                empty = x.new_zeros(x.shape[0], 0, x.shape[1], self.head_dim)
                cache.update(empty, empty, layer_idx)
            return getattr(self, "out_bias", None)
        if sel is None:
            out = self.context(x, cos, sin, mask, cache, layer_idx, self.q_proj.weight, self.q_proj.bias,
                               self.kv_map if self.kv_heads != self.heads else None)
            return self.o_proj(out)
        out = self.context(x, cos, sin, mask, cache, layer_idx, sel["q_weight"], sel["q_bias"], sel["kv_map"])
        return F.linear(out, sel["o_weight"], self.o_proj.bias)

    def context(self, x, cos, sin, mask, cache, layer_idx, q_weight, q_bias, kv_map):
        """Attention up to the `o_proj` input ([B, T, heads * head_dim]) for the given query rows."""
        B, T, _ = x.shape
        hd = self.head_dim
        heads = q_weight.shape[0] // hd
        q = F.linear(x, q_weight, q_bias).view(B, T, heads, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, hd).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, hd]
        if cos is not None:
            q, k = apply_rope(q, cos, sin, self.rope_dim), apply_rope(k, cos, sin, self.rope_dim)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        if kv_map is not None:
            k, v = k.index_select(1, kv_map), v.index_select(1, kv_map)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, T, heads * hd)

    def gather(self, heads: torch.Tensor) -> dict:
        """The weights of the kept query heads (sorted indices into this layer's heads)."""
        rows = head_rows(heads, self.head_dim)
        bias = self.q_proj.bias
        return {"index": heads, "q_weight": self.q_proj.weight.index_select(0, rows),
                "q_bias": None if bias is None else bias.index_select(0, rows),
                "o_weight": self.o_proj.weight.index_select(1, rows), "kv_map": self.kv_map.index_select(0, heads)}

    @property
    def probe_groups(self) -> int:
        """Groups the kept heads are spread evenly over: the KV groups (contiguous), or one group
        when each query head has its own KV head (then k/v of a skipped head are still cached)."""
        return 1 if self.kv_heads == self.heads else self.kv_heads

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Top heads by their channels' scores, the same number in every group."""
        groups = self.probe_groups
        per_head = scores.view(self.heads, self.head_dim).pow(2).sum(-1).view(groups, -1)
        top = per_head.topk(self.probe_keep // groups, dim=1).indices.sort(dim=1).values
        return (top + torch.arange(groups, device=top.device)[:, None] * per_head.shape[1]).reshape(-1)


class SlimMLP(nn.Module):
    def __init__(self, config: SlimConfig, i: int):
        super().__init__()
        d_in, d_out, m = config.layer_mlp_in[i], config.layer_mlp_out[i], config.layer_intermediate[i]
        self.width, self.gated = m, config.gated_mlp
        self.act = ACTIVATIONS[config.hidden_act]
        if m:
            if self.gated:
                self.gate_proj = nn.Linear(d_in, m, bias=config.mlp_bias)
            self.up_proj = nn.Linear(d_in, m, bias=config.mlp_bias)
            self.down_proj = nn.Linear(m, d_out, bias=config.layer_down_bias[i])
        elif config.layer_down_bias[i]:
            self.out_bias = nn.Parameter(torch.zeros(d_out))
        self.probe_keep = config.layer_probe_intermediate[i]
        self.probed = probe_buffers(self, config, self.probe_keep, m, m)

    def forward(self, x, sel=None):
        if not self.width:
            return getattr(self, "out_bias", None)
        if sel is None:
            return self.down_proj(self.hidden(x))
        return F.linear(self.hidden(x, sel), sel["down_weight"], self.down_proj.bias)

    def hidden(self, x, sel=None):
        """The `down_proj` input, over all channels or the selected ones."""
        if sel is None:
            up = self.up_proj(x)
            return self.act(self.gate_proj(x)) * up if self.gated else self.act(up)
        up = F.linear(x, sel["up_weight"], sel["up_bias"])
        return self.act(F.linear(x, sel["gate_weight"], sel["gate_bias"])) * up if self.gated else self.act(up)

    def gather(self, channels: torch.Tensor) -> dict:
        """The weights of the kept channels (sorted indices into this layer's channels)."""
        sel = {"index": channels, "down_weight": self.down_proj.weight.index_select(1, channels)}
        for name in ("gate", "up"):
            proj = getattr(self, name + "_proj", None)
            sel[name + "_weight"] = None if proj is None else proj.weight.index_select(0, channels)
            sel[name + "_bias"] = None if proj is None or proj.bias is None else proj.bias.index_select(0, channels)
        return sel

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.topk(self.probe_keep).indices.sort().values


class SlimDecoderLayer(nn.Module):
    def __init__(self, config: SlimConfig, i: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = i
        self.input_layernorm = make_norm(config, d)
        self.post_attention_layernorm = make_norm(config, d)
        self.self_attn = SlimAttention(config, i)
        self.mlp = SlimMLP(config, i)
        index_buffer(self, "attn_in_index", config.layer_attn_in[i], d)
        index_buffer(self, "attn_out_index", config.layer_attn_out[i], d)
        index_buffer(self, "mlp_in_index", config.layer_mlp_in[i], d)
        index_buffer(self, "mlp_out_index", config.layer_mlp_out[i], d)

    @staticmethod
    def _read(x, index):
        return x if index is None else x.index_select(-1, index)

    @staticmethod
    def _write(x, index, y):
        if y is None:
            return x
        if index is None:
            return x + y
        return x.index_add(-1, index, y.to(x.dtype).expand(*x.shape[:-1], y.shape[-1]))

    def forward(self, x, cos, sin, mask, cache, probe=None):
        a = self._read(self.input_layernorm(x), self.attn_in_index)
        sel = probe.attention(self, x, a, cos, sin) if probe is not None and self.self_attn.probed else None
        x = self._write(x, self.attn_out_index, self.self_attn(a, cos, sin, mask, cache, self.layer_idx, sel))
        b = self._read(self.post_attention_layernorm(x), self.mlp_in_index)
        sel = probe.mlp(self, x, b) if probe is not None and self.mlp.probed else None
        return self._write(x, self.mlp_out_index, self.mlp(b, sel))


class SlimPreTrainedModel(PreTrainedModel):
    config_class = SlimConfig
    base_model_prefix = "model"
    _no_split_modules = ["SlimDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()


class SlimModel(SlimPreTrainedModel):
    def __init__(self, config: SlimConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(
                config.max_position_embeddings + config.position_offset, config.hidden_size
            )
        # A plain attribute, not a buffer: `.to(float16)` must not round the frequencies.
        self.rope_inv_freq = torch.tensor(config.rope_inv_freq, dtype=torch.float32, device="cpu")
        # A layer without attention caches empty tensors, whose length reads as 0: ask one with KV heads.
        self.cache_layer = next((i for i, h in enumerate(config.layer_kv_heads) if h), None)
        self.layers = nn.ModuleList(SlimDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.probing = any(layer.self_attn.probed or layer.mlp.probed for layer in self.layers)
        # {(layer, "attn" | "mlp"): sorted kept indices, or their `gather` result}: overrides the
        # probe (parity checks and the ONNX step graph use it).
        self.probe_forced: dict | None = None
        self.post_init()

    def _mask(self, attention_mask, past, T, device):
        """Boolean [B, 1, T, past+T] mask: causal by cache slot, padding, optional sliding window."""
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = k_pos <= q_pos
        if self.config.attention_window:
            allowed = allowed & (k_pos > q_pos - self.config.attention_window)
        allowed = allowed[None] & attention_mask[:, None, :S].bool()
        # Rows with nothing to attend to (queries at padding) would give NaN: let them see all.
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed[:, None]

    def rotary(self, position_ids, x):
        """(cos, sin) [B, 1, T, head_dim] in x's dtype, or (None, None) for learned positions."""
        if self.config.positions == "learned":
            return None, None
        freqs = position_ids[:, None, :, None].float() * self.rope_inv_freq.to(x.device)  # [B, 1, T, rope/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.config.rope_attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is None:
            past = 0
        elif self.cache_layer is not None:
            past = cache.get_seq_length(self.cache_layer)
        else:  # no attention anywhere: only the mask knows how many tokens came before
            past = attention_mask.shape[1] - T if attention_mask is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if position_ids is None:
            position_ids = positions(attention_mask.long())[:, past:]
        mask = self._mask(attention_mask, past, T, x.device)

        if self.config.positions == "learned":
            x = x + self.embed_positions(position_ids + self.config.position_offset)
        cos, sin = self.rotary(position_ids, x)

        probe = probe_run(self, cache, past, attention_mask[:, past:], position_ids) if self.probing else None
        hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            x = layer(x, cos, sin, mask, cache, probe)
        if probe is not None and cache is not None:
            cache.probe_selection = probe.selection  # the request's decode steps reuse it
        x = self.norm(x)
        return x, cache, (*hidden_states, x) if output_hidden_states else None


class SlimForCausalLM(SlimPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SlimConfig):
        super().__init__(config)
        self.model = SlimModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, output_hidden_states=None,
                output_attentions=None, return_dict=None, past_key_values: Cache | None = None, **kwargs):
        """Causal LM forward. `cache` and `past_key_values` are the same argument under its new and old name.

        Other keyword arguments are refused, except the few in IGNORED_ARGUMENTS. Attention weights
        are never materialised (SDPA), so `output_attentions` is refused rather than answered with nothing.
        """
        unknown = sorted(set(kwargs) - IGNORED_ARGUMENTS)
        if unknown:
            raise TypeError(f"SlimForCausalLM.forward() got unexpected keyword arguments {unknown}")
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
        if output_attentions:
            raise ValueError("output_attentions is not supported by the slim model (it runs SDPA attention)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden, cache, all_hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:  # a tensor of positions, as generate() may pass
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=all_hidden, **{CACHE_NAME: cache})
        return out.to_tuple() if return_dict is False else out
