"""Slim model -> ONNX with explicit per-layer KV cache inputs/outputs (its parity check: validation.parity).

The graph takes `input_ids`, `attention_mask`, `position_ids` and `past_key_values.{i}.key|value`
and returns `logits` and `present.{i}.key|value` ([batch, kv_heads_i, past + seq, head_dim]), with
dynamic batch, sequence and past axes. Head pruning leaves layers with different KV head counts,
so `onnx_config.json` beside the model lists them; a layer whose attention was removed has no
cache at all and is left out of the graph's inputs/outputs (zero-size tensors only cost
allocations and special cases in runtimes and I/O binding), which the JSON records too.

Exported with the dynamo exporter (`torch.export`), which keeps the past length symbolic; the
deprecated TorchScript exporter is faster but its `index_add` symbolic mishandles dim=-1 (the
graph fails in onnxruntime). `index_select` becomes `Gather`, on the last axis `GatherElements`;
`index_add` becomes `GatherElements` + `Add` + `ScatterElements` on the hidden axis, instead of
torchlib's transpose + `ScatterND` + transpose.
Weights always go to an external data file (`model.onnx.data`), whatever the model's size. A
Probe Pruning model has a second graph, `prefill.onnx`; the step graph then reads the weights it
shares with it from `prefill.onnx.data`, so no weight is stored twice.
"""

from __future__ import annotations

import copy
import json
import logging
import types
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from onnxscript import opset18 as op
from torch import nn

from compress.helpers import ONNX_TYPES, torch_dtype


__all__ = ["export_onnx", "kv_layers", "probe_keys", "onnx_dir_name", "CONFIG_NAME", "MODEL_NAME", "DATA_NAME",
           "PREFILL_NAME"]

CONFIG_NAME, MODEL_NAME, DATA_NAME = "onnx_config.json", "model.onnx", "model.onnx.data"
PREFILL_NAME = "prefill.onnx"  # Probe Pruning models only
DEFAULT_OPSET = 18  # torchlib's native opset: no version conversion, runs on ORT >= 1.14


def kv_layers(config) -> list[int]:
    """Layers that keep a KV cache (at least one KV head)."""
    return [i for i, h in enumerate(config.layer_kv_heads) if h]


class _FlatCache:
    """The two methods the slim model calls on a cache, over flat past tensors (no DynamicCache in
    the graph). `past=None`: a prefill graph, which has no past inputs (its past length is 0)."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None, layers: list[int]):
        self.past, self.layers, self.present = past, set(layers), {}

    def update(self, k, v, layer_idx):
        if layer_idx not in self.layers:  # attention removed: nothing cached, nothing exported
            return k, v
        if self.past is not None:
            pk, pv = self.past[layer_idx]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.present[layer_idx] = (k, v)
        return k, v

    def get_seq_length(self, layer_idx: int = 0):
        if self.past is None:
            return 0
        return self.past.get(layer_idx, next(iter(self.past.values())))[0].shape[2]


def probe_keys(slim) -> list[tuple[int, str]]:
    """The sublayers a Probe Pruning model chooses for, in the graphs' input/output order."""
    return [(i, part) for i, layer in enumerate(slim.model.layers)
            for part, module in (("attn", layer.self_attn), ("mlp", layer.mlp)) if module.probed]


def probe_tensors(slim) -> list[tuple[tuple[int, str], str, torch.Tensor]]:
    """(sublayer, field, example) of every gathered tensor a step graph takes: what `gather` returns
    for the kept count (weights and biases of the kept rows/columns, the heads' KV map)."""
    out = []
    for key in probe_keys(slim):
        module = _module(slim, key)
        example = module.gather(torch.arange(module.probe_keep, device=next(slim.parameters()).device))
        out += [(key, field, t) for field, t in example.items() if field != "index" and t is not None]
    return out


def probe_name(key: tuple[int, str], field: str | None = None) -> str:
    return f"probe.{key[0]}.{key[1]}" + (f".{field}" if field else "")


