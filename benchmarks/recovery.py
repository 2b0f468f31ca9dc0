"""Recovery by distillation (compress.recover): quality without it, with it, and with the same compute
spent on more DISP steps instead.

For each method at --ratio: prune, then score the slim model (perplexity, KL(dense || slim), top-1
agreement) on --test-windows windows spread evenly over each shipped held-out text (Python docs,
code, WikiText-2 test, fiction: validation.heldout); then recover it for --steps steps and score
again. Calibration: the default text of `compress export` (the broad mix; the reference model's
own slice for the reference model) unless --calib. For disp, the plan at --disp-steps is a snapshot of one run
that goes on for as many more steps as cost the recovery's FLOPs (equal total compute). Variants
of the recovery (--variants, on the first method): LoRA instead of full fine-tuning, at the same
steps.

    OMP_NUM_THREADS=1 python benchmarks/recovery.py                    # reference model: disp, flap, tyr
    OMP_NUM_THREADS=1 python benchmarks/recovery.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --section recovery-smollm2 --methods flap --steps 60 --calib-windows 128 --variants
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality, render_results
from compress import prune  # noqa: E402
from compress.adapters import get_adapter  # noqa: E402
from compress.loading import load_model, load_tokenizer  # noqa: E402
from compress.methods import METHODS, PruneResult  # noqa: E402
from compress.plan import linear_params  # noqa: E402
from compress.recover import DEFAULTS, recover  # noqa: E402
from compress.recover.budget import step_flops  # noqa: E402
from compress.reference import MODEL_DIR  # noqa: E402
from compress.slimming import build_slim_model  # noqa: E402
from compress.textdata import calibration_windows, load_text, token_stream  # noqa: E402
from compress.texts import default_calibration  # noqa: E402
from quality import record_options, save  # noqa: E402
from validation.heldout import calibration_record, evaluate  # noqa: E402
from validation.quality_words import calibration_line, measured_on  # noqa: E402
from validation.record import Run, table  # noqa: E402

VARIANTS = {"LoRA": {"lora": True}}


def disp_step_flops(model, adapter, tokens: int) -> float:
    """DISP's own count of a training step (compress.methods.disp.default_steps)."""
    g = adapter.geometry()
    return 6.0 * (g.num_layers * linear_params(g) + model.get_output_embeddings().weight.numel()) * tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--section", default="recovery-reference")
    ap.add_argument("--methods", nargs="+", default=["disp", "flap", "tyr"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=200, help="recovery steps of 4 x 256 tokens")
    ap.add_argument("--disp-steps", type=int, default=500, help="DISP's steps before recovery")
    ap.add_argument("--variants", action="store_true", help="also the loss and LoRA variants, on the first method")
    ap.add_argument("--calib", type=Path, default=None, help="calibration text (default: as compress export)")
    ap.add_argument("--calib-windows", type=int, default=None, help="default: every window, at most 512, spread")
    ap.add_argument("--test-windows", type=int, default=32, help="per held-out text, spread evenly over it")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    record_options(ap)
    args = ap.parse_args(argv)
    run = Run(args.section, [__file__, *(sys.argv[1:] if argv is None else argv)], args.note)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    adapter = get_adapter(model.config)
    calib_path = args.calib or default_calibration(args.model).path
    calib_ids = token_stream(tokenizer, load_text(calib_path))
    calib = calibration_windows(calib_ids, args.seq_len, args.calib_windows)
    calibration = calibration_record(calib_path, len(calib_ids), args.seq_len, args.calib_windows)
    tokens = DEFAULTS["batch_size"] * args.seq_len
    rows, held, texts = [], [None], {}

    def score(method: str, variant: str, result: PruneResult, extra_flops: float, seconds: float, rec=None):
        slim = build_slim_model(model, adapter, result.plan, result.replaced)
        r = rec.record if rec is not None else {}
        for q in evaluate(slim, tokenizer, calibration, reference=model, windows=args.test_windows,
                          seq_len=args.seq_len):
            texts[q["text"]] = q
            rows.append(dict(method=method, variant=variant, extra_flops=extra_flops, seconds=seconds,
                             text=q["text"], in_domain=q["in_domain"], perplexity=q["perplexity"],
                             dense=q["reference_perplexity"], kl=q["kl"], top1=q["top1_agreement"],
                             kl_before=r.get("held_out_kl_before"), kl_after=r.get("held_out_kl_after")))
            print(rows[-1], flush=True)

    def recovered(method: str, variant: str, result: PruneResult, **kw):
        rec = recover(model, result, calib, steps=args.steps, seed=args.seed, progress=False, **kw)
        held[0] = rec.record["held_out_windows"]
        score(method, variant, rec, args.steps * step_flops(model, adapter, result.plan, tokens),
              rec.record["seconds"], rec)

    for i, name in enumerate(args.methods):
        t0 = time.perf_counter()
        if name == "disp":
            more = _equal_compute_steps(model, adapter, args, tokens)
            method = METHODS["disp"](steps=args.disp_steps + more)
            method.snapshot_steps = frozenset({args.disp_steps})
            longer = method.prune(model, adapter, args.ratio, calib, args.seed)
            result = PruneResult(method.snapshots[args.disp_steps])
            score(f"disp {args.disp_steps} steps", "none", result, 0.0, None)
            score(f"disp {args.disp_steps} steps", f"+{more} DISP steps (equal compute)", longer,
                  more * disp_step_flops(model, adapter, tokens),
                  (time.perf_counter() - t0) * more / (args.disp_steps + more))
            label = f"disp {args.disp_steps} steps"
        else:
            result = prune(model, name, args.ratio, calib, seed=args.seed)
            label = name
            score(label, "none", result, 0.0, None)
        recovered(label, "recover (KL)", result)
        if args.variants and i == 0:
            for variant, kw in VARIANTS.items():
                recovered(label, f"recover ({variant})", result, **kw)

    g = adapter.geometry()
    columns = [("method", "method"), ("variant", "after pruning"), ("extra_flops", "extra FLOPs", ".2e"),
               ("seconds", "extra s", ".0f"), ("text", "perplexity on"), ("in_domain", "in-domain"),
               ("dense", "dense", ".2f"), ("perplexity", "perplexity", ".2f"), ("kl", "KL", ".4f"),
               ("top1", "top-1", ".3f"), ("kl_before", "held-out calib KL before", ".4f"),
               ("kl_after", "after", ".4f")]
    name = "the reference model" if args.model == MODEL_DIR else args.model.name
    save(run, args, f"Recovery by distillation on {name}",
         f"Model: {name} ({g.num_layers} layers, hidden {g.hidden}); ratio {args.ratio}; "
         f"{calibration_line(calibration)} ({held[0]} of the windows held out by the recovery for its own "
         f"before/after KL, `held-out calib KL`); perplexity on: "
         + "; ".join(f"{measured_on(q)}, {q['relation']}" for q in texts.values())
         + f". Recovery: {args.steps} steps of {DEFAULTS['batch_size']} x {args.seq_len} tokens, "
         f"AdamW (lr {DEFAULTS['lr']:g}, LoRA {DEFAULTS['lora_lr']:g}, rank {DEFAULTS['rank']}), warmup "
         f"{DEFAULTS['warmup']:g} then cosine, KL(dense || slim) on the logits. Extra FLOPs: what was spent after the "
         "method's own run (recovery: 2 x dense + 6 x slim weights per token; DISP: its own 6 x dense per token); "
         "extra s: wall time of that (DISP's: its run's time, pro rata). "
         f"CPU, {torch.get_num_threads()} thread(s), float32, seed {args.seed}.",
         [table(columns, rows)])
    return 0


def _equal_compute_steps(model, adapter, args, tokens: int) -> int:
    """DISP steps that cost what --steps recovery steps of a plan at --ratio cost (the slim model's
    size taken from the ratio: recovery FLOPs hardly depend on which channels are kept)."""
    g = adapter.geometry()
    head = model.get_output_embeddings().weight.numel()
    dense = g.num_layers * linear_params(g)
    recover_step = tokens * (2 * (dense + head) + 6 * ((1 - args.ratio) * dense + head))
    return round(args.steps * recover_step / disp_step_flops(model, adapter, tokens))


if __name__ == "__main__":
    sys.exit(main())
