"""A benchmark's output as a JSON record: its tables, with the command line, date, machine and
library versions that produced them.

Every benchmark script (benchmarks/*.py) and `compress bench --json PATH` write one record per
run; benchmarks/results/<section>.json holds the latest run of each section, and
benchmarks/render_results.py turns those files into benchmarks/RESULTS.md. Standard library
only, so writing a record costs nothing and needs nothing the benchmark did not already load.

    run = Run("parity-reference")                 # at the start: the clock, the load average
    ...
    run.write(path, title="Parity sweep on the reference model", text="What was measured ...",
              tables=[table([("method", "method"), ("diff", "max diff", ".1e")], rows)])
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

__all__ = ["SCHEMA", "Run", "table", "machine", "versions", "command_line"]

SCHEMA = 1
# Distributions whose versions a record keeps (absent ones are recorded as null).
DISTRIBUTIONS = ("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "llama_cpp_python",
                 "compress-llm")
# Environment variables that change what a benchmark measures, kept with its command line.
ENVIRONMENT = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
ROOT = Path(__file__).resolve().parent.parent


def table(columns: list[tuple], rows: list[dict], caption: str | None = None) -> dict:
    """A table of a record: `columns` as (key, label) or (key, label, format spec for numbers);
    `rows` as dicts by key, raw values (numbers stay numbers; None renders as '-')."""
    cols = [{"key": c[0], "label": c[1], **({"format": c[2]} if len(c) > 2 and c[2] else {})} for c in columns]
    return {**({"caption": caption} if caption else {}), "columns": cols, "rows": rows}


def machine() -> dict:
    """Cores, CPU model, memory and operating system of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": None if memory is None else round(memory / 2**30, 1),
            "system": f"{platform.system()} {platform.release()}"}


def versions() -> dict:
    """Python's and the installed distributions' versions (null where not installed)."""
    out = {"python": platform.python_version()}
    for name in DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as typed from the repository root: the environment variables that
    matter, then `python benchmarks/x.py ...` (or `compress ...` for the console script)."""
    argv = list(sys.argv if argv is None else argv)
    head = Path(argv[0]) if argv else Path("?")
    try:
        head = head.resolve().relative_to(ROOT)
        prog = ["python", str(head)]
    except ValueError:
        prog = [head.name]
    if head.name in ("compress", "cli.py", "__main__.py"):
        prog = ["compress"]
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENVIRONMENT if k in os.environ]
    return " ".join(env + [shlex.join(prog + argv[1:])])


def _git_commit() -> dict:
    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": None if changed is None else bool(changed)}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class Run:
    """One benchmark run: started when built (time, load average, git commit), written once done."""

    def __init__(self, section: str, argv: list[str] | None = None, notes: list[str] | None = None):
        self.section = section
        self.command = command_line(argv)
        self.notes = list(notes or [])
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.t0 = time.perf_counter()
        self.load_start = _load()
        self.source = _git_commit()

    def record(self, title: str, text: str, tables: list[dict], device: str | None = None,
               data: dict | None = None) -> dict:
        """The record: `text` says what was measured and how (markdown), `tables` its results,
        `device` what ran it where that is not just the CPU, `data` anything else worth keeping raw."""
        m = machine()
        m.update(load_average_start=self.load_start, load_average_end=_load())
        if device:
            m["device"] = device
        return {
            "schema": SCHEMA,
            "section": self.section,
            "title": title,
            "command": self.command,
            "started": self.started.isoformat(timespec="seconds"),
            "date": self.started.date().isoformat(),
            "wall_s": round(time.perf_counter() - self.t0, 1),
            "machine": m,
            "versions": versions(),
            "source": self.source,
            "notes": self.notes,
            "text": text,
            "tables": tables,
            **({"data": data} if data else {}),
        }

    def write(self, path: str | Path, title: str, text: str, tables: list[dict], **kw) -> dict:
        """Write the record as JSON to `path` (folders created) and return it."""
        rec = self.record(title, text, tables, **kw)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
        print(f"record: {path}", flush=True)
        return rec
