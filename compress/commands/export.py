"""Prune a causal LM and write a slim, loadable, parity-checked folder.

Without --model, the small reference model shipped with this package is used, so the whole
pipeline runs offline in minutes. --ratio is the fraction of decoder-layer linear weights
(q/k/v/o and MLP) removed; the report also gives it as a fraction of all parameters.
The folder is written to a staging folder and moved into place only after every check passed.
"""

from __future__ import annotations

import argparse
import os
import textwrap
import time
from pathlib import Path

from compress.errors import CompressError
from compress.helpers import DTYPES, SCOPES, check_ratio, dtype_name
from compress.methods.options import DEFAULTS, DESCRIPTIONS, add_method_arguments
from compress.commands.gguf import TYPES as GGUF_TYPES
from compress.commands.ranks import add_arguments as add_ranks_arguments
from compress.commands.recover import add_recover_arguments
from compress.texts import EVAL_WINDOWS
from compress.threads import add_threads_argument

DEFAULT_METHOD = "disp"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a dense model and calibration text."""
    p.add_argument("--model", default=None, help="dense model: folder, Hub id or GGUF file (default: the shipped reference model)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the exported weights")
    p.add_argument("--load-dtype", default="auto", choices=["auto", *DTYPES],
                   help="dtype the dense model is held in while pruning; auto: float32, unless --dtype is half "
                        "precision and the model in float32 would take over half the available memory")
    p.add_argument("--device", default="auto", help="device to prune on: auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--calib", default=None,
                   help="calibration text file (default: a broad mix shipped with compress: docs, code, encyclopedic "
                        "articles, novels, plays; the reference model: the calibration slice of its own corpus)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="number of calibration windows (default: every window of the text, at most 512)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")


def add_scope_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parity-scope", choices=SCOPES, default="auto",
                   help="model: run the whole slim and masked dense models in float64 (needs about three "
                        "float64 copies of the model in memory); layers: check one decoder layer at a time in "
                        "float64 (bounded memory; the folder's tensors compared, not run); auto: model where it "
                        "fits in memory, else layers")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(DESCRIPTIONS),
                   help="pruning method (each described below)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of decoder-layer linear weights to remove, in (0, 1)")
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    add_model_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice; same seed, same bytes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a folder this tool wrote (it holds plan.json or report.json) or an "
                        "empty one; anything else is left alone")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard")
    p.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS,
                   help="windows per held-out text, spread evenly over each of the shipped evaluation texts, for the "
                        "report's perplexity, KL and top-1 agreement (0 to skip)")
    p.add_argument("--runtime", choices=["probe"], default=None,
                   help="add run-time pruning on top of the method's static plan: `probe` (Probe Pruning) "
                        "skips --runtime-ratio of the slim model's decoder linear weights per batch, chosen by a "
                        "small probe of the batch; see the probe options")
    p.add_argument("--runtime-ratio", type=float, default=0.2, help="share skipped per batch by --runtime probe")
    p.add_argument("--onnx", action="store_true", help="also write ONNX (float32) with a KV cache and check parity")
    p.add_argument("--onnx-weights", default="float", choices=["float", "int4"],
                   help="with --onnx: int4 writes DIR/onnx-int4 instead, the decoder layers' weights quantized "
                        "(see `compress onnx --help`)")
    p.add_argument("--gguf", default=None, choices=GGUF_TYPES,
                   help="also write DIR/gguf/NAME-TYPE.gguf for llama.cpp as `compress gguf` does, checked "
                        "unless --no-check; a plan llama.cpp cannot run is refused before pruning")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip parity checks (not recommended)")
    add_scope_argument(p)
    p.add_argument("--streaming", choices=["auto", "on", "off"], default="auto",
                   help="read the dense model one decoder layer at a time from its safetensors files, so "
                        "peak memory stays near one layer plus the embeddings (magnitude, wanda-sp and flap, "
                        "from a local folder, a Hub id's safetensors or a GGUF file; the checks are then layer "
                        "by layer; calibration activations go to a folder under $TMPDIR when they would take over "
                        "a quarter of the memory); auto: when the model is too large for the whole-model "
                        "checks; the output is the same either way")
    p.add_argument("--layout", choices=["slim", "stock", "auto"], default="slim",
                   help="stock: the dense family's own config and tensor names (e.g. LlamaForCausalLM), loaded "
                        "with no remote code by transformers, vLLM, TGI and llama.cpp's converter; it needs the "
                        "same widths in every layer, both sublayers everywhere and whole residual streams "
                        "(refused in one line otherwise); slim: the slim model and its modeling code; auto: stock "
                        "where the plan allows (slim with --gguf, which reads the slim layout)")
    p.add_argument("--dry-run", action="store_true",
                   help="disp and tyr+disp: print the memory a DISP training step needs for this model, batch "
                        "and sequence length (counted on a two-layer copy, scaled; see the README), then stop; "
                        "reads the config only")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --dry-run: plan each of N processes' memory (torchrun's --nproc-per-node times the "
                        "nodes), replicated and sharded (--shard fsdp); default: WORLD_SIZE, else 1")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                   help="then push the folder (with its ONNX, GGUF when --onnx, --gguf) to this Hub repository, as "
                        "`compress push` does")
    add_threads_argument(p)
    add_ranks_arguments(p)
    add_recover_arguments(p)
    add_method_arguments(p)
    p.epilog = "methods:\n" + "\n".join(
        textwrap.fill(text, 96, initial_indent=f"  {name:<11}", subsequent_indent=" " * 13, break_on_hyphens=False)
        for name, text in DESCRIPTIONS.items())


def method_settings(args: argparse.Namespace) -> dict:
    """The options given for the method; an option left at None takes the method's own default."""
    return {k: v for k in DEFAULTS[args.method] if (v := getattr(args, k, None)) is not None}