class _Exportable(nn.Module):
    """forward(input_ids, attention_mask, position_ids, [*past, *gathered]) -> (logits, *present[, ...]).

    "step": past KV tensors in (any length, 0 included), present out; a Probe Pruning model also
    takes what its prefill gathered for each probed sublayer (kept weight rows/columns, biases,
    KV map), so a decode step reads only those. "prefill" (Probe Pruning only): no past; the
    probe chooses, and after the present tensors come the chosen indices, then the gathered tensors.
    """

    def __init__(self, slim: nn.Module, mode: str = "step"):
        super().__init__()
        self.slim, self.mode = slim, mode
        self.layers = kv_layers(slim.config)
        self.probe = probe_keys(slim)
        self.tensors = [(key, field) for key, field, _ in probe_tensors(slim)]

    def forward(self, input_ids, attention_mask, position_ids, carried: list[torch.Tensor] | None = None):
        """`carried`: the past KV tensors, then the prefill's gathered tensors (step mode only)."""
        given = None
        if self.mode == "prefill":
            cache = _FlatCache(None, self.layers)
        else:
            n = 2 * len(self.layers)
            past = carried[:n]
            cache = _FlatCache({i: (past[2 * j], past[2 * j + 1]) for j, i in enumerate(self.layers)}, self.layers)
            if self.probe:
                given = {key: dict.fromkeys(_FIELDS[key[1]]) for key in self.probe}
                for (key, field), t in zip(self.tensors, carried[n:]):
                    given[key][field] = t
        self.slim.model.probe_forced = given
        try:
            out = self.slim(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=True)
        finally:
            self.slim.model.probe_forced = None
        present = tuple(t for i in self.layers for t in cache.present[i])
        if self.mode == "prefill":
            chosen = cache.probe_selection
            return (out.logits, *present, *(chosen[k]["index"] for k in self.probe),
                    *(chosen[k][f] for k, f in self.tensors))
        return (out.logits, *present)


# The fields of a gathered selection (see the slim modeling file's `gather`), by sublayer kind.
_FIELDS = {"attn": ("q_weight", "q_bias", "o_weight", "kv_map"),
           "mlp": ("gate_weight", "gate_bias", "up_weight", "up_bias", "down_weight")}


def _index_add(self, dim: int, index, source, alpha: float = 1.0):
    """aten.index_add with unique indices -> ScatterElements(self, i, GatherElements(self, i) + source).

    No scatter reduction: ORT's CPU kernel has no float16 "add" reduction, and a plain scatter
    needs no atomics on GPUs and is supported by every execution provider.
    """
    if alpha != 1:
        raise NotImplementedError("index_add with alpha != 1")
    axis = dim % len(source.shape)
    shape = [1] * len(source.shape)
    shape[axis] = -1
    idx = op.Expand(op.Reshape(index, op.Constant(value_ints=shape)), op.Shape(source))
    return op.ScatterElements(self, idx, op.Add(op.GatherElements(self, idx, axis=axis), source), axis=axis)


def _index_select(self, dim: int, index):
    """aten.index_select on the last axis -> GatherElements with the index expanded to the output's
    shape: onnxruntime's CPU Gather copies one element per call along the last axis,
    GatherElements loops over elements in one call. Other axes (whole rows) stay Gather."""
    rank = len(self.shape)
    axis = dim % rank
    if axis != rank - 1:
        return op.Gather(self, index, axis=axis)
    shape = op.Concat(op.Shape(self, end=-1), op.Shape(index), axis=0)
    return op.GatherElements(self, op.Expand(index, shape), axis=axis)


def _names(wrapper: _Exportable, mode: str = "step") -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in wrapper.layers for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in wrapper.layers for kv in ("key", "value")]
    chosen = [probe_name(k) for k in wrapper.probe]
    gathered = [probe_name(k, f) for k, f in wrapper.tensors]
    if mode == "prefill":
        return ["input_ids", "attention_mask", "position_ids"], ["logits", *present, *chosen, *gathered]
    return ["input_ids", "attention_mask", "position_ids", *past, *gathered], ["logits", *present]


GRAPHS = ("auto", "fused", "traced")


def onnx_dir_name(variant: str) -> str:
    """The folder an exported model keeps a variant's ONNX in: "float32" -> onnx, "float16" ->
    onnx-float16, "float32-int4" -> onnx-int4 (the variant is the key of report.json's "onnx")."""
    return "-".join(["onnx", *(p for p in variant.split("-") if p != "float32")])


