"""Peak host memory of `compress export` against the dense checkpoint's size, in one run.

Writes a random-weight checkpoint of a real model's shape (bfloat16 safetensors; the values do
not matter for memory), then runs `compress export` on it once per method in a child process
and reads that child's peak resident set size from the kernel (wait4). A method that the
machine cannot hold is reported as killed, not hidden. Prints the table and writes the run's JSON
record (`--json`; by default benchmarks/results/SECTION.json, then RESULTS.md is rendered again).

    python benchmarks/memory.py --shape llama3.2-1b
    python benchmarks/memory.py --shape llama2-7b --methods flap flap:load-dtype=bfloat16 disp:steps=2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import record_options, save  # noqa: E402
from compress.commands.bench import SHAPES  # noqa: E402
from validation.record import Run, table  # noqa: E402


def write_checkpoint(shape: str, layers: int | None, folder: Path, dtype: torch.dtype) -> None:
    """A random-weight Llama of `shape` saved as safetensors with the reference tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from compress.reference import MODEL_DIR

    config = LlamaConfig(**{**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # built in `dtype`: no float32 copy
    model.save_pretrained(folder, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(folder)


def peak_of(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(peak RSS bytes, seconds, exit status) of a child process, read with wait4."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    ap.add_argument("--layers", type=int, default=None, help="shorten the shape to this many layers")
    ap.add_argument("--methods", nargs="+", default=["flap", "wanda-sp"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--parity-scope", default="auto", choices=["auto", "model", "layers"])
    ap.add_argument("--spill-share", type=float, default=None,
                    help="run the export with compress.memory.SPILL_SHARE set to this (0: streamed calibration "
                         "activations always go to disk), to measure what spilling saves")
    ap.add_argument("--section", default=None, help="name of the record and its RESULTS.md section (default: "
                                                    "memory-SHAPE)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint is written (default: a temp dir)")
    record_options(ap)
    args = ap.parse_args(argv)
    run = Run(args.section or f"memory-{args.shape}", [__file__, *(sys.argv[1:] if argv is None else argv)],
              args.note)

    work = Path(tempfile.mkdtemp(prefix="compress-memory-", dir=args.workdir))
    rows = []
    try:
        dense = work / "dense"
        # In a child process: a child's peak (maxrss) counts the parent's own peak memory too,
        # since the parent's memory map is what the child starts from; so the parent stays small.
        writer = multiprocessing.get_context("spawn").Process(
            target=write_checkpoint, args=(args.shape, args.layers, dense, getattr(torch, args.dtype)))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit(f"writing the {args.shape} checkpoint failed (exit {writer.exitcode})")
        size = sum(p.stat().st_size for p in dense.glob("*.safetensors"))
        print(f"checkpoint: {size / 1e9:.2f} GB in {dense}", flush=True)
        for method in args.methods:
            name, _, options = method.partition(":")  # e.g. flap:load-dtype=bfloat16 or disp:steps=2
            extra = [a for opt in filter(None, options.split(",")) for a in ("--" + opt.partition("=")[0],
                                                                            opt.partition("=")[2])]
            out = work / "slim"
            entry = ["-m", "compress.cli"] if args.spill_share is None else [
                "-c", f"import sys, compress.memory as m; m.SPILL_SHARE = {args.spill_share}; "
                      "from compress.cli import main; sys.exit(main())"]
            cmd = [sys.executable, *entry, "export", "--model", str(dense), "--method", name,
                   "--ratio", str(args.ratio), "--dtype", args.dtype, "--out", str(out), "--eval-windows", "0",
                   "--calib-samples", str(args.calib_samples), "--parity-scope", args.parity_scope, *extra]
            log = work / f"{name}.log"
            peak, seconds, code = peak_of(cmd, log)
            if code == 0:
                outcome = "ok"
            elif code == -signal.SIGKILL:
                outcome = "killed (out of memory)"
            else:
                outcome = f"failed: {log.read_text().strip().splitlines()[-1][:120]}"
            rows.append(dict(method=method, checkpoint_gb=size / 1e9, peak_gb=peak / 1e9, peak_over_checkpoint=peak / size,
                             seconds=seconds, outcome=outcome))
            print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    shape = SHAPES[args.shape]
    layers = args.layers or shape["num_hidden_layers"]
    columns = [("method", "method"), ("checkpoint_gb", "checkpoint GB", ".2f"), ("peak_gb", "peak GB", ".2f"),
               ("peak_over_checkpoint", "peak / checkpoint", ".2f"), ("seconds", "seconds", ".0f"),
               ("outcome", "outcome")]
    save(run, args, f"Peak memory of `compress export`: {args.shape} shape"
                    f"{'' if args.layers is None else f' cut to {layers} layers'}",
         f"Random-weight Llama ({layers} layers, hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, "
         f"vocab {shape['vocab_size']}) saved in {args.dtype}; `compress export --ratio {args.ratio} --dtype "
         f"{args.dtype} --calib-samples {args.calib_samples} --parity-scope {args.parity_scope} --eval-windows 0`"
         f"{'' if args.spill_share is None else f' with SPILL_SHARE = {args.spill_share}'} and each method's "
         "options; peak resident memory of the export process (the kernel's maxrss, read with wait4).",
         [table(columns, rows)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
