"""How many CPU threads a command computes with: the cores that are free now, never more.

torch starts one intra-op thread per core it may use, and every parallel operator waits for its
slowest thread. Where another job keeps one of two cores busy, torch's two threads share the one
free core: a DISP training step took 3.2 s instead of 0.19 s (17x). So the default is the cores
this process may run on (its CPU affinity) minus the cores busy right now, and at least one.

"Busy right now" is read from /proc/stat twice, 0.2 s apart: the time each allowed core spent
outside idle and iowait, summed over the cores and rounded (one job spinning on a core counts
one). Not the 1-minute load average: it lags a job that starts or stops by about a minute, and
it counts threads waiting for a core or for I/O, not cores in use. Where /proc/stat cannot be
read (not Linux), the load average stands in. The processes of one launch (torchrun's
LOCAL_WORLD_SIZE) share the free cores; OMP_NUM_THREADS, when set, caps the choice: whoever set it
already said how many threads this process may use.

Imports no torch at module level (the command line's parser uses `add_threads_argument`);
the ONNX runner reads `chosen_threads` so onnxruntime uses the same count.
"""

from __future__ import annotations

import argparse
import os
import time

__all__ = ["add_threads_argument", "choose_threads", "use_threads", "chosen_threads", "free_cores"]

SAMPLE_SECONDS = 0.2
_chosen: int | None = None  # what `use_threads` set in this process


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """--threads, for every command that computes."""
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="CPU threads for torch and onnxruntime (default: the cores free now: this process's "
                        "cores minus those busy, at least 1, at most OMP_NUM_THREADS when set)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, at least 1, got {text!r}")
    return int(text)


def _allowed_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _core_times(cores: list[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies of each core in `cores` since boot, from /proc/stat."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                times[int(name[3:])] = (sum(values) - values[3] - values[4], sum(values))
    return times


def _busy_cores(cores: list[int], seconds: float) -> float:
    """Cores' worth of time the allowed cores spent busy over the last `seconds`."""
    try:
        before = _core_times(cores)
        time.sleep(seconds)
        after = _core_times(cores)
    except OSError:
        return min(float(len(cores)), os.getloadavg()[0])
    return sum((after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]) for c in after if c in before)


def free_cores(seconds: float = SAMPLE_SECONDS) -> tuple[int, int]:
    """(cores this process may run on, of those the number busy now)."""
    cores = _allowed_cores()
    return len(cores), min(len(cores), round(_busy_cores(cores, seconds)))


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why): `requested` as given, else the free cores capped by OMP_NUM_THREADS."""
    if requested is not None:
        return requested, "--threads"
    cores, busy = free_cores()
    n, why = max(1, cores - busy), f"{cores} cores, {busy} busy"
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "")
    if ranks.isdigit() and int(ranks) > 1:
        n, why = max(1, n // int(ranks)), f"{why}, shared by {ranks} processes"
    cap = os.environ.get("OMP_NUM_THREADS", "")
    if cap.isdigit() and 0 < int(cap) < n:
        n, why = int(cap), f"{why}; OMP_NUM_THREADS={cap}"
    return n, why


def use_threads(requested: int | None = None) -> int:
    """Set torch's threads (intra-op to the choice, inter-op to 1, so torch never runs more
    threads than the choice), print the choice in one line, and return it."""
    import torch

    global _chosen
    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # settable once per process, before any inter-op work: already fixed
            pass
    _chosen = n
    print(f"threads: {n} ({why})")
    return n


def chosen_threads() -> int | None:
    """The count `use_threads` set in this process, or None (then onnxruntime keeps its own default)."""
    return _chosen
