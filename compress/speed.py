"""Speed, measured side by side in one run: dense vs slim, PyTorch vs onnxruntime.

Decode is memory-bound: each new token reads every weight once (of an embedding table, only its
row) plus the KV cache so far (`bytes_per_token`), so the ideal decode speedup of slim over dense
is the ratio of those bytes. We print it beside the measured speedup to show how much of the
possible gain the runtime delivers, and the bytes actually moved per second as a share of the
machine's measured read bandwidth (the roofline: no engine can decode faster than bandwidth /
bytes per step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from compress.slim.modeling_slim import CACHE_NAME

__all__ = ["Speed", "Timer", "measure", "bytes_per_token", "gguf_bytes_per_token", "read_bandwidth", "torch_timer",
           "onnx_timer", "genai_timer", "llamacpp_timer", "format_table", "peer_engine"]

@dataclass
class Speed:
    engine: str
    model: str
    prefill_tok_s: float
    decode_tok_s: float
    bytes_per_token: int


def bytes_per_token(model, batch: int, context: int, graph: str | Path | None = None) -> int:
    """Bytes one decode step reads: each of `batch` sequences adds a token with `context` tokens cached.

    Every weight is read whole once per step (shared by the batch): the decoder layers' weights,
    norms and biases, the LM head. Embedding tables are the exception: a step reads one row per
    sequence (a table tied to the LM head is read whole as the head, and counted once). A Probe
    Pruning model skips the rows and columns its probe left out. Plus the KV cache so far.
    `graph`: an ONNX graph whose MatMulNBits read quantized weights (their packed blocks, scales and
    zero points) instead of the float ones. Works for slim models (per-layer KV heads, Probe
    Pruning) and stock transformers models alike.
    """
    c = model.config
    elem = next(model.parameters()).element_size()
    weights = _weight_bytes(model, batch) - _probe_skipped(model) * elem
    if graph is not None:
        from exporters.onnx_quant import bytes_saved

        weights -= bytes_saved(graph)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads  # OPT: no grouped KV heads
    kv_heads = getattr(c, "layer_kv_heads", None) or [heads] * c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return weights + _kv_bytes(kv_heads, head_dim, context, elem, batch)


def _kv_bytes(kv_heads: list[int], head_dim: int, context: int, elem: int, batch: int) -> int:
    """The KV cache a decode step reads: keys and values of `context` tokens in every layer."""
    return sum(2 * n * head_dim * context * elem * batch for n in kv_heads)


def gguf_bytes_per_token(path: str | Path, batch: int, context: int, kv_elem: int = 2) -> int:
    """`bytes_per_token` of a GGUF file run by llama.cpp: its tensors as stored (quantized blocks
    included), of the token embedding only `batch` rows (unless it is also the LM head: a tied
    head), and its KV cache (llama.cpp's default float16: `kv_elem` 2) per layer's KV heads."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors.pop("token_embd.weight")
    tied = "output.weight" not in tensors
    weights = sum(int(t.n_bytes) for t in tensors.values())
    weights += int(embd.n_bytes) if tied else batch * int(embd.n_bytes) // int(embd.shape[-1])  # ggml order: vocab last
    arch = reader.fields["general.architecture"].contents()
    kv_heads = reader.fields[f"{arch}.attention.head_count_kv"].contents()
    layers = reader.fields[f"{arch}.block_count"].contents()
    kv_heads = kv_heads if isinstance(kv_heads, list) else [kv_heads] * layers
    key = reader.fields.get(f"{arch}.attention.key_length")  # absent: the embedding split over the heads
    heads = reader.fields[f"{arch}.attention.head_count"].contents()
    head_dim = key.contents() if key else reader.fields[f"{arch}.embedding_length"].contents() // max(
        heads if isinstance(heads, int) else heads[0], 1)
    return weights + _kv_bytes(kv_heads, head_dim, context, kv_elem, batch)


def _weight_bytes(model, batch: int) -> int:
    """Parameter bytes a decode step reads: all, each once, except embedding tables (token and
    learned position embeddings) not tied to the LM head, of which it reads `batch` rows."""
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    seen, total = set(), 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, torch.nn.Embedding) and id(p) not in head_params:
                total += batch * p.shape[-1] * p.element_size()
            else:
                total += p.numel() * p.element_size()
    return total


