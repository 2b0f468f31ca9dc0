"""Prefill and decode speed, measured side by side in one run: the stock transformers model, our
dense (keep-all slim) and slim models in PyTorch, their ONNX graphs in onnxruntime, and a peer
(the dense model built and run by onnxruntime-genai, when installed: the [peer] extra). With
onnxruntime-genai installed, our fused graphs whose cache it can hold (every layer with the same
KV head count) are also run by it, so graph and runtime can be told apart.

Slim models come from exported folders (--slim; their report.json then records the figures,
which `compress push` puts on the model card), are pruned on the fly (--ratio with --method),
or are drawn at random in one or more methods' shapes (--ratio with --random-plan: uniform,
adaptive, disp, disp-heads; several side by side), which is what a random-weight --shape model
wants (speed does not depend on the values). --shape llama2-7b builds a model of LLaMA-2-7B
shape (also llama3.2-1b, llama3-8b); --layers shortens it to fit smaller machines. Beside each
measured decode speedup: the ideal one (from the bytes a decode step reads: every weight, one
embedding row per sequence, the KV cache; quantized weights as stored), the share of the
machine's measured read bandwidth that decode achieves (the roofline) and, with the peer, the
decode speed over the peer's. --llamacpp TYPE adds llama.cpp rows: every model as a GGUF of that
type (the dense one too, so both sides run the same architecture, writer and quantizer), its ideal
speedup from the bytes of the files. Every engine runs at torch's thread count (--threads).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from compress.commands.gguf import TYPES as GGUF_TYPES
from compress.helpers import DTYPES
from compress.threads import add_threads_argument

SHAPES = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}


def configure(p: argparse.ArgumentParser) -> None:
    from compress.random_plan import PLAN_SHAPES

    p.add_argument("--model", default=None, help="dense model: folder, Hub id or GGUF file (default: the shipped reference model)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-weight model of this shape instead")
    p.add_argument("--layers", type=int, default=None, help="with --shape: number of layers")
    p.add_argument("--slim", type=Path, nargs="*", default=[], help="exported slim folders to compare")
    p.add_argument("--ratio", type=float, nargs="*", default=[], help="prune on the fly at these ratios")
    p.add_argument("--method", default="magnitude", help="method for --ratio")
    p.add_argument("--random-plan", nargs="+", default=[], choices=list(PLAN_SHAPES),
                   help="with --ratio: draw plans of these shapes at random instead of running --method, one "
                        "row each: " + "; ".join(f"{k}: {v}" for k, v in PLAN_SHAPES.items()))
    add_threads_argument(p)
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds, each running every engine once in turn (medians; after one warm-up round)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="PyTorch only")
    p.add_argument("--no-pytorch", dest="pytorch", action="store_false",
                   help="no PyTorch rows (e.g. only --llamacpp's: PyTorch at several threads on a busy machine is slow)")
    p.add_argument("--onnx-graph", nargs="+", default=["auto"], choices=["auto", "fused", "traced"],
                   help="ONNX graphs to time, each a row per model: fused (onnxruntime's fused operators, KV "
                        "buffers appended in place), traced (the dynamo exporter's graph), auto (fused where "
                        "it can express the model)")
    p.add_argument("--onnx-weights", nargs="+", default=["float"], choices=["float", "int4"],
                   help="weights of the ONNX graphs timed, each a row per model: float (the graph's dtype), "
                        "int4 (MatMulNBits, fused graphs only; the peer is then also built with int4 weights, quantized the "
                        "same way)")
    p.add_argument("--no-peer", dest="peer", action="store_false",
                   help="skip the peer: the dense model converted by onnxruntime-genai's model builder and run by "
                        "onnxruntime-genai (CPU, float32; needs pip install 'compress-llm[peer]')")
    p.add_argument("--llamacpp", default=None, choices=GGUF_TYPES, metavar="TYPE",
                   help="also time every model as a GGUF of TYPE in llama.cpp (written as `compress gguf` writes it; "
                        f"{', '.join(GGUF_TYPES)}; batch 1; needs pip install 'compress-llm[llamacpp]')")
    p.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    p.add_argument("--json", type=Path, default=None,
                   help="write the table as a benchmark record (command line, date, machine, library versions; "
                        "its file name is its section), e.g. benchmarks/results/speed.json")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="with --json: a note kept in the record (e.g. what else ran on the machine); repeatable")


def _dense(args, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compress.loading import load_model

    if args.shape is None:
        return load_model(args.model, dtype=dtype, device=device), args.model or "reference"
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    return model.eval(), f"{args.shape} (random weights, {shape['num_hidden_layers']} layers)"


def run(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    from compress.adapters import get_adapter
    from compress.errors import CompressError
    from compress.loading import load_tokenizer, resolve_device, resolve_dtype
    from compress.pipeline import prune
    from compress.plan import Plan
    from compress.probe import build_serving_model
    from compress.slimming import build_slim_model
    from compress.stock import load_slim_folder
    from compress.random_plan import random_plan
    from compress.speed import format_table, measure, read_bandwidth, torch_timer
    from validation.record import Run

    record = Run(args.json.stem, notes=args.note) if args.json else None  # started now: its wall time is the run's

    if args.random_plan and not args.ratio:
        raise CompressError("--random-plan draws plans at the --ratio values: give at least one")
    if args.llamacpp and importlib.util.find_spec("llama_cpp") is None:
        raise CompressError("--llamacpp runs llama.cpp: pip install 'compress-llm[llamacpp]'")
    if args.llamacpp and args.batch != 1:
        raise CompressError("--llamacpp times llama.cpp at batch 1: drop --batch or --llamacpp")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("float16" if device.type == "cuda" else "float32"))
    dense, name = _dense(args, device, dtype)
    adapter = get_adapter(dense.config)
    slims = {"dense": build_slim_model(dense, adapter, Plan.keep_all(adapter.geometry()))}
    for folder in args.slim:
        slims[folder.name] = load_slim_folder(folder, dtype).to(device)  # a stock-layout folder too
    calib = None
    for ratio in args.ratio:
        if calib is None and args.method != "magnitude":
            from compress.reference import CALIB_TEXT
            from compress.textdata import load_text, token_stream, windows

            calib = windows(token_stream(load_tokenizer(args.model), load_text(CALIB_TEXT)), 256, 32).to(device)
        if args.random_plan:
            for kind in dict.fromkeys(args.random_plan):
                plan = random_plan(adapter.geometry(), kind, ratio)
                slims[f"random {kind}@{ratio}"] = build_slim_model(dense, adapter, plan)
            continue
        result = prune(dense, args.method, ratio, calib)
        slims[f"{args.method}@{ratio}"] = build_serving_model(dense, adapter, result.plan, result.replaced, calib)

    shape = dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        timers = []
        if args.pytorch:
            timers = [torch_timer(dense, "stock transformers", **shape)]
            timers += [torch_timer(m, label, **shape) for label, m in slims.items()]
        if args.onnx:
            timers += _onnx_timers(slims, dtype, shape, args.onnx_graph, args.onnx_weights, Path(tmp))
        if args.llamacpp:
            timers += _llamacpp_timers(slims, {f.name: f for f in args.slim}, load_tokenizer(args.model),
                                       args.llamacpp, shape, Path(tmp))
        if args.peer:
            for precision in ["fp32"] + (["int4"] if "int4" in args.onnx_weights else []):
                timers += _peer_timers(dense, args.model if args.shape is None else None, device, dtype, shape,
                                       Path(tmp), precision)
        rows = measure(timers, repeats=args.repeats, **shape)
        del timers  # sessions and their files go before the folder does
    bandwidth = read_bandwidth(device)
    title = (f"{name} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {dtype}, "
             f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens, "
             f"{torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    table = format_table(rows, bandwidth, args.batch)
    print(title)
    print(table)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(f"\n{title}\n\n{table}\n")
    if record is not None:
        from dataclasses import asdict

        record.write(args.json, f"Speed: {Path(str(name)).name}", title + ".", [{"markdown": table}],
                     device=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                     data={"rows": [asdict(r) for r in rows], "bandwidth": bandwidth, "batch": args.batch})
    for folder in args.slim:
        _record(folder, title, [r for r in rows if r.model in ("dense", "stock transformers", folder.name)],
                bandwidth, args.batch)
    return 0


def _record(folder: Path, setup: str, rows: list, bandwidth: float, batch: int) -> None:
    """Keep the figures in the folder's report.json, for the model card."""
    import json
    from dataclasses import asdict

    path = folder / "report.json"
    if path.is_file():
        report = json.loads(path.read_text())
        report["speed"] = {"setup": setup, "rows": [asdict(r) for r in rows], "bandwidth": bandwidth, "batch": batch}
        path.write_text(json.dumps(report, indent=1) + "\n")


