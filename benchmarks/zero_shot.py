"""Zero-shot accuracy of one model with lm-evaluation-harness, task by task, as a JSON record.

Runs validation.zero_shot on each task (the model loaded once per task, so each task's wall time
is its own; --jobs N runs N tasks at once, each in a process of its own), prints the table and writes benchmarks/results/SECTION.json, from which
benchmarks/render_results.py renders RESULTS.md. Offline: the tasks read benchmarks/data/.

    OMP_NUM_THREADS=1 python benchmarks/zero_shot.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --limit 300 --section zero-shot-smollm2
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from validation.record import Run, table  # noqa: E402
from validation.zero_shot import DEFAULT_TASKS, zero_shot  # noqa: E402
from validation.zero_shot_tasks import DEFAULT_DATA_DIR, TASKS  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = [("task", "task"), ("items", "items"), ("acc", "acc (%)", ".1f"), ("acc_stderr", "± (%)", ".1f"),
           ("acc_norm", "acc_norm (%)", ".1f"), ("acc_norm_stderr", "± (%)", ".1f"), ("wall_s", "wall (s)", ".0f"),
           ("file", "data file")]


def _percent(x):
    return None if x is None else 100 * x


def task_row(task: str, f: dict) -> dict:
    """One task's row of COLUMNS (all but the wall time) from validation.zero_shot's figures, in percent."""
    return {"task": task, "items": f"{f['items']} of {f['of']}", "acc": _percent(f.get("acc")),
            "acc_stderr": _percent(f.get("acc_stderr")), "acc_norm": _percent(f.get("acc_norm")),
            "acc_norm_stderr": _percent(f.get("acc_norm_stderr")), "file": f["data"]["file"]}


def _one(task: str, args: argparse.Namespace) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = zero_shot(args.model, [task], args.limit, args.task_data, batch_size=args.batch_size,
                    trust_remote_code=args.trust_remote_code)
    return res, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, Hub id or GGUF file")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(TASKS))
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (all when not given)")
    p.add_argument("--task-data", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--jobs", type=int, default=1, help="tasks run at once, one process each")
    p.add_argument("--trust-remote-code", action="store_true", help="for slim folders (our own model code)")
    p.add_argument("--section", default="zero-shot", help="the record's name: benchmarks/results/SECTION.json")
    p.add_argument("--note", action="append", default=[], help="a note kept with the record (repeatable)")
    args = p.parse_args(argv)

    run = Run(args.section, argv=None if argv is None else [sys.argv[0], *argv], notes=args.note)
    rows, results = [], {}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(_one, args.tasks, [args] * len(args.tasks)))
    for task, (res, wall) in zip(args.tasks, done):
        f = results[task] = {**res["tasks"][task], "wall_s": round(wall, 1)}
        rows.append({**task_row(task, f), "wall_s": wall})
        print(f"{task}: {rows[-1]}", flush=True)
    text = (f"Zero-shot accuracy of `{Path(args.model).name}` with lm-evaluation-harness {res['lm_eval']} "
            f"(validation/zero_shot.py: lm-eval's own task configs on the local files of benchmarks/data/), "
            + (f"the first {args.limit} items of each task" if args.limit else "every item of each task")
            + f", batch size {args.batch_size}, float32 on CPU. ± is lm-eval's standard error of the mean; "
              "acc_norm divides each choice's log-likelihood by its length in characters. Wall time includes "
              f"loading the model (and, for a process's first task, importing torch and lm-eval); {args.jobs} "
              "task(s) ran at once, one thread each.")
    run.write(RESULTS_DIR / f"{args.section}.json", title=f"Zero-shot accuracy: {Path(args.model).name}",
              text=text, tables=[table(COLUMNS, rows)],
              data={"model": str(args.model), "limit": args.limit, "tasks": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
