"""Data-parallel DISP: training steps/s and tokens/s with 1 and 2 processes of one thread each, and
(--memory) each process's memory against the dry-run plan, replicated and sharded (FSDP2).

    python benchmarks/distributed.py --model SmolLM2-135M-Instruct.Q4_1.gguf --steps 20
    python benchmarks/distributed.py --model SmolLM2-135M-Instruct.Q4_1.gguf --steps 3 --memory

--memory: each rank resets its peak resident memory (Linux /proc/self/clear_refs) once the model
is loaded, trains, and reports the peak's rise over the resident memory before training; beside
it the plan (`compress export --dry-run --world-size N`, compress.methods.disp_memory) of what
training adds on this CPU run: replicated, the step's tensors; sharded, also the FSDP2 copy's
weights (the loaded model stays in host memory, so on a CPU sharding adds rather than saves; on
CUDA the device holds only the plan's "per device" column).

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
    world.shard = args.shard
    model, tok = load_model(args.model), load_tokenizer(args.model)
    calib = calibration_windows(token_stream(tok, load_text(CALIB_TEXT)), args.seq_len, args.calib_windows)
    disp = DISP(steps=args.steps + 1, batch_size=args.batch_size)
    disp.world = world
    ends, after_step = [], Checkpoint.after_step

    def timed(self, step, steps, extra):  # the end of every step
        ends.append(time.perf_counter())
        return after_step(self, step, steps, extra)

    Checkpoint.after_step = timed
    before = _resident("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    plan = disp.prune(model, get_adapter(model.config), 0.5, calib, seed=0).plan
    Path(f"{args.result}.{world.rank}").write_text(json.dumps({
        "seconds": ends[-1] - ends[0], "steps": len(ends) - 1, "loss": disp.trace[-1][1],
        "added": _resident("VmHWM") - before, "kept": _kept(plan, get_adapter(model.config).geometry())}))


def _kept(plan, g) -> list[bool]:
    """Every channel of every structure of the plan: kept or not."""
    from compress.masking import plan_masks

    widths = {"attn_in": g.hidden, "attn_out": g.hidden, "mlp_in": g.hidden, "mlp_out": g.hidden,
              "heads": g.num_heads, "mlp_hidden": g.intermediate}
    return [bool(v) for m in plan_masks(plan, g) for k, n in widths.items()
            for v in (getattr(m, k) if getattr(m, k) is not None else [1.0] * n)]
    world.close()


def _resident(field: str) -> int:
    """Bytes of this process's resident memory now (VmRSS) or at its peak (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(args, processes: int, shard: str = "replicate") -> list[dict]:
    """One row per rank (rank 0's first): its timing, last loss and memory added by training."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               __file__, "--worker", "--result", str(result), "--model", args.model, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--calib-windows", str(args.calib_windows), "--shard", shard]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(processes)]
    rows = []
    for rank, r in enumerate(ranks):
        steps_s = r["steps"] / r["seconds"]
        rows.append({"processes": processes, "shard": shard, "rank": rank, "threads": 1, "steps": r["steps"],
                     "seconds": round(r["seconds"], 1), "steps_s": steps_s,
                     "tokens_s": steps_s * args.batch_size * args.seq_len, "loss": r["loss"], "added": r["added"],
                     "kept": r["kept"]})
    return rows


def _same_plan(rows: list[dict]) -> None:
    """Each row's kept-set agreement with the first row's (one process): the share of channels
    both keep or both drop."""
    first = rows[0]["kept"]
    for row in rows:
        row["overlap"] = sum(a == b for a, b in zip(first, row.pop("kept"))) / len(first)


def memory(args, run) -> None:
    """Each rank's measured rise against the plan, 1 process and 2 (replicated, sharded)."""
    import torch

    from compress.loading import load_config
    from compress.methods.disp_memory import training_memory

    config = load_config(args.model)
    rows = []
    for n, shard in ((1, "replicate"), (2, "replicate"), (2, "fsdp")):
        plan = training_memory(config, torch.float32, {}, args.batch_size, args.seq_len, n)
        fsdp = shard == "fsdp"
        device = plan["plain_fsdp" if fsdp else "plain"]
        added = device if fsdp else device - plan["weights"]  # on this CPU run: the host copy stays
        for row in measure(args, n, shard):
            rows.append({**row, "device": device / 1e9, "planned": added / 1e9, "measured": row["added"] / 1e9,
                         "ratio": row["added"] / added})
    _same_plan(rows)
    text = (f"DISP training on {Path(args.model).name}, float32 on CPU: {args.steps} steps of a global batch of "
            f"{args.batch_size} x {args.seq_len} tokens, one torch thread per process (gloo). Per device: the "
            "plan's step total a device holds (replicated: the whole model and the step's tensors; sharded: "
            "1/N of the weights, the embedding and LM head and two layers whole, and the step's tensors). "
            "Planned and measured: what training adds to a process's resident memory on this CPU run (the "
            "loaded model stays in host memory, so sharded adds the FSDP2 copy's weights), measured as the rise "
            "of the peak resident memory over the resident memory before training.")
    cols = [("processes", "processes"), ("shard", "shard"), ("rank", "rank"), ("device", "per device, planned (GB)",
            ".3f"), ("planned", "added, planned (GB)", ".3f"), ("measured", "added, measured (GB)", ".3f"),
            ("ratio", "measured / planned", ".2f"), ("steps_s", "steps/s", ".3f"), ("loss", "last loss", ".4f"),
            ("overlap", "same kept channels as 1 process", ".4f")]
    save(run, args, "Memory per process, replicated and sharded", text, [table(cols, rows)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="dense model: folder, Hub id or GGUF file")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (one more runs first, untimed)")
    ap.add_argument("--batch-size", type=int, default=4, help="global batch, split over the processes")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--memory", action="store_true", help="each process's memory against the plan, section "
                    "distributed-memory")
    ap.add_argument("--shard", default="replicate", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    record_options(ap)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    run = Run("distributed-memory" if args.memory else "distributed",
              notes=[*args.note, f"uptime at the start: {uptime}"])
    if args.memory:
        return memory(args, run)
    rows = [measure(args, n)[0] for n in PROCESSES]
    _same_plan(rows)
    for row in rows:
        row["speedup"] = row["steps_s"] / rows[0]["steps_s"]
    text = (f"DISP training on {Path(args.model).name}: {args.steps} timed steps of a global batch of "
            f"{args.batch_size} x {args.seq_len} tokens, one torch thread per process, processes started by "
            "torchrun (gloo), the hypernetwork's gradients averaged by DDP. Last loss: the training loss of the "
            "last step (equal within float rounding: the processes train what one does); same kept channels: "
            "the share of channels the plan after the last step keeps or drops as one process's plan does.")
    cols = [("processes", "processes"), ("threads", "threads each"), ("steps", "steps"), ("seconds", "s"),
            ("steps_s", "steps/s", ".3f"), ("tokens_s", "tokens/s", ".0f"), ("speedup", "speedup", ".2f"),
            ("loss", "last loss", ".4f"), ("overlap", "same kept channels as 1 process", ".4f")]
    save(run, args, "Data-parallel DISP, 1 and 2 processes", text, [table(cols, rows)])


if __name__ == "__main__":
    main()