def run(args: argparse.Namespace) -> int:
    from compress.commands.ranks import run_ranks
    from compress.methods import METHODS

    check_ratio(args.ratio)
    if args.world_size is not None and (not args.dry_run or args.world_size < 1):
        raise CompressError("--world-size N (N >= 1) goes with --dry-run; under torchrun the launcher sets it")
    if args.dry_run:
        return _dry_run(args)
    step_bytes = (lambda: _step_plan(args)[0]) if args.method in ("disp", "tyr+disp") else None
    return run_ranks(args, _run, METHODS[args.method].data_parallel, step_bytes, recover=args.recover)


def _run(args: argparse.Namespace, session) -> int:
    """The export, in this process's part of the run (`compress.commands.ranks.Session`)."""
    from compress.loading import load_config, load_tokenizer, resolve_dtype
    from compress.pipeline import streaming_for
    from compress.probe import probe_runtime
    from compress.source import open_source
    from compress.textdata import calibration_windows, load_text, token_stream
    from compress.texts import default_calibration
    from exporters.hf_folder import check_destination, parse_size
    from validation.heldout import calibration_record
    from validation.quality_words import calibration_line

    # checked now (probe_runtime refuses a bad ratio), not after minutes of pruning
    runtime = probe_runtime(args.runtime_ratio, skip_layers=args.probe_skip_layers,
                            heads=args.probe_heads) if args.runtime == "probe" else None
    if args.onnx_weights != "float" and not args.onnx:
        raise CompressError("--onnx-weights needs --onnx")
    out = args.out.resolve()
    check_destination(out, args.overwrite)
    if args.push_to_hub:  # fail now, not after minutes of pruning
        from exporters.hub import require_token

        require_token()
    parse_size(args.max_shard_size)
    dtype, device = resolve_dtype(args.dtype), session.device
    t0 = time.perf_counter()
    config = load_config(args.model)  # the model first, in the order to fix it: folder, config, architecture, weights
    if args.gguf:
        from compress.commands.gguf import refuse_before_pruning

        refuse_before_pruning(config, args.method, args.runtime, args.gguf)
    if args.gguf and args.layout == "stock":
        raise CompressError("--gguf reads the slim layout; drop --layout stock (llama.cpp's own "
                            "convert_hf_to_gguf.py converts a stock folder)")
    if args.recover and args.method == "probe":
        raise CompressError("--recover trains a static plan's kept weights; Probe Pruning chooses its channels at "
                            "run time (use --runtime probe on top of a static method instead)")
    folder = streaming_for(args.streaming, args.model, args.method, runtime is not None, args.parity_scope,
                           recover=args.recover)
    tokenizer = load_tokenizer(args.model)
    calib_path = Path(args.calib) if args.calib else default_calibration(args.model).path
    calib_ids = token_stream(tokenizer, load_text(calib_path))
    try:
        calib = calibration_windows(calib_ids, args.seq_len, args.calib_samples)
    except ValueError as e:
        raise CompressError(f"{calib_path}: {e}; give a longer text, or a smaller --seq-len or "
                            "--calib-samples") from None
    calibration = calibration_record(calib_path, len(calib_ids), args.seq_len, args.calib_samples)
    source = open_source(args.model, folder, args.load_dtype, dtype, device)
    how = "streaming {} one layer at a time" if source.streamed else "loaded {}"
    print(f"{how.format(args.model or 'the reference model')} on {device} in {dtype_name(source.dtype)}; "
          f"{calibration_line(calibration)}")
    report = _prune_and_export(args, source, tokenizer, calib, calibration, dtype, device, runtime, session)
    if report is None:  # a rank other than 0, its share of training done
        return session.wait()
    if args.onnx:
        from compress.commands.onnx import export_folder_onnx

        export_folder_onnx(out, weights=args.onnx_weights)
    if args.gguf:
        from compress.commands.gguf import export_folder_gguf

        export_folder_gguf(out, args.gguf, check=args.check, threads=args.threads)
    from validation.report import summary_lines

    for line in summary_lines(report):
        print(line)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    if args.push_to_hub:
        from exporters.hub import push_folder

        url = push_folder(out, args.push_to_hub, include_onnx=args.onnx, include_gguf=bool(args.gguf))
        print(f"pushed {out} to {url}")
    session.done()
    return 0