def export_onnx(slim_model, out_dir: str | Path, dtype: str = "float32", opset: int | None = None,
                graph: str = "auto", weights: str = "float") -> Path:
    """Write `model.onnx` (+ `model.onnx.data`) and `onnx_config.json` into `out_dir`; return the model path.

    graph: "fused" (`onnx_fused`: onnxruntime's fused operators, much faster to run), "traced" (the
    dynamo exporter's graph, any model), "auto": fused where it can express the model. weights:
    "float", or "int4" (`onnx_quant`: the decoder layers' MatMuls weight-only quantized;
    fused graphs only). The caller's model is left as it was (a float16 export converts a copy).
    """
    from exporters.onnx_fused import GENAI_NAME, build_fused, genai_config, save_fused, supported
    from exporters.onnx_quant import BLOCK_SIZE, WEIGHTS, quantize_weights

    if dtype not in ONNX_TYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {', '.join(ONNX_TYPES)}")
    if graph not in GRAPHS:
        raise ValueError(f"graph {graph!r}: choose from {', '.join(GRAPHS)}")
    if weights != "float" and weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: choose from float, {', '.join(WEIGHTS)}")
    why = supported(slim_model)
    if graph == "fused" and why:
        raise ValueError(f"the fused ONNX graph cannot express this model ({why}); use the traced graph")
    if weights != "float" and (why or graph == "traced"):
        raise ValueError(f"{weights} weights need the fused ONNX graph, "
                         f"{'which cannot express this model (' + why + ')' if why else 'not the traced one'}")
    fused = graph != "traced" and why is None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, float_type = slim_model, torch_dtype(dtype)
    if next(model.parameters()).dtype != float_type:
        model = copy.deepcopy(slim_model).to(float_type)
    opset = opset or DEFAULT_OPSET
    training = model.training
    modes = ["step", "prefill"] if probe_keys(model) else ["step"]
    for mode in modes:
        wrapper = _Exportable(model, mode)
        inputs, outputs = _names(wrapper, mode)
        if fused:
            save_fused(build_fused(model, wrapper.layers, inputs, outputs, float_type), out / MODEL_NAME, DATA_NAME)
            if weights != "float":
                quantize_weights(out / MODEL_NAME, weights, DATA_NAME)
            genai = genai_config(model, inputs, outputs)
            if genai is not None:
                (out / GENAI_NAME).write_text(json.dumps(genai, indent=1) + "\n")
            continue
        args, shapes = _example_inputs(model, wrapper, mode)
        with torch.no_grad(), _quiet_exporter(), _fusable_norms(model):
            program = torch.onnx.export(
                wrapper.eval(), args, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                input_names=inputs, output_names=outputs, verbose=False,
                custom_translation_table={torch.ops.aten.index_add.default: _index_add,
                                          torch.ops.aten.index_select.default: _index_select},
            )
        program.save(out / (MODEL_NAME if mode == "step" else PREFILL_NAME), external_data=True)
    model.train(training)
    if len(modes) > 1:
        _share_weights(out / MODEL_NAME, out / PREFILL_NAME)
    config = {**_onnx_config(model, dtype, opset, out), "graph": "fused" if fused else "traced",
              "weights": weights if weights == "float" else {"type": weights, "block_size": BLOCK_SIZE,
                                                              "symmetric": False, "op": "MatMulNBits"}}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    return out / MODEL_NAME


