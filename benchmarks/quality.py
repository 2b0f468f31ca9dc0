"""Quality of every pruning method on a model (the shipped reference model by default), at several ratios.

For each method (and each `--methods` variant such as `flap:allocation=uniform`) and ratio:
prune with the calibration slice, build the slim model, and measure perplexity, KL(dense ||
slim) and top-1 agreement with the dense model on the held-out test slice. Prints the table and
writes the run's JSON record (`--json`, by default benchmarks/results/SECTION.json, after which
benchmarks/RESULTS.md is rendered again from every record there).

    python benchmarks/quality.py                       # all registered methods
    python benchmarks/quality.py --methods magnitude wanda-sp flap flap:standardize=type
    python benchmarks/quality.py --methods probe flap flap:runtime=0.2   # Probe Pruning alone / on top of FLAP
                                                   # (flap is pruned once; the runtime variant reuses its plan)
    python benchmarks/quality.py --model SmolLM2-135M-Instruct.Q4_1.gguf --section quality-smollm2 \
        --calib-windows 64 --test-windows 64 --methods magnitude wanda-sp flap disp:steps=400,batch_size=2
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # render_results
from compress.adapters import get_adapter  # noqa: E402
from compress.loading import load_model, load_tokenizer  # noqa: E402
from compress.methods.base import PruneResult  # noqa: E402
from compress.reference import CALIB_TEXT, MODEL_DIR, TEST_TEXT  # noqa: E402
from compress.probe import build_serving_model, probe_flops_share, probe_runtime, runtime_ratio  # noqa: E402
from compress.textdata import calibration_windows, load_text, token_stream  # noqa: E402
from validation.quality import compare, perplexity  # noqa: E402
from validation.record import Run, table  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load_methods() -> dict:
    """The registry, keeping every method whose module imported (one broken module must not
    hide the others: submodules imported before the failure stay registered)."""
    try:
        import compress.methods  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report and carry on with what registered
        print(f"warning: not every method imported: {type(e).__name__}: {e}", file=sys.stderr)
    base = sys.modules.get("compress.methods.base")
    return dict(base.METHODS) if base else {}


def parse_variant(spec: str) -> tuple[str, dict]:
    """'flap:allocation=uniform,bias_compensation=false' -> ('flap', {...}); values as JSON where they parse."""
    name, _, rest = spec.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return name, settings


def record_options(ap: argparse.ArgumentParser) -> None:
    """--json and --note, as every benchmark script takes them."""
    ap.add_argument("--json", type=Path, default=None,
                    help="write the run's record here (default: benchmarks/results/SECTION.json, and "
                         "benchmarks/RESULTS.md is then rendered again)")
    ap.add_argument("--note", action="append", default=[],
                    help="a sentence the record keeps about this run (e.g. that the machine was shared)")


def save(run: Run, args: argparse.Namespace, title: str, text: str, tables: list[dict], **kw) -> dict:
    """Print the tables, write the run's record to --json (or results/SECTION.json) and, when the
    record landed in benchmarks/results/, render RESULTS.md again."""
    import render_results

    path = args.json or RESULTS_DIR / f"{run.section}.json"
    rec = run.write(path, title, text, tables, **kw)
    print("\n" + "\n".join(render_results.render_section(rec)))
    if path.resolve().parent == RESULTS_DIR:
        render_results.main([])
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR,
                    help="folder or GGUF file (default: the shipped reference model)")
    ap.add_argument("--section", default=None,
                    help="name of the record and its RESULTS.md section (default: quality-reference, or "
                         "quality-MODEL for --model)")
    ap.add_argument("--methods", nargs="+", help="method names or name:key=value,... variants (default: all)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--calib-windows", type=int, default=None, help="default: all of the calibration slice")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--test-windows", type=int, default=None, help="default: the whole test slice")
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
    calib = calibration_windows(token_stream(tokenizer, load_text(CALIB_TEXT)), args.seq_len, args.calib_windows)
    test_ids = token_stream(tokenizer, load_text(TEST_TEXT))
    eval_kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, device=args.device,
                   max_windows=args.test_windows, progress=False)
    dense = perplexity(model, test_ids, **eval_kw)

    rows = [dict(method="dense", ratio=0, removed=0.0, perplexity=dense.perplexity, kl=0.0, top1=1.0, widths="")]

    def score(label: str, ratio: float, res: PruneResult, seconds: float | None, runtime: float | None) -> None:
        if runtime is not None:
            res = PruneResult(copy.deepcopy(res.plan), res.replaced)
            res.plan.runtime = probe_runtime(runtime)
        slim = build_serving_model(model, adapter, res.plan, res.replaced, calib)
        q = compare(slim, model, test_ids, **eval_kw)
        widths = [(len(lp.resolved(g).heads), len(lp.resolved(g).mlp_hidden)) for lp in res.plan.layers]
        note = " ".join(f"{h}/{m}" for h, m in widths)
        if res.plan.runtime:
            note = (f"probe skips {runtime_ratio(slim.config):.3f} per batch, costs "
                    f"{100 * probe_flops_share(slim.config, args.batch_size, args.seq_len):.1f}% of the FLOPs; kept: "
                    + " ".join(f"{h}/{m}" for h, m in zip(slim.config.layer_probe_heads,
                                                          slim.config.layer_probe_intermediate)))
        rows.append(dict(method=label, ratio=ratio, removed=res.plan.ratio(g), perplexity=q.perplexity, kl=q.kl,
                         top1=q.top1_agreement, prune_s=seconds, widths=note))
        print(rows[-1], flush=True)

    pruned = {}  # (method, settings, ratio) -> (result, seconds): a variant that only adds `runtime` reuses it
    for name, settings in variants:
        label = name + "".join(f" {k}={v}" for k, v in settings.items())
        runtime = settings.pop("runtime", None)  # `runtime=R`: Probe Pruning at R on top of the method
        for ratio in args.ratios:
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
                rows.append(dict(method=label, ratio=ratio, widths=f"failed: {type(e).__name__}: {e}"))
                print(rows[-1], file=sys.stderr)

    columns = [("method", "method"), ("ratio", "ratio", "g"), ("removed", "removed", ".3f"),
               ("perplexity", "perplexity", ".2f"), ("kl", "KL", ".3f"), ("top1", "top-1", ".3f"),
               ("prune_s", "prune s", ".1f"), ("widths", "widths")]
    save(run, args, f"Quality on {'the reference model' if reference else args.model.name}",
         f"Model: {'the shipped reference' if reference else args.model.name} ({model.config.model_type}, "
         f"{g.num_layers} layers, hidden {g.hidden}, {g.num_heads} heads / {g.num_kv_heads} KV, "
         f"MLP {g.intermediate}); calibration {len(calib)} x {args.seq_len} tokens; test slice "
         f"{dense.windows} windows x {args.seq_len} ({dense.tokens:,} scored tokens); device {args.device} "
         f"({torch.get_num_threads()} threads), float32, seed {args.seed}. Ratio = fraction of decoder-layer "
         "linear weights removed (requested / achieved). KL = mean KL(dense || pruned) per token, nats; top-1 = "
         "argmax agreement with the dense model; prune s = the method's wall time. Widths = kept heads / MLP "
         "channels per layer (for Probe Pruning, `probe`, and `runtime=R`, Probe Pruning on top of a method: "
         "the share of the slim model's linear weights skipped per batch and the counts kept per batch of "
         f"{args.batch_size} windows).",
         [table(columns, rows)], device=args.device if args.device != "cpu" else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
