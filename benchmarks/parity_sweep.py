"""Parity of every method at several ratios on one model: no false alarms, and wrong plans caught.

For each method and ratio: prune, run the export's parity checks (equivalence, 32-token greedy
generation, identity; CPU float64), then build the slim model from the same plan with one kept
index moved to a pruned neighbour (validation.mutations) and check that equivalence fails. Prints
the table and writes the run's JSON record (`--json`; by default benchmarks/results/SECTION.json, then RESULTS.md).

    python benchmarks/parity_sweep.py --model SmolLM2-135M-Instruct.Q4_1.gguf --section parity-smollm2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress import prune  # noqa: E402
from compress.adapters import get_adapter  # noqa: E402
from compress.loading import load_model, load_tokenizer  # noqa: E402
from compress.reference import CALIB_TEXT, MODEL_DIR  # noqa: E402
from compress.textdata import calibration_windows, load_text, token_stream  # noqa: E402
from _bench import parse_variant, record_options, save  # noqa: E402
from validation import parity  # noqa: E402
from validation.mutations import mutate  # noqa: E402
from validation.record import Run, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="folder or GGUF file")
    ap.add_argument("--section", default="parity-reference", help="name of the record and its RESULTS.md section")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda-sp", "flap"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--calib-windows", type=int, default=64)
    record_options(ap)
    args = ap.parse_args(argv)
    run = Run(args.section, [__file__, *(sys.argv[1:] if argv is None else argv)], args.note)

    model, tok = load_model(args.model), load_tokenizer(args.model)
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    calib = calibration_windows(token_stream(tok, load_text(CALIB_TEXT)), 256, args.calib_windows)
    rows = []
    for spec in args.methods:
        name, settings = parse_variant(spec)
        for ratio in args.ratios:
            t0 = time.perf_counter()
            result = prune(model, name, ratio, calib, **settings)
            checks = parity.run_parity(model, adapter, result.plan, result.replaced, calib)
            wrong_plan = mutate(result.plan, g, "index_off")
            if wrong_plan is None:
                raise ValueError(f"{spec} at {ratio:g} prunes no residual index or MLP channel: nothing to move")
            wrong = next(c for c in parity.run_parity(model, adapter, result.plan, result.replaced, calib,
                                                      targets=[("cpu", torch.float64)], slim_plan=wrong_plan)
                         if c.name == "equivalence")
            by = {c.name: c for c in checks}
            rows.append(dict(method=spec, ratio=ratio, equivalence=by["equivalence"].max_abs_diff,
                             identity=by["identity"].max_abs_diff, tokens_identical=by["generation"].passed,
                             checks="pass" if all(c.passed for c in checks) else "FAIL", wrong=wrong.max_abs_diff,
                             caught="caught" if not wrong.passed else "MISSED", seconds=time.perf_counter() - t0))
            print(rows[-1], flush=True)
    columns = [("method", "method"), ("ratio", "ratio", "g"), ("equivalence", "equivalence max diff", ".1e"),
               ("identity", "identity max diff", ".1e"), ("tokens_identical", "32 tokens identical"),
               ("checks", "checks"), ("wrong", "one index off: max diff", ".1e"), ("caught", "one index off"),
               ("seconds", "s", ".0f")]
    save(run, args, f"Parity sweep on {'the reference model' if args.model == MODEL_DIR else args.model.name}",
         f"{g.num_layers} layers, hidden {g.hidden}. Every method and ratio: the export's checks on CPU in float64 "
         f"(tolerance {parity.TOLERANCES['float64']:.0e}; generation = 32 greedy tokens of slim == masked dense), then "
         "the slim model built from the same plan with one kept index (of the first layer that prunes a residual "
         "set or MLP channels) moved to a pruned neighbour, which equivalence must fail. "
         f"Calibration {len(calib)} x 256 tokens.",
         [table(columns, rows)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
