"""The README cannot drift from the code: its tolerance table is rendered from the parity module's
own tables, every command line in it parses, every module, name and file it cites exists."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT / "benchmarks"))
import render_results  # noqa: E402


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) < 250


def test_tolerance_table_is_the_code_s():
    """The table between the markers is what `render_results.py --readme` makes of
    TOLERANCES, ONNX_TOLERANCES and NOISE_FACTOR; fix with that command."""
    text = README.read_text()
    want = render_results.readme_with_tolerances(text, render_results.tolerance_table(*render_results.parity_tables()))
    assert text == want, "README.md's tolerance table is stale: run python benchmarks/render_results.py --readme"


def test_tolerance_table_shows_each_tolerance():
    """The renderer puts the numbers of the tables it is given in the table (not fixed text)."""
    table = render_results.tolerance_table({"float64": 3e-7, "float16": 5e-3, "bfloat16": 0.25},
                                           {"float32": 2e-5, "float16": 7e-3}, 6)
    for shown in ("3e-7", "5e-3 / 2.5e-1", "max(2e-5, 6 x", "max(7e-3, 6 x"):
        assert shown in table


def command_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("compress "):
                    lines.append(part.strip())
    return lines


def test_every_command_line_parses():
    from compress.cli import build_parser

    lines = command_lines()
    assert len(lines) > 10
    parser = build_parser()
    for line in lines:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"README command does not parse: {line}")


def test_python_examples_import():
    """Every import in the README's Python blocks works (the names exist where it says)."""
    for block in blocks("python"):
        for line in block.splitlines():
            if line.startswith(("from ", "import ")):
                exec(line, {})


def test_cited_modules_names_and_files_exist():
    text = README.read_text()
    for dotted in set(re.findall(r"`((?:compress|exporters|validation)(?:\.\w+)+)", text)):
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                continue
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"README cites {dotted}: {'.'.join(parts[:i])} has no {attr}"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"README cites {dotted}, which does not import")
    paths = re.findall(r"`((?:compress|exporters|validation|tests|examples|benchmarks|\.ci)/[\w./-]*)`", text)
    paths += re.findall(r"\]\(((?!https?:)[^)#]+)\)", text)
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), f"README cites {path}, which is not in the repository"


def test_nothing_outside_the_repository():
    text = README.read_text()
    assert "../" not in text and "shared/" not in text
