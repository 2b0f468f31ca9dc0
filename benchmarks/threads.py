"""Seconds per DISP training step at the old thread count (torch's default: one thread per core)
and at the command line's default (`compress.threads`: the cores free now), on the machine as it
is and beside one more busy core (a `python -c "while True: pass"` burner this script starts and
stops). The four runs of a round are taken in turn, round after round, so each ratio compares
runs made side by side on a machine that other jobs may share; medians over rounds.

    python benchmarks/threads.py                                   # the reference model
    python benchmarks/threads.py --model SmolLM2-135M-Instruct.Q4_1.gguf --steps 4 --rounds 2

The step is `compress export --method disp`'s (batch 4 x 256 tokens), timed between optimizer
steps (a global optimizer hook), the first `--warmup` steps of each run left out.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from _bench import Run, record_options, save
from compress.loading import load_model, load_tokenizer
from compress.pipeline import prune
from compress.texts import default_calibration
from compress.textdata import calibration_windows, load_text, token_stream
from compress.threads import choose_threads
from validation.record import table

OLD = 2  # torch's default on the two-core machine of the report: one thread per core


def step_seconds(model, calib, threads: int, steps: int, warmup: int) -> float:
    """Median seconds per DISP training step at `threads` torch threads, steps `warmup` + 1 on (the
    end of each step is stamped, so a step's time is the gap after the previous one's end)."""
    torch.set_num_threads(threads)
    stamps = []
    handle = register_optimizer_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
    try:
        prune(model, "disp", 0.5, calib, steps=warmup + steps)
    finally:
        handle.remove()
    return statistics.median(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))


def burner() -> subprocess.Popen:
    """One more busy core: a process spinning until stopped (by its own id)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(1.0)  # running, and seen by /proc/stat
    return proc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="dense model (default: the shipped reference model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed DISP steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="DISP steps per run before the timed ones (at least 1)")
    ap.add_argument("--section", default="threads")
    record_options(ap)
    args = ap.parse_args(argv)
    run = Run(args.section, notes=args.note)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    ids = token_stream(tokenizer, load_text(default_calibration(args.model).path))
    calib = calibration_windows(ids, 256, 16)
    times: dict[tuple[str, str], list[float]] = {}
    chosen: dict[str, set[str]] = {}
    for r in range(args.rounds):
        for condition in ("as is", "one more busy core"):
            proc = burner() if condition != "as is" else None
            try:
                new, why = choose_threads()
                chosen.setdefault(condition, set()).add(f"{new} ({why})")
                for label, n in (("old: 2 threads", OLD), (f"new: {new} thread(s)", new)):
                    key = (condition, label.split(":")[0])
                    times.setdefault(key, []).append(step_seconds(model, calib, n, args.steps, args.warmup))
                    print(f"round {r + 1}, {condition}, {label}: {times[key][-1]:.3f} s/step", flush=True)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait()
    rows = []
    for condition in ("as is", "one more busy core"):
        old, new = times[(condition, "old")], times[(condition, "new")]
        ratios = [o / n for o, n in zip(old, new)]  # each round's pair, taken side by side
        rows.append({"condition": condition, "new_threads": "; ".join(sorted(chosen[condition])),
                     "old_s": statistics.median(old), "new_s": statistics.median(new),
                     "ratio": statistics.median(ratios), "ratios": ", ".join(f"{x:.2f}" for x in ratios)})
    name = args.model or "the reference model"
    save(run, args, title=f"Threads: seconds per DISP step on {name}, old (2 threads) vs new default",
         text=(f"Seconds per DISP training step (batch 4 x 256 tokens, median of {args.steps} steps after "
               f"{args.warmup}, median over {args.rounds} rounds) at 2 torch threads (the old behaviour: one "
               "per core on a two-core machine) and at the command line's new default (the cores free when "
               "the run starts, `compress.threads`), on the machine as it was and beside one more busy core "
               "(a spinning Python process). Ratio: old / new seconds per step, each round's pair measured "
               "side by side; above 1, the new default is faster."),
         tables=[table([("condition", "machine"), ("new_threads", "new default chose"),
                        ("old_s", "old s/step", ".3f"), ("new_s", "new s/step", ".3f"),
                        ("ratio", "old / new", ".2f"), ("ratios", "per round")], rows)])


if __name__ == "__main__":
    main()
