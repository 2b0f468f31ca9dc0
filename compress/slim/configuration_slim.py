"""Configuration of a slim (structurally pruned) decoder; copied into every exported folder.

Family differences are switches (norm, activation, positions, biases, q/k norms); per-layer
widths are lists. Only the public `transformers` API is imported so exports keep loading.
"""

from transformers import PretrainedConfig


class SlimConfig(PretrainedConfig):
    model_type = "compress_slim"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=256,
        num_hidden_layers=1,
        head_dim=32,
        norm="rms",
        norm_eps=1e-6,
        hidden_act="silu",
        gated_mlp=True,
        qkv_bias=False,
        mlp_bias=False,
        qk_norm=False,
        positions="rope",
        position_offset=0,
        rope_inv_freq=None,
        rope_attention_scaling=1.0,
        attention_window=None,
        max_position_embeddings=2048,
        layer_heads=None,
        layer_kv_heads=None,
        layer_intermediate=None,
        layer_attn_in=None,
        layer_attn_out=None,
        layer_mlp_in=None,
        layer_mlp_out=None,
        layer_o_bias=None,
        layer_down_bias=None,
        tie_word_embeddings=False,
        use_cache=True,
        probe=None,
        layer_probe_heads=None,
        layer_probe_intermediate=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim
        self.norm = norm
        self.norm_eps = norm_eps
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.positions = positions
        self.position_offset = position_offset
        # Exact float32 frequencies of the dense model (any rope scaling type), kept out of
        # the weights so a float16 export does not round them.
        self.rope_inv_freq = list(rope_inv_freq or [])
        self.rope_dim = 2 * len(self.rope_inv_freq)
        self.rope_attention_scaling = rope_attention_scaling
        # Not named `sliding_window`: transformers would then build a cache that drops old
        # tokens, while this model masks them itself over a full cache.
        self.attention_window = attention_window
        self.max_position_embeddings = max_position_embeddings
        self.use_cache = use_cache
        n = num_hidden_layers
        self.layer_heads = list(layer_heads or [1] * n)
        self.layer_kv_heads = list(layer_kv_heads or [1] * n)
        self.layer_intermediate = list(layer_intermediate or [4 * hidden_size] * n)
        self.layer_attn_in = list(layer_attn_in or [hidden_size] * n)
        self.layer_attn_out = list(layer_attn_out or [hidden_size] * n)
        self.layer_mlp_in = list(layer_mlp_in or [hidden_size] * n)
        self.layer_mlp_out = list(layer_mlp_out or [hidden_size] * n)
        self.layer_o_bias = list(layer_o_bias or [False] * n)
        self.layer_down_bias = list(layer_down_bias or [False] * n)
        # Probe Pruning at run time (None: a static model). `probe` holds the share of token
        # positions and of samples the probe takes, the history length (calibration positions)
        # and the EMA momentum of history updates (None: the history stays as calibrated). The
        # lists give each layer's query heads and MLP channels kept per batch; a layer whose
        # counts equal its static width is never probed.
        self.probe = dict(probe) if probe else None
        self.layer_probe_heads = list(layer_probe_heads or self.layer_heads)
        self.layer_probe_intermediate = list(layer_probe_intermediate or self.layer_intermediate)
        # Generation utilities look these up; heads differ per layer, so report the maximum.
        self.num_attention_heads = max([1, *self.layer_heads])
        self.num_key_value_heads = max([1, *self.layer_kv_heads])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