def _step_plan(args, world_size: int | None = None) -> tuple[int, dict, list[str]]:
    """(a replicated DISP step's bytes on the device, the memory plan per process, its lines)."""
    from compress.loading import load_config, load_dtype, resolve_device, resolve_dtype
    from compress.methods.disp_memory import format_plan, training_memory

    config = load_config(args.model)
    held = load_dtype(config, args.load_dtype, resolve_dtype(args.dtype))  # as the export would hold it
    settings = method_settings(args)
    batch = settings.get("batch_size", DEFAULTS["disp"]["batch_size"])
    n = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    plan = training_memory(config, held, settings, batch, args.seq_len, n)
    lines = format_plan(plan, args.model or "the reference model", held, batch, args.seq_len,
                        config.num_hidden_layers)
    return plan["checkpointed" if resolve_device(args.device).type == "cuda" else "plain"], plan, lines


def _dry_run(args) -> int:
    """The DISP training memory plan (no weights read, nothing written)."""
    import torch

    from compress.loading import resolve_device
    from compress.memory import available_memory

    if args.method not in ("disp", "tyr+disp"):
        raise CompressError(f"--dry-run plans DISP's training memory: use it with --method disp or tyr+disp, "
                            f"not {args.method}")
    device = resolve_device(args.device)
    need, plan, lines = _step_plan(args, args.world_size)
    for line in lines:
        print(line)
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    print(f"{device}: {have / 1e9:.2f} GB available, a step needs about {need / 1e9:.2f} GB (live tensors; the "
          f"allocator's cache adds to it): {'fits' if need <= have else 'does NOT fit'}")
    if plan["world_size"] > 1:
        fsdp = plan["checkpointed_fsdp" if device.type == "cuda" else "plain_fsdp"]
        print(f"sharded over {plan['world_size']} processes (--shard fsdp) a step needs about {fsdp / 1e9:.2f} GB "
              f"per device: {'fits' if fsdp <= have else 'does NOT fit'}")
    return 0


def _prune_and_export(args, source, tokenizer, calib, calibration: dict, dtype, device, runtime,
                      session) -> dict | None:
    """`prune` and `export` over the dense model's layers, held or streamed; the report (None on a
    rank other than 0: it trains, rank 0 writes). `calibration`: the calibration text's record."""
    from compress.pipeline import export, prune

    t1 = time.perf_counter()
    writer = session.world.writer
    result = prune(source, args.method, args.ratio, calib.to(device), seed=args.seed, **session.prune_options(),
                   **method_settings(args)) if writer or session.team.size > 1 else None
    prune_s = time.perf_counter() - t1
    if args.recover:  # every rank trains
        result, recovery = _recover(args, source.model, session.shared_result(result), calib.to(device), session)
    if not writer:
        return None
    session.trained = True
    if runtime:
        if result.plan.runtime:
            raise CompressError(f"--method {args.method} already prunes at run time; drop --runtime")
        result.plan.runtime = runtime
    extra = _extra(args, prune_s, calibration)
    if args.recover:
        extra["recovery"] = recovery
    quality, comparison = ([], None) if not args.eval_windows else _quality(source, result, tokenizer, args, device,
                                                                             calib.to(device), calibration)
    return export(source, result, args.out.resolve(), tokenizer=tokenizer, calib=calib, dtype=dtype,
                  overwrite=args.overwrite, check=args.check, max_shard_size=args.max_shard_size, quality=quality,
                  comparison=comparison, extra=extra, parity_scope=args.parity_scope,
                  layout="slim" if args.gguf and args.layout == "auto" else args.layout)


def _recover(args, model, result, calib, session):
    """`--recover`: distillation, data-parallel over the ranks, its state kept in OUT.partial/ beside
    the method's (the same command resumes it; a written export removes the folder)."""
    from compress.commands.recover import recover_result

    return recover_result(args, model, result, calib, session.store, session.world)


def _extra(args, prune_s: float, calibration: dict) -> dict:
    return {"base_model": str(Path(args.model).resolve()) if args.model and Path(args.model).exists()
            else (args.model or "reference"), "prune_seconds": round(prune_s, 2), "calibration": calibration}


def _quality(source, result, tokenizer, args, device, calib, calibration: dict) -> tuple[list, object]:
    """The report's held-out figures (validation.heldout): (records of the whole slim model run now,
    None), the slim model freed on return; for a streamed model, never whole, ([], a HeldOutLayerwise
    that export runs beside the layers)."""
    from compress.probe import build_serving_model
    from validation.heldout import HeldOutLayerwise, evaluate

    if source.streamed:
        return [], HeldOutLayerwise(source.model, source.adapter, result.plan, tokenizer, calibration,
                                    args.eval_windows, args.seq_len)
    slim = build_serving_model(source.model, source.adapter, result.plan, result.replaced, calib)
    return evaluate(slim, tokenizer, calibration, reference=source.model, windows=args.eval_windows,
                    seq_len=args.seq_len, device=device), None
