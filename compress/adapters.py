"""Model-family adapters: the one place that knows where each family keeps its weights.

Methods, the slimmer and the exporters only see `Geometry` and `LayerParts`; adding a family
means adding one adapter here plus its tiny test config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compress.errors import UnsupportedModelError

__all__ = ["Geometry", "LayerParts", "FusedSlice", "Adapter", "get_adapter", "adapter_class", "SUPPORTED_FAMILIES"]


@dataclass(frozen=True)
class Geometry:
    """Shapes of a dense decoder, enough to count parameters and validate a plan."""

    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    gated: bool  # gate/up/down (SwiGLU) rather than fc1/fc2

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class FusedSlice:
    """Output rows [start, stop) of a fused linear (Phi-3's qkv_proj, gate_up_proj), read like an
    nn.Linear. Only the weights are read through it: no hook is ever placed on q/k/v/gate/up."""

    module: nn.Linear
    start: int
    stop: int

    @property
    def weight(self):
        return self.module.weight[self.start:self.stop]

    @property
    def bias(self):
        b = self.module.bias
        return None if b is None else b[self.start:self.stop]

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start


@dataclass
class LayerParts:
    """The modules of one decoder layer; `gate`, `q_norm`, `k_norm` may be None. q/k/v/gate/up may
    be `FusedSlice`s; the norms, `o` and `down` are always real modules (masks hook onto them)."""

    attn_norm: nn.Module
    q: nn.Linear | FusedSlice
    k: nn.Linear | FusedSlice
    v: nn.Linear | FusedSlice
    o: nn.Linear
    mlp_norm: nn.Module
    up: nn.Linear | FusedSlice
    down: nn.Linear
    gate: nn.Linear | FusedSlice | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


class Adapter:
    """Llama layout; the other families override what differs."""

    model_types: tuple[str, ...] = ("llama",)
    norm = "rms"
    qk_norm = False
    stock_head_dim = True  # the stock config takes head_dim, so query heads can be pruned (compress.stock)

    def __init__(self, config):
        self.config = config
        self.check_config(config)

    # --- configuration -------------------------------------------------------------------
    def check_config(self, config) -> None:
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type in ("dynamic", "longrope"):
            raise UnsupportedModelError(f"rope type {rope_type!r} depends on sequence length; not supported")

    def geometry(self) -> Geometry:
        c = self.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        return Geometry(c.hidden_size, c.num_hidden_layers, heads, kv, head_dim, c.intermediate_size, gated=True)

    def sliding_window(self) -> int | None:
        return None

    def slim_settings(self) -> dict:
        """Switches of the slim decoder that describe this family."""
        c = self.config
        return {
            "norm": self.norm,
            "norm_eps": float(getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_eps", 1e-5)),
            "hidden_act": c.hidden_act,
            "gated_mlp": True,
            "qk_norm": self.qk_norm,
            "positions": "rope",
            "position_offset": 0,
            "attention_window": self.sliding_window(),
            "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        }

    def stock_widths(self, heads: int, kv_heads: int, intermediate: int) -> dict:
        """The stock config's keys for uniform kept widths (compress.stock)."""
        return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
                "head_dim": self.geometry().head_dim}

    # --- modules -------------------------------------------------------------------------
    def decoder(self, model) -> nn.Module:
        return model.model

    def layers(self, model) -> list[nn.Module]:
        return list(self.decoder(model).layers)

    def parts(self, layer) -> LayerParts:
        a, m = layer.self_attn, layer.mlp
        return LayerParts(
            attn_norm=layer.input_layernorm, q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj,
            mlp_norm=layer.post_attention_layernorm, gate=m.gate_proj, up=m.up_proj, down=m.down_proj,
            q_norm=getattr(a, "q_norm", None), k_norm=getattr(a, "k_norm", None),
        )

    def embed_tokens(self, model) -> nn.Embedding:
        return self.decoder(model).embed_tokens

    def embed_positions(self, model) -> nn.Embedding | None:
        return None

    def final_norm(self, model) -> nn.Module:
        return self.decoder(model).norm

    def rotary_module(self, model) -> nn.Module | None:
        """The module computing (cos, sin) for the layers, or None for learned positions."""
        return self.decoder(model).rotary_emb

    def rotary(self, model):
        """(inv_freq, attention_scaling) as the dense model computes them, whatever the rope type."""
        rot = self.rotary_module(model)
        return rot.inv_freq.detach().float().clone(), float(getattr(rot, "attention_scaling", 1.0))


class MistralAdapter(Adapter):
    model_types = ("mistral",)

    def sliding_window(self) -> int | None:
        return getattr(self.config, "sliding_window", None)