def _external(path: Path):
    """(model proto, [(initializer, location, offset, length)]) of a graph's external initializers."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    refs = []
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            e = {x.key: x.value for x in init.external_data}
            refs.append((init, e["location"], int(e.get("offset", 0)), int(e["length"])))
    return proto, refs


def _share_weights(step: Path, prefill: Path) -> None:
    """Point the step graph's initializers at identical bytes in the prefill graph's data file and
    rewrite its own data file with the rest only: the two graphs then store each weight once."""
    import hashlib

    import onnx

    def read(folder, location, offset, length):
        with open(folder / location, "rb") as f:
            f.seek(offset)
            return f.read(length)

    folder = step.parent
    _, prefill_refs = _external(prefill)
    where = {}
    for _, location, offset, length in prefill_refs:
        where.setdefault(hashlib.sha256(read(folder, location, offset, length)).digest(), (location, offset, length))
    proto, refs = _external(step)
    own = folder / (step.name + ".data")
    kept = bytearray()
    for init, location, offset, length in refs:
        data = read(folder, location, offset, length)
        target = where.get(hashlib.sha256(data).digest())
        if target is None:  # only in the step graph: keep it in its own (compacted) file
            kept += b"\0" * (-len(kept) % 64)
            target = (own.name, len(kept), length)
            kept += data
        del init.external_data[:]
        for key, value in zip(("location", "offset", "length"), target):
            init.external_data.add(key=key, value=str(value))
    if kept:
        own.write_bytes(bytes(kept))
    else:
        own.unlink()
    onnx.save(proto, str(step))


def _example_inputs(model, wrapper: _Exportable, mode: str) -> tuple[tuple, tuple]:
    """Example (input_ids, attention_mask, position_ids[, past + probe]) and their dynamic axes.

    Sizes are distinct and above 1 (0 and 1 would be specialised); an empty past still runs.
    Probe indices have static lengths (each sublayer's kept count).
    """
    config, p = model.config, next(model.parameters())
    B, T = 2, 3
    P = 0 if mode == "prefill" else 5
    ids = torch.randint(0, config.vocab_size, (B, T), device=p.device)
    mask = torch.ones(B, P + T, dtype=torch.long, device=p.device)
    pos = torch.arange(P, P + T, device=p.device).expand(B, T)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if mode == "prefill":
        return (ids, mask, pos), ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq})
    past = [torch.zeros(B, config.layer_kv_heads[i], P, config.head_dim, dtype=p.dtype, device=p.device)
            for i in wrapper.layers for _ in range(2)]
    probe = [t for _, _, t in probe_tensors(model)]
    past_seq, total = torch.export.Dim("past_sequence", min=0), torch.export.Dim("total_sequence")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              [{0: batch, 2: past_seq} for _ in past] + [None for _ in probe])
    return (ids, mask, pos, past + probe), shapes


def _module(model, key: tuple[int, str]):
    layer = model.model.layers[key[0]]
    return layer.self_attn if key[1] == "attn" else layer.mlp


@contextmanager
def _fusable_norms(model: nn.Module):
    """RMSNorms traced as x / sqrt(mean(x^2) + eps): onnxruntime fuses that form into one
    SimplifiedLayerNormalization kernel, but not PyTorch's x * rsqrt(...), which the modeling
    file keeps because it matches transformers bit for bit (the float64 parity checks need it).
    Per instance, so a model built from a folder's own copy of the modeling file is covered."""
    def divided(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)

    norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
    try:
        for m in norms:
            m.forward = types.MethodType(divided, m)
        yield
    finally:
        for m in norms:
            m.__dict__.pop("forward", None)


@contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that say nothing about this model (torchvision ops, merged Dims)."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)", category=FutureWarning)
            yield
    finally:
        registry.setLevel(level)


def _onnx_config(model, dtype: str, opset: int, out: Path) -> dict:
    """What a runner needs to allocate the cache and name the tensors, without reading the graph."""
    wrapper = _Exportable(model)
    config, layers, probe = model.config, wrapper.layers, wrapper.probe
    inputs, outputs = _names(wrapper)
    return {
        "format": 1,
        "model": MODEL_NAME,
        "external_data": sorted(p.name for p in out.glob("*.onnx.data")),  # weight files the graphs read
        "dtype": dtype,
        "opset": opset,
        "vocab_size": config.vocab_size,
        "num_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "num_kv_heads": list(config.layer_kv_heads),  # per layer; 0 = attention removed, no cache
        "cache_layers": layers,  # layers with past/present tensors, in input/output order
        "kv_shape": ["batch", "num_kv_heads", "past_sequence", "head_dim"],
        "inputs": inputs,
        "outputs": outputs,
        "position_ids": "cumsum(attention_mask) - 1, 0 at padding",
        "sliding_window": getattr(config, "sliding_window", None),
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        # Probe Pruning: PREFILL_NAME chooses (its outputs end with these indices, then the
        # gathered tensors); MODEL_NAME takes the gathered tensors on every later step.
        "probe": {"prefill": PREFILL_NAME, "indices": [probe_name(k) for k in probe],
                  "kept": [_module(model, k).probe_keep for k in probe],
                  "gathered": [probe_name(k, f) for k, f in wrapper.tensors]} if probe else None,
    }