def _probe_skipped(model) -> int:
    """Weights a Probe Pruning model does not read on a decode step (it reads the prefill's gathered
    rows and columns instead of q/o and gate/up/down whole); 0 for any other model."""
    skipped = 0
    for layer in getattr(getattr(model, "model", None), "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if getattr(attn, "probed", False):
            skipped += (attn.q_proj.weight.numel() + attn.o_proj.weight.numel()) * (1 - attn.probe_keep / attn.heads)
        if getattr(mlp, "probed", False):
            whole = sum(getattr(mlp, n).weight.numel() for n in ("gate_proj", "up_proj", "down_proj") if hasattr(mlp, n))
            skipped += whole * (1 - mlp.probe_keep / mlp.width)
    return int(skipped)


@torch.inference_mode()
def read_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of the fastest of a few full reads of a buffer larger than any cache (a sum)."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    return x.numel() * 4 / min(_times(lambda: x.sum(), device, repeats))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn, device, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


@dataclass
class Timer:
    """One engine running one model: `once()` returns the seconds of a prefill (a random prompt of
    batch x prompt tokens) and of the new_tokens decode steps after it."""

    engine: str
    model: str
    bytes_per_token: int
    once: Callable[[], tuple[float, float]]


# Pause before each timed run: the engine before may leave threads spinning for a while after its
# last parallel region (OpenMP's blocktime, onnxruntime's spin-wait), which on a small machine
# would slow whichever engine runs next.
SETTLE_S = 0.5


def measure(timers: list[Timer], batch: int, prompt: int, new_tokens: int, repeats: int = 3) -> list[Speed]:
    """Every timer once to warm up, then `repeats` rounds in which each runs once in turn (so a
    machine that speeds up or slows down mid-run shifts every engine alike); medians per engine."""
    with tqdm(total=(repeats + 1) * len(timers), desc="timing", unit="run", dynamic_ncols=True) as bar:
        def run(t: Timer, settle: bool) -> tuple[float, float]:
            bar.set_postfix_str(f"{t.engine}: {t.model}"[:60], refresh=False)
            if settle:
                time.sleep(SETTLE_S)
            result = t.once()
            bar.update()
            return result

        for t in timers:
            run(t, settle=False)
        runs = [[run(t, settle=True) for t in timers] for _ in range(repeats)]
    speeds = []
    for i, t in enumerate(timers):
        pre = statistics.median(r[i][0] for r in runs)
        dec = statistics.median(r[i][1] for r in runs)
        speeds.append(Speed(t.engine, t.model, batch * prompt / pre, batch * new_tokens / max(dec, 1e-9),
                            t.bytes_per_token))
    return speeds


def _prompt(model, batch: int, prompt: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt), dtype=np.int64)


def _split(first, whole, device) -> tuple[float, float]:
    """(seconds of `first`, seconds of `whole` minus those): prefill, then decode."""
    times = []
    for fn in (first, whole):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times[0], max(times[1] - times[0], 1e-9)


