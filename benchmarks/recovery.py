"""Recovery by distillation (compress.recover): quality without it, with it, and with the same compute
spent on more DISP steps instead.

For each method at each of --ratios (or at its own ratio only: NAME:ratio=R): prune, then score the
slim model (perplexity, KL(dense || slim), top-1 agreement) on --test-windows windows spread evenly
over each shipped held-out text (Python docs, code, WikiText-2 test, fiction: validation.heldout);
then, at --recover-ratios (default: all), recover it for --steps steps and score again.
Calibration: the default text of `compress export` (the broad mix; the reference model's own slice
for the reference model) unless --calib. Every pruning and recovery runs at --seed. For disp, where
it is recovered, the plan at --disp-steps is a snapshot of one run that goes on for as many more
steps as cost the recovery's FLOPs (equal total compute). Variants of the recovery (--variants, on
the first method): LoRA instead of full fine-tuning, at the same steps. --zero-shot TASK...: a
second table, zero-shot accuracy (validation.zero_shot, lm-eval on benchmarks/data) of the dense
model and, at --zero-shot-ratios (default: all), of each method's slim model without and with
recovery, each written to a temporary folder by compress.pipeline.export as `compress eval --tasks`
reads an export.

    OMP_NUM_THREADS=1 python benchmarks/recovery.py                    # reference model: disp, flap, tyr
    OMP_NUM_THREADS=1 python benchmarks/recovery.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --section recovery-smollm2 --methods flap --steps 60 --calib-windows 128 --variants
    OMP_NUM_THREADS=1 python benchmarks/recovery.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --section quality-table-smollm2 --methods flap wanda-sp magnitude disp:ratio=0.5 --ratios 0.2 0.3 0.4 0.5 \
        --recover-ratios 0.5 --zero-shot piqa hellaswag arc_easy winogrande --zero-shot-ratios 0.5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench, zero_shot, render_results
from compress import prune  # noqa: E402
from compress.adapters import get_adapter  # noqa: E402
from compress.commands.eval import exported_by_us  # noqa: E402
from compress.loading import load_model, load_tokenizer  # noqa: E402
from compress.methods import METHODS, PruneResult  # noqa: E402
from compress.pipeline import export  # noqa: E402
from compress.plan import linear_params  # noqa: E402
from compress.recover import DEFAULTS, recover  # noqa: E402
from compress.recover.budget import step_flops  # noqa: E402
from compress.reference import MODEL_DIR  # noqa: E402
from compress.slimming import build_slim_model  # noqa: E402
from compress.textdata import calibration_windows, load_text, token_stream  # noqa: E402
from compress.texts import default_calibration  # noqa: E402
from _bench import parse_variant, record_options, save  # noqa: E402
from validation.heldout import calibration_record, evaluate  # noqa: E402
from validation.quality_words import calibration_line, measured_on  # noqa: E402
from validation.record import Run, table  # noqa: E402
from validation.zero_shot import zero_shot  # noqa: E402
from validation.zero_shot_tasks import TASKS  # noqa: E402
from zero_shot import COLUMNS as ZERO_SHOT_COLUMNS, task_row  # noqa: E402

VARIANTS = {"LoRA": {"lora": True}}
RECOVERED = "recover (KL)"


def disp_step_flops(model, adapter, tokens: int) -> float:
    """DISP's own count of a training step (compress.methods.disp.default_steps)."""
    g = adapter.geometry()
    return 6.0 * (g.num_layers * linear_params(g) + model.get_output_embeddings().weight.numel()) * tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--section", default="recovery-reference")
    ap.add_argument("--methods", nargs="+", default=["disp", "flap", "tyr"],
                    help="method names; NAME:ratio=R for a method at that ratio only (instead of --ratios)")
    ap.add_argument("--ratios", "--ratio", nargs="+", type=float, default=[0.5])
    ap.add_argument("--recover-ratios", nargs="+", type=float, default=None, help="default: every --ratios")
    ap.add_argument("--steps", type=int, default=200, help="recovery steps of 4 x 256 tokens")
    ap.add_argument("--disp-steps", type=int, default=500, help="DISP's steps before recovery")
    ap.add_argument("--variants", action="store_true", help="also the loss and LoRA variants, on the first method")
    ap.add_argument("--calib", type=Path, default=None, help="calibration text (default: as compress export)")
    ap.add_argument("--calib-windows", type=int, default=None, help="default: every window, at most 512, spread")
    ap.add_argument("--test-windows", type=int, default=32, help="per held-out text, spread evenly over it")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zero-shot", nargs="+", default=[], choices=list(TASKS), metavar="TASK",
                    help=f"also zero-shot accuracy on these tasks (from {', '.join(TASKS)})")
    ap.add_argument("--zero-shot-limit", type=int, default=None, help="first N items of each task (default: all)")
    ap.add_argument("--zero-shot-ratios", nargs="+", type=float, default=None, help="default: every --ratios")
    record_options(ap)
    args = ap.parse_args(argv)
    methods = [parse_variant(s) for s in args.methods]
    if any(set(settings) - {"ratio"} for _, settings in methods):
        ap.error("--methods takes NAME or NAME:ratio=R")
    ratios_of = {i: [s["ratio"]] if "ratio" in s else args.ratios for i, (_, s) in enumerate(methods)}
    ratios = sorted({r for rs in ratios_of.values() for r in rs})
    recover_ratios = set(ratios if args.recover_ratios is None else args.recover_ratios)
    zero_shot_ratios = set(ratios if args.zero_shot_ratios is None else args.zero_shot_ratios)
    run = Run(args.section, [__file__, *(sys.argv[1:] if argv is None else argv)], args.note)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    adapter = get_adapter(model.config)
    calib_path = args.calib or default_calibration(args.model).path
    calib_ids = token_stream(tokenizer, load_text(calib_path))
    calib = calibration_windows(calib_ids, args.seq_len, args.calib_windows)
    calibration = calibration_record(calib_path, len(calib_ids), args.seq_len, args.calib_windows)
    tokens = DEFAULTS["batch_size"] * args.seq_len
    rows, held, texts, zs_rows, zs_data = [], [None], {}, [], []

    def accuracy(method: str, ratio: float, variant: str, result: PruneResult | None = None):
        """Zero-shot rows of the dense model (no result) or of a slim one, exported to a temporary folder."""
        if not args.zero_shot or (result is not None and ratio not in zero_shot_ratios):
            return
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="recovery-zero-shot-") as tmp:
            path = args.model if result is None else Path(tmp) / "slim"
            if result is not None:
                export(model, result, path, tokenizer=tokenizer, check=False)
            res = zero_shot(path, args.zero_shot, args.zero_shot_limit, trust_remote_code=exported_by_us(path))
        zs_data.append(dict(method=method, ratio=ratio, variant=variant, tasks=res["tasks"], lm_eval=res["lm_eval"],
                            wall_s=round(time.perf_counter() - t0, 1)))
        for task, f in res["tasks"].items():
            zs_rows.append(dict(method=method, ratio=ratio, variant=variant, **task_row(task, f)))
            print(zs_rows[-1], flush=True)

    def score(method: str, ratio: float, variant: str, result: PruneResult, extra_flops: float, seconds: float,
              rec=None):
        slim = build_slim_model(model, adapter, result.plan, result.replaced)
        r = rec.record if rec is not None else {}
        for q in evaluate(slim, tokenizer, calibration, reference=model, windows=args.test_windows,
                          seq_len=args.seq_len):
            texts[q["text"]] = q
            rows.append(dict(method=method, ratio=ratio, variant=variant, extra_flops=extra_flops, seconds=seconds,
                             text=q["text"], in_domain=q["in_domain"], perplexity=q["perplexity"],
                             dense=q["reference_perplexity"], vs_dense=q["perplexity"] / q["reference_perplexity"],
                             kl=q["kl"], top1=q["top1_agreement"],
                             kl_before=r.get("held_out_kl_before"), kl_after=r.get("held_out_kl_after")))
            print(rows[-1], flush=True)
        if variant in ("none", RECOVERED):
            accuracy(method, ratio, variant, result)

    def recovered(method: str, ratio: float, variant: str, result: PruneResult, **kw):
        rec = recover(model, result, calib, steps=args.steps, seed=args.seed, progress=False, **kw)
        held[0] = rec.record["held_out_windows"]
        score(method, ratio, variant, rec, args.steps * step_flops(model, adapter, result.plan, tokens),
              rec.record["seconds"], rec)

    accuracy("dense", 0.0, "none")
    for ratio in ratios:
        for i, (name, _) in enumerate(methods):
            if ratio not in ratios_of[i]:
                continue
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            if name == "disp":
                label = f"disp {args.disp_steps} steps"
                more = _equal_compute_steps(model, adapter, args, ratio, tokens) if ratio in recover_ratios else 0
                method = METHODS["disp"](steps=args.disp_steps + more)
                method.snapshot_steps = frozenset({args.disp_steps})
                longer = method.prune(model, adapter, ratio, calib, args.seed)
                result = PruneResult(method.snapshots[args.disp_steps]) if more else longer
                score(label, ratio, "none", result, 0.0, None)
                if more:
                    score(label, ratio, f"+{more} DISP steps (equal compute)", longer,
                          more * disp_step_flops(model, adapter, tokens),
                          (time.perf_counter() - t0) * more / (args.disp_steps + more))
            else:
                result = prune(model, name, ratio, calib, seed=args.seed)
                label = name
                score(label, ratio, "none", result, 0.0, None)
            if ratio not in recover_ratios:
                continue
            recovered(label, ratio, RECOVERED, result)
            if args.variants and i == 0:
                for variant, kw in VARIANTS.items():
                    recovered(label, ratio, f"recover ({variant})", result, **kw)

    g = adapter.geometry()
    columns = [("method", "method"), ("ratio", "ratio", "g"), ("variant", "after pruning"),
               ("extra_flops", "extra FLOPs", ".2e"), ("seconds", "extra s", ".0f"), ("text", "perplexity on"),
               ("in_domain", "in-domain"), ("dense", "dense", ".2f"), ("perplexity", "perplexity", ".2f"),
               ("vs_dense", "x dense", ".2f"), ("kl", "KL", ".4f"),
               ("top1", "top-1", ".3f"), ("kl_before", "held-out calib KL before", ".4f"),
               ("kl_after", "after", ".4f")]
    name = "the reference model" if args.model == MODEL_DIR else args.model.name
    tables = [table(columns, rows)]
    if zs_rows:
        tables.append(table([("method", "method"), ("ratio", "ratio", "g"), ("variant", "after pruning"),
                             *(c for c in ZERO_SHOT_COLUMNS if c[0] not in ("wall_s", "file"))], zs_rows,
                            caption="Zero-shot accuracy"))
    save(run, args, f"Quality without and with recovery (distillation) on {name}",
         f"Model: {name} ({g.num_layers} layers, hidden {g.hidden}); ratios {', '.join(map(str, ratios))}, "
         f"recovered at {', '.join(str(r) for r in ratios if r in recover_ratios) or 'none'}; "
         f"{calibration_line(calibration)} ({held[0]} of the windows held out by the recovery for its own "
         f"before/after KL, `held-out calib KL`); perplexity on: "
         + "; ".join(f"{measured_on(q)}, {q['relation']}" for q in texts.values())
         + f". Recovery: {args.steps} steps of {DEFAULTS['batch_size']} x {args.seq_len} tokens, "
         f"AdamW (lr {DEFAULTS['lr']:g}, LoRA {DEFAULTS['lora_lr']:g}, rank {DEFAULTS['rank']}), warmup "
         f"{DEFAULTS['warmup']:g} then cosine, KL(dense || slim) on the logits. Extra FLOPs: what was spent after the "
         "method's own run (recovery: 2 x dense + 6 x slim weights per token; DISP: its own 6 x dense per token); "
         "extra s: wall time of that (DISP's: its run's time, pro rata); x dense: perplexity over the dense model's. "
         + (f"Zero-shot accuracy (second table): lm-evaluation-harness {zs_data[0]['lm_eval']} "
            "(validation/zero_shot.py, local files of benchmarks/data/), "
            + (f"the first {args.zero_shot_limit} items of each task" if args.zero_shot_limit else "every item")
            + f", the dense model and each method at {', '.join(map(str, sorted(zero_shot_ratios)))} without "
              "and with recovery, each slim model exported to a folder first; ± is lm-eval's standard error, "
              "acc_norm divides each choice's log-likelihood by its length in characters. " if zs_data else "")
         + f"CPU, {torch.get_num_threads()} thread(s), float32, seed {args.seed} for every pruning and recovery.",
         tables, data={"zero_shot": zs_data} if zs_data else None)
    return 0


def _equal_compute_steps(model, adapter, args, ratio: float, tokens: int) -> int:
    """DISP steps that cost what --steps recovery steps of a plan at `ratio` cost (the slim model's
    size taken from the ratio: recovery FLOPs hardly depend on which channels are kept)."""
    g = adapter.geometry()
    head = model.get_output_embeddings().weight.numel()
    dense = g.num_layers * linear_params(g)
    recover_step = tokens * (2 * (dense + head) + 6 * ((1 - ratio) * dense + head))
    return round(args.steps * recover_step / disp_step_flops(model, adapter, tokens))


if __name__ == "__main__":
    sys.exit(main())
