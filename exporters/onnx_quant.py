"""Weight-only int4 quantization of a fused ONNX graph, and the PyTorch model it computes.

The decoder layers' MatMuls (packed QKV, o_proj, gate/up/down) become onnxruntime's MatMulNBits:
each weight column quantized in blocks of `block_size` input channels, asymmetric, with one float
scale and one zero point per block (onnxruntime's own quantizer, round to nearest). Embeddings,
norms and the LM head stay in the graph's float type. A pruned model's smaller MatMuls simply
quantize smaller: pruning and quantization compose.

What is checked is not "close to the float model" (quantization moves the logits by design) but
equivalence to an independent reference: `dequantized_reference` reads the quantized blocks back
from the graph (our own unpacking of the MatMulNBits layout, not onnxruntime's), puts the
dequantized weights into a copy of the slim PyTorch model, and the usual ONNX-vs-PyTorch parity
check runs against that copy. How much quantization costs is then measured on that copy (KL and
perplexity against the float slim model).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

__all__ = ["WEIGHTS", "quantize_weights", "dequantized_weights", "dequantized_reference", "bytes_saved"]

# --weights choices beside "float". Not int8: onnxruntime's CPU MatMulNBits kernel for 8 bits with
# float activations decodes far slower than the float graph.
WEIGHTS = {"int4": 4}
BLOCK_SIZE = 32


def quantize_weights(model_path: str | Path, weights: str, data_name: str, block_size: int = BLOCK_SIZE) -> None:
    """Rewrite `model_path` (a fused graph, weights in `data_name` beside it) with its decoder
    layers' MatMul weights quantized to `weights` ("int4")."""
    import onnx

    from exporters.onnx_fused import save_fused
    from compress.onnxruntime_import import ort  # noqa: F401  (without onnxruntime: a one-line error naming the extra)

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = Path(model_path)
    model = onnx.load(str(path))  # external data read in
    for node in model.graph.node:  # the quantizer selects nodes by name
        node.name = node.name or node.output[0]
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and not n.input[1].startswith("model.layers.")]
    quantizer = MatMulNBitsQuantizer(model, bits=WEIGHTS[weights], block_size=block_size, is_symmetric=False,
                                     nodes_to_exclude=others)
    log = logging.getLogger(MatMulNBitsQuantizer.__module__)  # a line per node it skips, at INFO
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        log.setLevel(level)
    (path.parent / data_name).unlink(missing_ok=True)
    save_fused(quantizer.model.model, path, data_name)


def _nbits_nodes(model_path: str | Path):
    """(node, its attributes, {input name: array}) for every MatMulNBits of the graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    init = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            yield node, attrs, {n: numpy_helper.to_array(init[n]) for n in node.input[1:] if n}


def dequantized_weights(model_path: str | Path) -> dict[str, torch.Tensor]:
    """{original weight name (as the fused graph named it): float32 [K, N]} for every MatMulNBits,
    unpacked from the stored blocks: B [N, blocks, block_size * bits / 8] uint8 (low bits first),
    one scale per column and block, zero points packed likewise (default 2^(bits-1))."""
    out = {}
    for node, a, arrays in _nbits_nodes(model_path):
        K, N, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
        blocks = -(-K // block)
        q = _unpack(arrays[node.input[1]].reshape(N, -1), bits)[:, :blocks * block]
        scales = arrays[node.input[2]].astype(np.float32).reshape(N, blocks)
        if len(node.input) > 3 and node.input[3]:
            zp = _unpack(arrays[node.input[3]].reshape(N, -1), bits)[:, :blocks]
        else:
            zp = np.full((N, blocks), 2 ** (bits - 1), np.float32)
        w = (q.reshape(N, blocks, block) - zp[:, :, None]) * scales[:, :, None]
        name = node.input[1].removesuffix(f"_Q{bits}")
        out[name] = torch.from_numpy(np.ascontiguousarray(w.reshape(N, blocks * block)[:, :K].T))
    return out


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> their 4-bit values, low nibble first, as float32 (the last axis doubles)."""
    if bits != 4:
        raise ValueError(f"{bits}-bit MatMulNBits weights: only 4 bits are read back")
    packed = packed.astype(np.uint8)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.float32)


def dequantized_reference(slim, model_path: str | Path) -> torch.nn.Module:
    """A copy of the slim model (float32) whose quantized linears hold the graph's dequantized
    weights: what the quantized graph computes, up to float rounding."""
    from exporters.onnx_fused import weight_groups

    ref = copy.deepcopy(slim).float().eval()
    weights = dequantized_weights(model_path)
    used = set()
    for i, layer in enumerate(ref.model.layers):
        for group, linears in weight_groups(ref.config, layer, f"model.layers.{i}").items():
            name = f"{group}.weight_t"
            if name not in weights:
                raise ValueError(f"{model_path}: {name} is not quantized; not a graph quantize_weights wrote")
            rows = torch.split(weights[name].T, [m.out_features for m in linears])
            for m, w in zip(linears, rows):
                m.weight.data = w.contiguous().to(m.weight.dtype)
            used.add(name)
    left = set(weights) - used
    if left:
        raise ValueError(f"{model_path}: quantized weights {sorted(left)[:3]} match no linear of the slim model")
    return ref


def bytes_saved(model_path: str | Path) -> int:
    """Weight bytes a decode step no longer reads: each quantized MatMul's float weight, less its
    blocks, scales and zero points (for the benchmark's bytes-ideal speedup)."""
    saved = 0
    for node, a, arrays in _nbits_nodes(model_path):
        elem = arrays[node.input[2]].itemsize  # scales are in the graph's float type
        saved += a["K"] * a["N"] * elem - sum(v.nbytes for v in arrays.values())
    return saved
