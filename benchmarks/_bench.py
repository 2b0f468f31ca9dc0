"""What the benchmark scripts share: their --json / --note options, writing a run's record (and
rendering RESULTS.md again when it lands in benchmarks/results/), and `name:key=value` method
variants. Standard library and validation.record only, so a script importing it pays for nothing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # render_results
sys.path.insert(0, str(HERE.parent))  # validation
from validation.record import Run  # noqa: E402

RESULTS_DIR = HERE / "results"


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
    """Write the run's record to --json (or results/SECTION.json), print its section and, when the
    record landed in benchmarks/results/, render RESULTS.md again."""
    import render_results

    path = args.json or RESULTS_DIR / f"{run.section}.json"
    rec = run.write(path, title, text, tables, **kw)
    print("\n" + "\n".join(render_results.render_section(rec)))
    if path.resolve().parent == RESULTS_DIR:
        render_results.main([])
    return rec
