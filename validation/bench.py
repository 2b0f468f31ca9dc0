"""Speed, measured side by side in one run: dense vs slim, PyTorch vs onnxruntime.

Decode is memory-bound: each new token reads every weight once plus the KV cache so far, so
the ideal decode speedup of slim over dense is the ratio of those bytes. We print it beside
the measured speedup to show how much of the possible gain the runtime delivers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from compress.slim.modeling_slim import CACHE_NAME

__all__ = ["Speed", "bytes_per_token", "torch_speed", "onnx_speed", "format_table"]


@dataclass
class Speed:
    engine: str
    model: str
    prefill_tok_s: float
    decode_tok_s: float
    bytes_per_token: int


def bytes_per_token(slim, batch: int, context: int) -> int:
    """Weight bytes (read once per step, shared by the batch) plus KV-cache bytes read per step."""
    c = slim.config
    weights = sum(p.numel() * p.element_size() for p in slim.parameters())
    elem = next(slim.parameters()).element_size()
    kv = sum(2 * n * c.head_dim * context * elem * batch for n in c.layer_kv_heads)
    return weights + kv


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def torch_speed(model, name: str, batch: int, prompt: int, new_tokens: int, repeats: int = 3) -> Speed:
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device).manual_seed(0))

    def prefill():
        return model(input_ids=ids, use_cache=True, **{CACHE_NAME: DynamicCache()})

    def decode():
        out = prefill()
        cache, tok = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=tok, use_cache=True, **{CACHE_NAME: cache})
            cache, tok = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)

    t_pre = _median_time(prefill, device, repeats)
    t_all = _median_time(decode, device, repeats)
    t_dec = max(t_all - t_pre, 1e-9)
    return Speed("pytorch", name, batch * prompt / t_pre, batch * new_tokens / t_dec,
                 bytes_per_token(model, batch, prompt + new_tokens // 2))


def onnx_speed(runner, slim, name: str, batch: int, prompt: int, new_tokens: int, repeats: int = 3) -> Speed:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, slim.config.vocab_size, (batch, prompt), dtype=np.int64)
    cpu = torch.device("cpu")
    t_pre = _median_time(lambda: runner.generate(ids, max_new_tokens=1), cpu, repeats)
    t_all = _median_time(lambda: runner.generate(ids, max_new_tokens=new_tokens + 1), cpu, repeats)
    t_dec = max(t_all - t_pre, 1e-9)
    return Speed(f"onnxruntime ({runner.provider})", name, batch * prompt / t_pre, batch * new_tokens / t_dec,
                 bytes_per_token(slim, batch, prompt + new_tokens // 2))


def format_table(rows: list[Speed]) -> str:
    """Markdown table; speedups are slim over the dense row of the same engine."""
    dense = {r.engine: r for r in rows if r.model == "dense"}
    out = ["| engine | model | prefill tok/s | decode tok/s | prefill speedup | decode speedup | ideal decode "
           "speedup (bytes) | % of ideal |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = dense.get(r.engine)
        if d is None or r is d:
            out.append(f"| {r.engine} | {r.model} | {r.prefill_tok_s:,.0f} | {r.decode_tok_s:,.1f} | 1.00x | 1.00x "
                       f"| 1.00x | - |")
            continue
        pre, dec, ideal = r.prefill_tok_s / d.prefill_tok_s, r.decode_tok_s / d.decode_tok_s, \
            d.bytes_per_token / r.bytes_per_token
        out.append(f"| {r.engine} | {r.model} | {r.prefill_tok_s:,.0f} | {r.decode_tok_s:,.1f} | {pre:.2f}x | "
                   f"{dec:.2f}x | {ideal:.2f}x | {100 * dec / ideal:.0f}% |")
    return "\n".join(out)