def _onnx_timers(slims: dict, dtype: torch.dtype, shape: dict, graphs: list[str], weights: list[str],
                 tmp: Path) -> list:
    """onnxruntime timers of every graph and weight type asked for; where a fused graph has a
    genai_config.json and onnxruntime-genai is installed, also that graph run by onnxruntime-genai
    (the peer's runtime)."""
    import importlib.util

    import torch

    from exporters.onnx_export import export_onnx
    from exporters.onnx_fused import GENAI_NAME
    from compress.runtime.onnx_runner import OnnxRunner, ort
    from compress.speed import genai_timer, onnx_timer

    timers, genai = [], []
    onnx_dtype = "float16" if dtype == torch.float16 else "float32"
    for graph in dict.fromkeys(graphs):
        for kind in dict.fromkeys(weights):
            for label, m in slims.items():
                out = tmp / graph / kind / label
                try:
                    path = export_onnx(m.float().cpu() if onnx_dtype == "float32" else m, out, dtype=onnx_dtype,
                                       graph=graph, weights=kind)
                except ValueError as e:  # quantized weights on a graph that cannot take them
                    if kind == "float":
                        raise
                    print(f"{kind} skipped for {label}, {graph} graph: {e}")
                    continue
                options = ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()  # as every other engine
                quantized = path if kind != "float" else None  # bytes_per_token counts its int4 weights
                timers.append(onnx_timer(OnnxRunner(out, session_options=options), m, label, **shape,
                                         graph=quantized))
                if (out / GENAI_NAME).is_file() and importlib.util.find_spec("onnxruntime_genai") is not None:
                    _genai_threads(out)
                    engine = "onnxruntime-genai (ours, fused graph" + ("" if kind == "float" else f", {kind}") + ")"
                    genai.append(genai_timer(out, m, engine, label, **shape, graph=quantized))
    return timers + genai