def torch_timer(model, name: str, batch: int, prompt: int, new_tokens: int) -> Timer:
    device = next(model.parameters()).device
    ids = torch.from_numpy(_prompt(model, batch, prompt)).to(device)

    @torch.inference_mode()
    def prefill():
        return model(input_ids=ids, use_cache=True, **{CACHE_NAME: DynamicCache()})

    @torch.inference_mode()
    def decode():
        out = prefill()
        cache, tok = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(input_ids=tok, use_cache=True, **{CACHE_NAME: cache})
            cache, tok = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)

    return Timer("pytorch", name, bytes_per_token(model, batch, prompt + new_tokens // 2),
                 lambda: _split(prefill, decode, device))


def onnx_timer(runner, slim, name: str, batch: int, prompt: int, new_tokens: int, graph: Path | None = None) -> Timer:
    """`graph`: the runner's ONNX file where its weights are quantized (its bytes are then counted)."""
    ids, cpu = _prompt(slim, batch, prompt), torch.device("cpu")
    weights = runner.config.get("weights", "float")
    quantized = "" if weights == "float" else f", {weights['type']} weights"
    return Timer(f"onnxruntime ({runner.provider}, {runner.config.get('graph', 'traced')} graph{quantized})", name,
                 bytes_per_token(slim, batch, prompt + new_tokens // 2, graph),
                 lambda: _split(lambda: runner.generate(ids, max_new_tokens=1),
                                lambda: runner.generate(ids, max_new_tokens=new_tokens + 1), cpu))


def genai_timer(folder, model, engine: str, name: str, batch: int, prompt: int, new_tokens: int,
                graph: Path | None = None) -> Timer:
    """An onnxruntime-genai model folder (the peer's model-builder graph of the dense model, or one of
    our fused graphs with its genai_config.json): prefill = appending the prompt, decode =
    `new_tokens` calls of generate_next_token. `graph`: its ONNX file where its weights are quantized."""
    import onnxruntime_genai as og

    genai = og.Model(str(folder))
    ids = _prompt(model, batch, prompt).astype(np.int32)

    def once():
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=prompt + new_tokens + 1, do_sample=False, batch_size=batch)
        generator = og.Generator(genai, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            generator.generate_next_token()
        return t1 - t0, time.perf_counter() - t1

    return Timer(engine, name, bytes_per_token(model, batch, prompt + new_tokens // 2, graph), once)


def llamacpp_timer(path: str | Path, name: str, engine: str, batch: int, prompt: int, new_tokens: int,
                   threads: int):
    """compress.speed's Timer of a GGUF in llama.cpp at `threads` threads (batch 1): prefill = the
    prompt in one batch, decode = `new_tokens` steps of one token each, fed fixed tokens (no
    sampling: only the model's work is timed); llama.cpp's default float16 KV cache, as a user
    would run it. Its bytes: compress.speed.gguf_bytes_per_token of the file."""
    from compress.llamacpp_import import llama_cpp

    if batch != 1:
        raise ValueError("llama.cpp is timed at batch 1")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt + new_tokens + 1, n_batch=prompt, n_ubatch=prompt,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = np.random.default_rng(0).integers(0, llm.n_vocab(), prompt).tolist()

    def once() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for i in range(new_tokens):
            llm.eval([ids[i % prompt]])
        return t1 - t0, time.perf_counter() - t1

    return Timer(engine, name, gguf_bytes_per_token(path, batch, prompt + new_tokens // 2), once)


def peer_engine(precision: str = "fp32") -> str:
    """The table's engine name of the peer built at `precision` (the model builder's: fp32, int4)."""
    return "onnxruntime-genai (peer)" if precision == "fp32" else f"onnxruntime-genai (peer, {precision})"


def format_table(rows: list[Speed], bandwidth: float, batch: int) -> str:
    """Markdown table; speedups are over the dense row of the same engine; roofline = bytes moved
    per second in decode as a share of `bandwidth` (bytes/s). With a peer row, a last column puts
    each decode speed over the peer's dense decode (int4 rows over the int4 peer where there is one)."""
    dense = {r.engine: r for r in rows if r.model == "dense"}
    peers = {p: dense[peer_engine(p)] for p in ("fp32", "int4") if peer_engine(p) in dense}
    out = ["| engine | model | prefill tok/s | decode tok/s | prefill speedup | decode speedup | ideal decode "
           "speedup (bytes) | % of ideal | % of roofline |", "|---|---|---|---|---|---|---|---|---|"]
    if peers:
        out = [out[0] + " decode vs peer |", out[1] + "---|"]
    for r in rows:
        roof = f"{100 * r.bytes_per_token * r.decode_tok_s / batch / bandwidth:.0f}%"
        d = dense.get(r.engine)
        if d is None or r is d:
            line = (f"| {r.engine} | {r.model} | {r.prefill_tok_s:,.0f} | {r.decode_tok_s:,.1f} | 1.00x | 1.00x "
                    f"| 1.00x | - | {roof} |")
        else:
            pre, dec, ideal = r.prefill_tok_s / d.prefill_tok_s, r.decode_tok_s / d.decode_tok_s, \
                d.bytes_per_token / r.bytes_per_token
            line = (f"| {r.engine} | {r.model} | {r.prefill_tok_s:,.0f} | {r.decode_tok_s:,.1f} | {pre:.2f}x | "
                    f"{dec:.2f}x | {ideal:.2f}x | {100 * dec / ideal:.0f}% | {roof} |")
        if peers:
            peer = peers.get("int4" if "int4" in r.engine else "fp32", peers.get("fp32"))
            line += f" {r.decode_tok_s / peer.decode_tok_s:.2f}x |" if peer else " - |"
        out.append(line)
    return "\n".join(out)
