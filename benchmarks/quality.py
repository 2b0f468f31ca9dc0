"""Quality of every pruning method on a model (the shipped reference model by default), at several ratios.

For each method (and each `--methods` variant such as `flap:allocation=uniform`, or `flap:ratio=0.3`
for a ratio of its own) and ratio: prune with the calibration text (the model's default, as
`compress export` chooses it, or --calib), build the slim model, and measure perplexity, KL(dense ||
slim) and top-1 agreement with the dense model on every shipped held-out text (windows spread over
each whole text; validation.heldout), saying which texts are in the calibration domain. Prints the
tables and writes the run's JSON record (`--json`, by default benchmarks/results/SECTION.json, after
which benchmarks/RESULTS.md is rendered again from every record there).

    python benchmarks/quality.py                       # all registered methods
    python benchmarks/quality.py --methods magnitude wanda-sp flap flap:standardize=type
    python benchmarks/quality.py --methods probe flap flap:runtime=0.2   # Probe Pruning alone / on top of FLAP
                                                   # (flap is pruned once; the runtime variant reuses its plan)
    python benchmarks/quality.py --model SmolLM2-135M-Instruct.Q4_1.gguf --section quality-smollm2 \
        --methods flap:ratio=0.3 disp:ratio=0.5,steps=200                  # calibrated on the broad set
    python benchmarks/quality.py --model SmolLM2-135M-Instruct.Q4_1.gguf --calib python-docs ...
    python benchmarks/quality.py --methods disp --ratios 0.5 --snapshots 100 200 400   # DISP's steps curve
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench
from _bench import parse_variant, record_options, save  # noqa: E402
from compress.adapters import get_adapter  # noqa: E402
from compress.loading import load_model, load_tokenizer  # noqa: E402
from compress.methods.base import PruneResult  # noqa: E402
from compress.reference import MODEL_DIR  # noqa: E402
from compress.probe import build_serving_model, probe_flops_share, probe_runtime, runtime_ratio  # noqa: E402
from compress.textdata import calibration_windows, load_text, token_stream  # noqa: E402
from compress.texts import BROAD_CALIB, EVAL_WINDOWS, REFERENCE_CALIB, default_calibration  # noqa: E402
from validation.heldout import calibration_record, evaluate  # noqa: E402
from validation.quality_words import calibration_line, measured_on  # noqa: E402
from validation.record import Run, table  # noqa: E402


def load_methods() -> dict:
    """The registry, keeping every method whose module imported (one broken module must not
    hide the others: submodules imported before the failure stay registered)."""
    try:
        from compress.methods import METHODS  # noqa: F401  (first use registers every method)
    except Exception as e:  # noqa: BLE001 - report and carry on with what registered
        print(f"warning: not every method imported: {type(e).__name__}: {e}", file=sys.stderr)
    base = sys.modules.get("compress.methods.base")
    return dict(base.METHODS) if base else {}


CALIBRATIONS = {"broad": BROAD_CALIB.path, "python-docs": REFERENCE_CALIB.path}
# What a record's data keeps of each evaluation text (its figures are in the table).
TEXT_KEYS = ("text", "file", "sha256", "kind", "corpora", "text_tokens", "windows", "seq_len", "seed", "offsets",
             "mode", "stride", "in_domain", "relation")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR,
                    help="folder or GGUF file (default: the shipped reference model)")
    ap.add_argument("--section", default=None,
                    help="name of the record and its RESULTS.md section (default: quality-reference, or "
                         "quality-MODEL for --model)")
    ap.add_argument("--methods", nargs="+", help="method names or name:key=value,... variants (default: all)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--calib", default=None,
                    help=f"calibration text: {' or '.join(CALIBRATIONS)} (the shipped ones) or a file (default: "
                         "the model's, as compress export chooses it)")
    ap.add_argument("--calib-windows", type=int, default=None, help="default: all of the calibration text, at most 512")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--test-windows", type=int, default=EVAL_WINDOWS,
                    help=f"windows per held-out text, spread over it (default {EVAL_WINDOWS}, as in export reports)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--snapshots", nargs="+", type=int, default=[],
                    help="DISP: also score the plan at these training steps (what --steps N gives, from one run)")
    record_options(ap)
    args = ap.parse_args(argv)
    reference = args.model == MODEL_DIR
    run = Run(args.section or ("quality-reference" if reference else f"quality-{args.model.stem}"),
              [__file__, *(sys.argv[1:] if argv is None else argv)], args.note)

    methods = load_methods()
    variants = [parse_variant(s) for s in (args.methods or sorted(methods))]
    for name, _ in variants:
        if name not in methods:
            ap.error(f"unknown or unimportable method {name!r}; available: {', '.join(sorted(methods))}")

    torch.manual_seed(args.seed)
    model = load_model(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    calib_path = Path(CALIBRATIONS.get(args.calib, args.calib or default_calibration(args.model).path))
    calib_ids = token_stream(tokenizer, load_text(calib_path))
    calib = calibration_windows(calib_ids, args.seq_len, args.calib_windows)
    cal = calibration_record(calib_path, len(calib_ids), args.seq_len, args.calib_windows)
    eval_kw = dict(windows=args.test_windows, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device)
    texts: list[dict] = []  # the evaluation texts' records without figures, once
    rows, pruned_rows = [], []

    def add_rows(label: str, ratio: float, records: list[dict]) -> None:
        for r in records:
            rows.append(dict(method=label, ratio=ratio, text=r["text"], in_domain=r["in_domain"],
                             perplexity=r["perplexity"], kl=r.get("kl", 0.0), top1=r.get("top1_agreement", 1.0)))
        if not texts:
            texts.extend({k: v for k, v in r.items() if k in TEXT_KEYS} for r in records)

    def score(label: str, ratio: float, res: PruneResult, seconds: float | None, runtime: float | None) -> None:
        if runtime is not None:
            res = PruneResult(copy.deepcopy(res.plan), res.replaced)
            res.plan.runtime = probe_runtime(runtime)
        slim = build_serving_model(model, adapter, res.plan, res.replaced, calib)
        records = evaluate(slim, tokenizer, cal, reference=model, **eval_kw)
        if not rows:  # the dense model's figures: its side of the first comparison, on the same windows
            add_rows("dense", 0, [{**r, "perplexity": r["reference_perplexity"], "kl": 0.0, "top1_agreement": 1.0}
                                  for r in records])
        add_rows(label, ratio, records)
        widths = [(len(lp.resolved(g).heads), len(lp.resolved(g).mlp_hidden)) for lp in res.plan.layers]
        note = " ".join(f"{h}/{m}" for h, m in widths)
        if res.plan.runtime:
            note = (f"probe skips {runtime_ratio(slim.config):.3f} per batch, costs "
                    f"{100 * probe_flops_share(slim.config, args.batch_size, args.seq_len):.1f}% of the FLOPs; kept: "
                    + " ".join(f"{h}/{m}" for h, m in zip(slim.config.layer_probe_heads,
                                                          slim.config.layer_probe_intermediate)))
        pruned_rows.append(dict(method=label, ratio=ratio, removed=res.plan.ratio(g), prune_s=seconds, widths=note))
        print(rows[-len(records):], pruned_rows[-1], flush=True)

    pruned = {}  # (method, settings, ratio) -> (result, seconds): a variant that only adds `runtime` reuses it
    for name, settings in variants:
        ratios = [settings.pop("ratio")] if "ratio" in settings else args.ratios  # `ratio=R`: this variant's own
        label = name + "".join(f" {k}={v}" for k, v in settings.items())
        runtime = settings.pop("runtime", None)  # `runtime=R`: Probe Pruning at R on top of the method
        for ratio in ratios:
            cls = methods[name]
            try:
                key = (name, json.dumps(settings, sort_keys=True), ratio)
                if key not in pruned:
                    method = cls(**settings)
                    if hasattr(method, "snapshot_steps"):
                        method.snapshot_steps = frozenset(args.snapshots)
                    t0 = time.perf_counter()
                    res = method.prune(model, adapter, ratio, calib if cls.needs_calibration else None, args.seed)
                    pruned[key] = res, time.perf_counter() - t0
                    for step, plan in sorted(getattr(method, "snapshots", {}).items()):
                        score(f"{label} (at step {step})", ratio, PruneResult(plan), None, runtime)
                res, seconds = pruned[key]
                score(label, ratio, res, seconds, runtime)
            except Exception as e:  # noqa: BLE001 - one failing method must not lose the others' rows
                pruned_rows.append(dict(method=label, ratio=ratio, widths=f"failed: {type(e).__name__}: {e}"))
                print(pruned_rows[-1], file=sys.stderr)
    if not rows:  # no method scored: the dense model alone
        add_rows("dense", 0, evaluate(model, tokenizer, cal, **eval_kw))

    figures = [("method", "method"), ("ratio", "ratio", "g"), ("text", "perplexity on"),
               ("in_domain", "in-domain"), ("perplexity", "perplexity", ".2f"), ("kl", "KL", ".3f"),
               ("top1", "top-1", ".3f")]
    shapes = [("method", "method"), ("ratio", "ratio", "g"), ("removed", "removed", ".3f"),
              ("prune_s", "prune s", ".1f"), ("widths", "widths")]
    name = "the reference model" if reference else args.model.name
    save(run, args, f"Quality on {name}, calibrated on {cal['text']}",
         f"Model: {'the shipped reference' if reference else args.model.name} ({model.config.model_type}, "
         f"{g.num_layers} layers, hidden {g.hidden}, {g.num_heads} heads / {g.num_kv_heads} KV, "
         f"MLP {g.intermediate}); {calibration_line(cal)}; device {args.device} "
         f"({torch.get_num_threads()} threads), float32, seed {args.seed}. Perplexity on: "
         + "; ".join(f"{measured_on(t)}, {t['relation']}" for t in texts)
         + ". Ratio = fraction of decoder-layer linear weights removed (requested / achieved). KL = mean KL(dense || "
         "pruned) per token, nats; top-1 = argmax agreement with the dense model; prune s = the method's wall "
         "time. Widths = kept heads / MLP channels per layer (for Probe Pruning, `probe`, and `runtime=R`, Probe "
         "Pruning on top of a method: the share of the slim model's linear weights skipped per batch and the "
         f"counts kept per batch of {args.batch_size} windows).",
         [table(figures, rows), table(shapes, pruned_rows, caption="What was pruned")],
         device=args.device if args.device != "cpu" else None, data={"calibration": cal, "texts": texts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
