"""Export a slim folder to ONNX (with per-layer KV cache inputs/outputs) and check parity.

Writes DIR/onnx/ (float32) or DIR/onnx-float16/ (model.onnx, its external data, onnx_config.json describing the
cache; for a fused graph whose KV cache onnxruntime-genai can hold, also genai_config.json and the tokenizer) through
a staging folder, runs the onnxruntime runner against the slim PyTorch model (prefill, each
decode step, 32 greedy tokens) on CPU, and on CUDA when onnxruntime-gpu and a GPU are present,
and records the results in the folder's report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from compress.errors import CompressError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder written by `compress export`")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="ONNX model dtype")
    p.add_argument("--graph", default="auto", choices=["auto", "fused", "traced"],
                   help="fused: one node per fused onnxruntime operator (GroupQueryAttention, "
                        "SkipSimplifiedLayerNormalization; llama/mistral/qwen2-style models with head dimensions "
                        "that are multiples of 16), much faster to decode; traced: the dynamo exporter's graph, "
                        "any model; auto (default): fused where it can express the model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/onnx")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def onnx_dir(folder: Path, dtype: str) -> Path:
    return folder / ("onnx" if dtype == "float32" else f"onnx-{dtype}")


def export_folder_onnx(folder: Path, dtype: str = "float32", overwrite: bool = False, graph: str = "auto") -> list:
    """ONNX for an exported folder, parity-checked before it is moved into DIR/onnx."""
    from transformers import AutoModelForCausalLM

    from compress.reference import CALIB_TEXT
    from compress.textdata import load_text, token_stream, windows
    from compress.loading import load_tokenizer
    from exporters.hf_folder import staged_folder
    from exporters.onnx_export import export_onnx
    from exporters.onnx_fused import GENAI_NAME
    from validation.parity import onnx_checks, raise_on_failure

    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder}: not a model folder (no config.json)")
    slim = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()
    ids = windows(token_stream(load_tokenizer(folder), load_text(CALIB_TEXT)), 24, 1)
    with staged_folder(onnx_dir(folder, dtype), overwrite=overwrite) as staging:
        export_onnx(slim, staging, dtype=dtype, graph=graph)
        if (staging / GENAI_NAME).is_file():  # onnxruntime-genai reads the tokenizer from the same folder
            for name in TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, staging / name)
        checks = onnx_checks(slim, staging, dtype, ids)
        for c in checks:
            print("  parity " + c.line())
        raise_on_failure(checks)
    report_path = folder / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report.setdefault("onnx", {})[dtype] = [c.to_dict() for c in checks]
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    return checks


def run(args: argparse.Namespace) -> int:
    checks = export_folder_onnx(args.folder, args.dtype, args.overwrite, args.graph)
    print(f"wrote {onnx_dir(args.folder.resolve(), args.dtype)} ({len(checks)} parity checks passed)")
    return 0
