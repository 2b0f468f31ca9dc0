"""Data-parallel DISP: training steps/s and tokens/s with 1 and 2 processes of one thread each.

    python benchmarks/distributed.py --model SmolLM2-135M-Instruct.Q4_1.gguf --steps 20

Each configuration runs under torchrun (`--nproc-per-node 1`, then 2) with OMP_NUM_THREADS=1, at
the same global batch and seed: every worker (this file with --worker) loads the model, takes the
calibration windows of the reference model's calibration text (what is measured is speed, not
quality), and trains DISP for --steps steps, each process on its share of every batch. Rank 0
times the steps from the end of the first (which allocates) to the end of the last. The record
keeps the machine's load: on a shared machine the processes compete with everything else on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere
sys.path.insert(0, str(HERE))
from _bench import record_options, save  # noqa: E402
from validation.record import Run, table  # noqa: E402

PROCESSES = (1, 2)


def worker(args) -> None:
    """One rank: DISP for --steps steps; rank 0 writes {seconds, steps, loss} to --result."""
    import torch

    from compress.adapters import get_adapter
    from compress.checkpoint import Checkpoint
    from compress.distributed import join
    from compress.loading import load_model, load_tokenizer
    from compress.methods.disp import DISP
    from compress.reference import CALIB_TEXT
    from compress.textdata import calibration_windows, load_text, token_stream

    world, _ = join(torch.device("cpu"))
    model, tok = load_model(args.model), load_tokenizer(args.model)
    calib = calibration_windows(token_stream(tok, load_text(CALIB_TEXT)), args.seq_len, args.calib_windows)
    disp = DISP(steps=args.steps + 1, batch_size=args.batch_size)
    disp.world = world
    ends, after_step = [], Checkpoint.after_step

    def timed(self, step, steps, extra):  # the end of every step
        ends.append(time.perf_counter())
        return after_step(self, step, steps, extra)

    Checkpoint.after_step = timed
    disp.prune(model, get_adapter(model.config), 0.5, calib, seed=0)
    if world.writer:
        Path(args.result).write_text(json.dumps({"seconds": ends[-1] - ends[0], "steps": len(ends) - 1,
                                                 "loss": disp.trace[-1][1]}))
    world.close()


def measure(args, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               __file__, "--worker", "--result", str(result), "--model", args.model, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--calib-windows", str(args.calib_windows)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        r = json.loads(result.read_text())
    steps_s = r["steps"] / r["seconds"]
    return {"processes": processes, "threads": 1, "steps": r["steps"], "seconds": round(r["seconds"], 1),
            "steps_s": steps_s, "tokens_s": steps_s * args.batch_size * args.seq_len, "loss": r["loss"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="dense model: folder, Hub id or GGUF file")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (one more runs first, untimed)")
    ap.add_argument("--batch-size", type=int, default=4, help="global batch, split over the processes")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    record_options(ap)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    run = Run("distributed", notes=[*args.note, f"uptime at the start: {uptime}"])
    rows = [measure(args, n) for n in PROCESSES]
    for row in rows:
        row["speedup"] = row["steps_s"] / rows[0]["steps_s"]
    text = (f"DISP training on {Path(args.model).name}: {args.steps} timed steps of a global batch of "
            f"{args.batch_size} x {args.seq_len} tokens, one torch thread per process, processes started by "
            "torchrun (gloo), the hypernetwork's gradients averaged by DDP. The last column is the training "
            "loss of the last step (equal within float rounding: the processes train what one does).")
    cols = [("processes", "processes"), ("threads", "threads each"), ("steps", "steps"), ("seconds", "s"),
            ("steps_s", "steps/s", ".3f"), ("tokens_s", "tokens/s", ".0f"), ("speedup", "speedup", ".2f"),
            ("loss", "last loss", ".4f")]
    save(run, args, "Data-parallel DISP, 1 and 2 processes", text, [table(cols, rows)])


if __name__ == "__main__":
    main()