class Qwen2Adapter(Adapter):
    """Qwen2: q/k/v biases (found on the modules), no sliding window."""

    model_types = ("qwen2",)

    def check_config(self, config) -> None:
        super().check_config(config)
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError("Qwen sliding-window attention on a subset of layers is not supported")


class Qwen3Adapter(Qwen2Adapter):
    """Qwen3: per-head RMSNorm on q and k, optional attention bias."""

    model_types = ("qwen3",)
    qk_norm = True


class OPTAdapter(Adapter):
    """OPT: LayerNorm, learned positions (offset 2), ReLU fc1/fc2, biases everywhere."""

    model_types = ("opt",)
    norm = "layer"
    stock_head_dim = False  # OPTAttention takes hidden_size // heads per head

    def check_config(self, config) -> None:
        if not config.do_layer_norm_before:
            raise UnsupportedModelError("OPT with post-layer-norm (do_layer_norm_before=False, e.g. opt-350m) is not supported")
        if config.word_embed_proj_dim != config.hidden_size:
            raise UnsupportedModelError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
        if not config.enable_bias or not config.layer_norm_elementwise_affine:
            raise UnsupportedModelError("OPT without biases or affine layer norms is not supported")

    def geometry(self) -> Geometry:
        c = self.config
        h = c.num_attention_heads
        return Geometry(c.hidden_size, c.num_hidden_layers, h, h, c.hidden_size // h, c.ffn_dim, gated=False)

    def slim_settings(self) -> dict:
        c = self.config
        return {
            "norm": "layer", "norm_eps": 1e-5, "hidden_act": c.activation_function, "gated_mlp": False,
            "qk_norm": False, "positions": "learned", "position_offset": 2,
            "attention_window": None, "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": bool(c.tie_word_embeddings),
        }

    def stock_widths(self, heads: int, kv_heads: int, intermediate: int) -> dict:
        return {"ffn_dim": intermediate}

    def parts(self, layer) -> LayerParts:
        a = layer.self_attn
        return LayerParts(
            attn_norm=layer.self_attn_layer_norm, q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.out_proj,
            mlp_norm=layer.final_layer_norm, up=layer.fc1, down=layer.fc2,
        )

    def decoder(self, model) -> nn.Module:
        return model.model.decoder

    def embed_positions(self, model) -> nn.Embedding:
        return self.decoder(model).embed_positions

    def final_norm(self, model) -> nn.Module:
        norm = self.decoder(model).final_layer_norm
        if norm is None:
            raise UnsupportedModelError("OPT without a final layer norm is not supported")
        return norm

    def rotary_module(self, model) -> None:
        return None

    def rotary(self, model):
        return None, 1.0


class Phi3Adapter(MistralAdapter):
    """Phi-3: Llama layout with fused qkv_proj (q | k | v rows) and gate_up_proj (gate | up rows),
    optional sliding window, partial rotary (the slim model rotates the first dims only)."""

    model_types = ("phi3",)

    def parts(self, layer) -> LayerParts:
        a, m, g = layer.self_attn, layer.mlp, self.geometry()
        q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        return LayerParts(
            attn_norm=layer.input_layernorm, q=FusedSlice(a.qkv_proj, 0, q), k=FusedSlice(a.qkv_proj, q, q + kv),
            v=FusedSlice(a.qkv_proj, q + kv, q + 2 * kv), o=a.o_proj, mlp_norm=layer.post_attention_layernorm,
            gate=FusedSlice(m.gate_up_proj, 0, g.intermediate),
            up=FusedSlice(m.gate_up_proj, g.intermediate, 2 * g.intermediate), down=m.down_proj,
        )


_ADAPTERS = (Adapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, OPTAdapter, Phi3Adapter)
SUPPORTED_FAMILIES = {t: cls for cls in _ADAPTERS for t in cls.model_types}


def adapter_class(model_type: str | None, where: str = "") -> type[Adapter]:
    """The adapter class of a model type; a one-line error naming the supported families otherwise
    (`where`: the file that declared the type, to name it in the error)."""
    cls = SUPPORTED_FAMILIES.get(model_type)
    if cls is None:
        raise UnsupportedModelError(f"{where + ': ' if where else ''}unsupported architecture {model_type!r}; "
                                    f"supported: {', '.join(sorted(SUPPORTED_FAMILIES))}")
    return cls


def get_adapter(config) -> Adapter:
    """The adapter for a transformers config; a clear error naming the supported families otherwise."""
    return adapter_class(getattr(config, "model_type", None))(config)
