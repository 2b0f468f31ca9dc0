"""The command line as a new user meets it: a fast, torch-free parser with --version and honest
help, a thread count that fits the free cores, and an export folder others can read, that
replaces only what this tool wrote and leaves nothing in the Hugging Face modules cache."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from compress import threads
from compress.cli import _HelpFormatter, build_parser, main
from test_pipeline import save_dense
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--method", "magnitude", "--calib-samples", "4", "--seq-len", "32", "--eval-windows", "0", "--threads", "1"]


def subcommands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def test_parser_and_help_import_no_torch():
    """Building the parser, every command's --help and an argument error run without torch or
    transformers (they cost seconds to import); not timed, counted in sys.modules."""
    code = ("import contextlib, io, sys\n"
            "from compress.cli import COMMANDS, main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    codes = [main([name, '--help']) for name in COMMANDS]\n"
            "    codes += [main(['--help']), main(['--version']), main(['export', '--ratio', 'half', '--out', 'x'])]\n"
            "print(set(codes[:-1]), codes[-1], sorted(m for m in ('torch', 'transformers', 'onnxruntime') "
            "if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "{0} 2 []", done.stdout + done.stderr


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"compress {version('compress-llm')}"


def test_argument_error_is_one_line(capsys):
    assert main(["export", "--out", "x", "--ratio", "half"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --ratio: invalid float value: 'half'"), err


def test_each_option_states_its_default_once():
    """argparse appends "(default: X)"; a help text that also says it printed it twice."""
    twice = []
    for name, sub in subcommands().items():
        for action in sub._actions:
            text = (_HelpFormatter(sub.prog)._get_help_string(action) or "").replace("%(default)s", "X")
            if len(re.findall(r"\bdefault\b", text)) > 1:
                twice.append(f"{name} {action.option_strings}: {text}")
    assert not twice, "\n".join(twice)


def test_options_describe_as_many_values_as_they_take():
    for sub in subcommands().values():
        for action in sub._actions:
            if isinstance(action.nargs, int) and isinstance(action.metavar, tuple):
                assert len(action.metavar) == action.nargs
                assert all(m in action.help for m in action.metavar), action.help


def test_shared_method_options_are_not_filed_under_one_method():
    groups = {g.title: [a.dest for a in g._group_actions] for g in subcommands()["export"]._action_groups}
    shared = next(title for title, dests in groups.items() if "head_granularity" in dests)
    assert "calib_batch_size" in groups[shared]
    assert all(m in shared for m in ("magnitude", "wanda-sp", "flap", "tyr")), shared


def test_every_method_is_described_and_its_defaults_are_the_options():
    from compress.methods import METHODS
    from compress.methods.options import DEFAULTS, DESCRIPTIONS

    assert set(DESCRIPTIONS) == set(METHODS) == set(DEFAULTS)
    assert all(METHODS[name].defaults is DEFAULTS[name] for name in METHODS)
    epilog = subcommands()["export"].epilog
    assert all(re.search(rf"^  {re.escape(name)} +\S", epilog, re.M) for name in METHODS), epilog


@pytest.mark.parametrize("cores, busy, env, want", [
    ([0, 1], 1.0, {}, (1, "2 cores, 1 busy")),  # the user's machine: one job beside us
    ([0, 1], 0.1, {}, (2, "2 cores, 0 busy")),
    ([0, 1], 2.0, {}, (1, "2 cores, 2 busy")),  # never fewer than one
    ([0, 1, 2, 3], 1.2, {}, (3, "4 cores, 1 busy")),
    ([0, 1, 2, 3], 0.0, {"OMP_NUM_THREADS": "2"}, (2, "4 cores, 0 busy; OMP_NUM_THREADS=2")),
    ([*range(8)], 0.0, {"LOCAL_WORLD_SIZE": "2"}, (4, "8 cores, 0 busy, shared by 2 processes")),  # torchrun
])
def test_default_threads_are_the_free_cores(cores, busy, env, want, monkeypatch):
    monkeypatch.setattr(threads, "_allowed_cores", lambda: cores)
    monkeypatch.setattr(threads, "_busy_cores", lambda c, seconds: busy)
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, env.get(name, ""))
    assert threads.choose_threads() == want
    assert threads.choose_threads(5) == (5, "--threads")


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="no /proc/stat (not Linux)")
def test_busy_cores_read_from_proc_stat():
    cores = threads._allowed_cores()
    assert 0.0 <= threads._busy_cores(cores, 0.05) <= len(cores) + 1e-9


def test_use_threads_sets_torch_and_says_so(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(threads, "free_cores", lambda: (2, 1))
    monkeypatch.setattr(threads, "_chosen", None)  # restored after: onnxruntime sessions read it
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    try:
        assert threads.use_threads() == 1 and torch.get_num_threads() == 1 and threads.chosen_threads() == 1
        assert capsys.readouterr().out == "threads: 1 (2 cores, 1 busy)\n"
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return save_dense(tiny_model("llama"), tmp_path_factory.mktemp("dense") / "dense")


def module_copies(name: str) -> list[str]:
    """Folders under the Hugging Face modules cache named after a folder called `name` (its staging
    folders too); other jobs sharing the cache add their own, which this leaves out."""
    from transformers.utils import HF_MODULES_CACHE, TRANSFORMERS_DYNAMIC_MODULE_NAME

    folder = Path(HF_MODULES_CACHE) / TRANSFORMERS_DYNAMIC_MODULE_NAME
    stem = name.replace("-", "_hyphen_")  # transformers' module names of NAME and of ".NAME.staging-..."
    return [p.name for p in folder.iterdir() if p.name.startswith((stem, "_dot_" + stem))] if folder.is_dir() else []


def test_export_is_readable_by_others_leaves_no_module_copy_and_overwrites_only_its_own(dense, tmp_path):
    out = tmp_path / "front-door-slim"  # a name no other job's folders have
    mask = os.umask(0o022)
    try:
        assert main(["export", "--model", str(dense), "--ratio", "0.3", "--out", str(out), *QUICK]) == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not mkdtemp's 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert module_copies(out.name) == []  # the files check loaded the staging folder's code: its copy is gone
    (out / "report.md").unlink()
    assert main(["export", "--model", str(dense), "--ratio", "0.3", "--out", str(out), "--overwrite", *QUICK]) == 0
    assert (out / "report.md").is_file() and module_copies(out.name) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no staging or old folder left


def test_overwrite_takes_an_empty_folder(dense, tmp_path):
    (tmp_path / "out").mkdir()
    assert main(["export", "--model", str(dense), "--ratio", "0.3", "--out", str(tmp_path / "out"), "--overwrite",
                 *QUICK]) == 0
    assert (tmp_path / "out" / "plan.json").is_file()