def _llamacpp_timers(slims: dict, folders: dict[str, Path], tokenizer, gguf_type: str, shape: dict,
                     tmp: Path) -> list:
    """llama.cpp timers of every model as a GGUF of `gguf_type`, written by `compress gguf`'s code
    from its folder (a model built here is saved as one first); a slim model llama.cpp cannot run
    (Probe Pruning) is skipped with a note, a dense one is an error."""
    import shutil

    import torch

    from compress.commands.gguf import write_file
    from compress.errors import UnsupportedModelError
    from compress.speed import llamacpp_timer
    from exporters.hf_folder import write_model_files, write_weights

    timers, threads = [], torch.get_num_threads()
    for i, (label, m) in enumerate(slims.items()):
        folder, path = folders.get(label), tmp / f"llamacpp-{i}.gguf"
        if folder is None:
            folder = tmp / f"llamacpp-{i}"
            folder.mkdir()
            sd = {k: v.detach().float().cpu() for k, v in m.state_dict().items()}
            if m.config.tie_word_embeddings:
                sd.pop("lm_head.weight", None)
            write_weights(folder, sd)
            write_model_files(folder, m.config, tokenizer)
        try:
            write_file(folder, path, gguf_type, threads, label)
        except UnsupportedModelError as e:
            if label == "dense":
                raise
            print(f"llama.cpp skipped for {label}: {e}")
            continue
        finally:
            if folder.parent == tmp:
                shutil.rmtree(folder)
        timers.append(llamacpp_timer(path, label, f"llama.cpp ({gguf_type})", **shape, threads=threads))
    return timers


def _peer_timers(dense, tokenizer_source, device, dtype, shape: dict, tmp: Path, precision: str = "fp32") -> list:
    """The peer's timer (the model builder's `precision`: fp32, or int4 weights with float32
    activations), or none with a note saying why (not installed, not CPU float32)."""
    import importlib.util
    import subprocess
    import sys

    import torch

    from compress.loading import load_tokenizer
    from exporters.onnx_quant import BLOCK_SIZE
    from compress.speed import genai_timer, peer_engine

    if importlib.util.find_spec("onnxruntime_genai") is None:
        print("peer skipped: onnxruntime-genai is not installed (pip install 'compress-llm[peer]')")
        return []
    if device.type != "cpu" or dtype != torch.float32:
        print("peer skipped: compared on CPU in float32 only")
        return []
    hf, out = tmp / "peer-dense", tmp / f"peer-{precision}"
    if not hf.exists():
        _save_plain(dense, hf)
        load_tokenizer(tokenizer_source).save_pretrained(hf)  # the builder copies it; random shapes get ours
    build = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
             "-p", precision, "-e", "cpu", "-c", str(tmp / "peer-cache")]
    if precision == "int4":  # quantized as ours are: same blocks, same float compute, LM head left float
        build += ["--extra_options", f"block_size={BLOCK_SIZE}", "is_symmetric=false", "accuracy_level=1",
                  "nodes_to_exclude=/lm_head/MatMul"]
    done = subprocess.run(build, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"peer skipped: the model builder failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return []
    _genai_threads(out)
    engine = peer_engine(precision)
    graph = None if precision == "fp32" else out / "model.onnx"
    return [genai_timer(out, dense, engine, "dense", **shape, graph=graph)]


def _genai_threads(folder: Path) -> None:
    """onnxruntime-genai at the same thread count as every other engine."""
    import json

    import torch

    from exporters.onnx_fused import GENAI_NAME

    path = folder / GENAI_NAME
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = torch.get_num_threads()
    path.write_text(json.dumps(config, indent=1))


def _save_plain(model, folder: Path) -> None:
    """config.json + model.safetensors of a loaded model, for tools that read Hugging Face folders
    (a GGUF-loaded model refuses save_pretrained: its weights are already dequantized here)."""
    import copy

    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # as save_pretrained records it (GGUF configs lack it)
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
