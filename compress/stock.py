"""The stock layout: a plan that keeps the same widths in every layer, whole residual streams and
both sublayers everywhere is a smaller model of the dense model's own family. Written as that
family's config (kept widths, `head_dim` explicit, no auto_map) and its tensor names, the folder
loads with `trust_remote_code=False` in transformers, vLLM, TGI and llama.cpp's own converter.

The slim tensors are renamed to the dense model's module names through the adapter's
`LayerParts` (Phi-3's fused qkv/gate_up re-fused), so this file knows no family either.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import torch

from compress.adapters import Adapter, FusedSlice, get_adapter
from compress.errors import CompressError
from compress.plan import RESIDUAL_FIELDS, Plan
from compress.slimming import build_slim_model

__all__ = ["LAYOUTS", "stock_reason", "choose_layout", "stock_config", "stock_shared", "stock_layer",
           "stock_state_dict", "stock_mismatch", "is_stock_folder", "slim_view", "load_slim_folder",
           "write_legacy_rope"]

LAYOUTS = ("auto", "stock", "slim")
# slim module name (compress.slim) -> the LayerParts field holding that module in the dense model
_PARTS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm", "self_attn.q_proj": "q",
          "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o", "self_attn.q_norm": "q_norm",
          "self_attn.k_norm": "k_norm", "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def _widths(values: list[int], what: str) -> str | None:
    kinds = sorted(set(values))
    return None if len(kinds) == 1 else f"{what} differ across layers ({', '.join(map(str, kinds))})"


def stock_reason(model, adapter: Adapter, plan: Plan, replaced: set[str] | None) -> str | None:
    """Why the plan's slim model cannot be written as the dense family's stock model, or None.

    `replaced`: dense names of the tensors the method rewrote (they must exist in the stock model),
    or None when they are made only while writing (a streamed FLAP export)."""
    g = adapter.geometry()
    if plan.runtime:
        return "Probe Pruning's run-time plans need the slim model code"
    layers = [lp.resolved(g) for lp in plan.layers]
    for i, r in enumerate(layers):
        if any(len(getattr(r, f)) < g.hidden for f in RESIDUAL_FIELDS):
            return f"layer {i} reads or writes a subset of the residual channels"
        if not r.heads or not r.mlp_hidden:
            return f"layer {i}'s {'attention' if not r.heads else 'MLP'} is removed"
        groups = Counter(h // g.group_size for h in r.heads)
        if set(groups) != set(r.kv_heads) or len(set(groups.values())) != 1:
            return f"layer {i} keeps unequal numbers of query heads per KV head"
    why = (_widths([len(r.heads) for r in layers], "query heads") or _widths([len(r.kv_heads) for r in layers],
           "KV heads") or _widths([len(r.mlp_hidden) for r in layers], "MLP widths"))
    if why:
        return why
    if not adapter.stock_head_dim and len(layers[0].heads) != g.num_heads:
        return f"stock {model.config.model_type} takes hidden_size / heads per head, so its heads cannot be pruned"
    if replaced is None:
        return "the method rewrites tensors while the streamed export writes them"
    config = stock_config(model, adapter, plan, "float32")
    try:  # transformers' own checks of the family's config (5.x; LlamaConfig: hidden % heads)
        getattr(config, "validate", lambda: None)()
    except Exception as e:  # noqa: BLE001  huggingface_hub's strict-dataclass error, its cause the reason
        return f"stock {type(config).__name__} refuses these widths ({e.__cause__ or e})"
    names = set(_skeleton_shapes(config))
    extra = sorted(set(replaced) - names)
    return f"the method adds {extra[0]}, which stock {_architecture(model)} has no place for" if extra else None


def choose_layout(choice: str, model, adapter: Adapter, plan: Plan, replaced: set[str] | None) -> str:
    """"stock" or "slim" for `--layout` `choice`: auto takes stock where the plan allows it;
    stock where it does not is refused in one line naming why."""
    if choice not in LAYOUTS:
        raise CompressError(f"unknown layout {choice!r}; choose from {', '.join(LAYOUTS)}")
    if choice == "slim":
        return "slim"
    why = stock_reason(model, adapter, plan, replaced)
    if why and choice == "stock":
        raise CompressError(f"--layout stock: {why}; export with --layout slim (or auto)")
    return "slim" if why else "stock"


def _architecture(model) -> str:
    name = type(model).__name__
    return name if name.endswith("ForCausalLM") else (model.config.architectures or [name])[0]


def stock_config(model, adapter: Adapter, plan: Plan, dtype: str):
    """The dense config with the kept widths (uniform: `stock_reason` is None), no remote code."""
    r = plan.layers[0].resolved(adapter.geometry())
    config = copy.deepcopy(model.config)
    for key, value in adapter.stock_widths(len(r.heads), len(r.kv_heads), len(r.mlp_hidden)).items():
        setattr(config, key, value)
    config.architectures = [_architecture(model)]
    config.dtype = dtype
    for key in ("auto_map", "_name_or_path", "quantization_config"):  # the weights written are plain (not GGUF's)
        if key in config.__dict__:
            delattr(config, key)
    return config


def write_legacy_rope(folder: Path) -> None:
    """Repeat rope_parameters' theta, scaling and partial rotary factor at the top level of the
    written config.json, where transformers 4.x and other runtimes read them (5.x keeps them in
    rope_parameters only, and prefers that)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        config["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def stock_shared(model, adapter: Adapter, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`slim_shared_state_dict`'s tensors under the dense model's names."""
    names = {m: n for n, m in model.named_modules()}
    modules = {"model.embed_tokens": adapter.embed_tokens(model), "model.norm": adapter.final_norm(model),
               "model.embed_positions": adapter.embed_positions(model), "lm_head": model.get_output_embeddings()}
    out = {}
    for key, t in sd.items():
        module, _, attr = key.rpartition(".")
        out[f"{names[modules[module]]}.{attr}"] = t
    return out


def stock_layer(adapter: Adapter, layer, prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's slim tensors (`slim_layer_state_dict`) under the dense layer's names, with
    prefix `prefix`; slices of a fused linear are concatenated back in their order."""
    parts, names = adapter.parts(layer), {m: n for n, m in layer.named_modules()}
    out, fused = {}, {}
    for key, t in sd.items():
        module, _, attr = key.rpartition(".")
        if key == "self_attn.kv_map":
            continue  # stock attention shares KV head j // (heads / kv heads): what stock_reason required
        if module not in _PARTS:
            raise CompressError(f"slim tensor {key} has no place in the stock layout")
        part = getattr(parts, _PARTS[module])
        if isinstance(part, FusedSlice):
            fused.setdefault(f"{prefix}{names[part.module]}.{attr}", []).append((part.start, t))
        else:
            out[f"{prefix}{names[part]}.{attr}"] = t
    for name, pieces in fused.items():
        out[name] = torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])])
    return out


def stock_state_dict(model, adapter: Adapter, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole `slim_state_dict` under the dense model's names."""
    out = stock_shared(model, adapter, {k: v for k, v in sd.items() if not k.startswith("model.layers.")})
    names = {m: n for n, m in model.named_modules()}
    for i, layer in enumerate(adapter.layers(model)):
        pre = f"model.layers.{i}."
        out.update(stock_layer(adapter, layer, names[layer] + ".", {k[len(pre):]: v for k, v in sd.items()
                                                                   if k.startswith(pre)}))
    return out


def _skeleton_shapes(config) -> dict[str, tuple]:
    """Tensor name -> shape of the stock model a config builds (a tied head counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    keys = skeleton.state_dict().keys()
    out = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    out.update({n: tuple(b.shape) for n, b in skeleton.named_buffers() if n in keys})
    return out


def stock_mismatch(config, shapes: dict[str, torch.Tensor]) -> str | None:
    """Why tensors written (name -> tensor or meta tensor) are not exactly the stock model's, or None."""
    want, have = _skeleton_shapes(config), {k: tuple(v.shape) for k, v in shapes.items()}
    diff = sorted(want.keys() ^ have.keys()) or sorted(k for k in want if want[k] != have[k])
    return f"stock {config.architectures[0]} expects other tensors: {diff[:3]}" if diff else None


def is_stock_folder(folder: str | Path) -> bool:
    """Whether an exported folder holds the stock layout (its config names no remote code)."""
    path = Path(folder) / "config.json"
    return path.is_file() and "auto_map" not in json.loads(path.read_text())


def slim_view(model):
    """A stock model as the slim model of a keep-all plan (same tensors, same function): what the
    ONNX exporter and the benchmarks take."""
    adapter = get_adapter(model.config)
    return build_slim_model(model, adapter, Plan.keep_all(adapter.geometry()))


def load_slim_folder(folder: str | Path, dtype: torch.dtype = torch.float32):
    """An exported folder's model as a slim model, whichever its layout."""
    from compress.loading import load_folder_model

    model = load_folder_model(folder, dtype)
    return slim_view(model) if is_stock_folder(folder) else model
