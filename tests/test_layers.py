"""Imports run one way: each module imports only modules of its own layer or of layers below it.

The layers, lowest first, follow the pipeline: what a plan is and the shared helpers; loading
models and text; calibration; the pruning methods; slimming; writing files (exporters); running
exported files (compress.runtime); checking them (validation); measuring speed; the pipeline
and publishing, which use all of these; the command line. A cycle between layers would make
the order in which modules are first imported matter (it did once); this test forbids it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "exporters", "validation")

LAYERS = [
    # what a plan and a model family are, the slim model's own files, shared helpers
    ["compress.errors", "compress.helpers", "compress.plan", "compress.adapters", "compress.slim",
     "compress.reference", "compress.texts", "compress.onnxruntime_import", "compress.memory",
     "compress.llamacpp_import", "compress.threads"],
    # reading and writing safetensors folders; loading models, GGUF files and text
    ["exporters.hf_folder", "compress.loading", "compress.gguf_folder", "compress.textdata", "compress.corpus",
     "compress.source"],
    ["compress.distributed", "compress.sharding"],
    ["compress.calibration", "compress.masking", "compress.slimming", "compress.training", "compress.checkpoint",
     "compress.stock"],
    ["compress.probe"],
    ["compress.methods", "compress.random_plan"],
    ["compress.recover"],
    ["exporters.onnx_export", "exporters.onnx_fused", "exporters.onnx_quant", "exporters.gguf_export",
     "exporters.gguf_tokenizer", "exporters.gguf_quantize"],
    ["compress.runtime"],
    ["validation"],
    ["compress.speed"],
    ["compress.pipeline", "exporters.hub", "exporters.model_card", "exporters.gguf_card"],
    ["compress.commands", "compress.cli", "compress.__main__"],
]


def layer_of(module: str) -> int:
    """The layer of the longest prefix of `module` listed in LAYERS (the package `compress` itself,
    whose names are the pipeline's, is on top)."""
    if module == "compress":
        return len(LAYERS) - 1
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py LAYERS")
    return found


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """Every project module a file imports, at top level or inside functions."""
    found, known = set(), modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from pkg import submodule` imports the submodule, not the package's names
                found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
    return {m for m in found if m in known and m.split(".")[0] in PACKAGES}


def test_imports_only_run_downwards():
    upward = []
    for module, path in sorted(modules().items()):
        if module == "compress.slim" or module.startswith("compress.slim."):  # the exported folder's own files: they import nothing of ours
            assert not imports(path), f"{module} must stand alone in an exported folder"
            continue
        for target in imports(path):
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("module", ["compress", "exporters", "validation", "compress.runtime.onnx_runner",
                                    "compress.plan", "validation.parity", "compress.pipeline"])
def test_each_package_imports_alone(module):
    """Imported first, in a fresh process, each package loads (no order between imports matters)."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)


def test_every_file_under_400_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in sorted(ROOT.glob("*/**/*.py"))
            if ".venv" not in p.parts and (n := len(p.read_text().splitlines())) >= 400]
    assert not long, long
