"""Export a slim folder to ONNX (with per-layer KV cache inputs/outputs) and check parity.

Writes DIR/onnx/ (float32) or DIR/onnx-float16/ (with int4 weights: DIR/onnx-int4/; model.onnx,
its external data, onnx_config.json describing the cache; for a fused graph whose KV cache
onnxruntime-genai can hold, also genai_config.json and the tokenizer) through a staging folder, runs the onnxruntime runner against the slim PyTorch model (prefill, each
decode step, 32 greedy tokens) on CPU, and on CUDA when onnxruntime-gpu and a GPU are present,
and records the results in the folder's report.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from compress.errors import CompressError
from compress.helpers import ONNX_TYPES
from compress.threads import add_threads_argument


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder written by `compress export`")
    p.add_argument("--dtype", default="float32", choices=list(ONNX_TYPES), help="ONNX model dtype")
    p.add_argument("--graph", default="auto", choices=["auto", "fused", "traced"],
                   help="fused: one node per fused onnxruntime operator (GroupQueryAttention, "
                        "SkipSimplifiedLayerNormalization; static models with head and rotary dimensions that are "
                        "multiples of 16), much faster to decode; traced: the dynamo exporter's graph, "
                        "any model; auto: fused where it can express the model")
    p.add_argument("--weights", default="float", choices=["float", "int4"],
                   help="int4: the decoder layers' weights quantized for onnxruntime's MatMulNBits (blocks of "
                        "32 input channels, one scale and zero point each; embeddings, norms and LM head stay "
                        "float), written to DIR/onnx-int4; parity is checked against the slim model "
                        "holding the dequantized weights, and the cost of quantizing (KL, perplexity against the "
                        "float slim model on held-out text) is printed and recorded. Fused graph only")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DIR/onnx (only one this tool wrote: it holds onnx_config.json)")
    add_threads_argument(p)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def onnx_dir(folder: Path, dtype: str, weights: str = "float") -> Path:
    from exporters.onnx_export import onnx_dir_name

    return folder / onnx_dir_name(_variant(dtype, weights))


def _variant(dtype: str, weights: str) -> str:
    return dtype if weights == "float" else f"{dtype}-{weights}"


def export_folder_onnx(folder: Path, dtype: str = "float32", overwrite: bool = False, graph: str = "auto",
                       weights: str = "float") -> list:
    """ONNX for an exported folder, parity-checked before it is moved into DIR/onnx (DIR/onnx-int4 ...)."""
    import torch

    from compress.reference import CALIB_TEXT
    from compress.textdata import load_text, token_stream, windows
    from compress.loading import load_tokenizer
    from compress.stock import load_slim_folder
    from exporters.hf_folder import staged_folder
    from exporters.onnx_export import export_onnx
    from exporters.onnx_fused import GENAI_NAME
    from exporters.onnx_quant import dequantized_reference
    from validation.onnx_parity import onnx_checks
    from validation.parity import raise_on_failure
    from validation.quality import quantization_cost

    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder}: not a model folder (no config.json)")
    slim = load_slim_folder(folder, torch.float32)  # a stock folder's model as a keep-all slim model
    tokenizer = load_tokenizer(folder)
    ids = windows(token_stream(tokenizer, load_text(CALIB_TEXT)), 24, 1)
    quality = None
    with staged_folder(onnx_dir(folder, dtype, weights), overwrite=overwrite, ours=("onnx_config.json",)) as staging:
        try:
            path = export_onnx(slim, staging, dtype=dtype, graph=graph, weights=weights)
        except ValueError as e:  # a model the fused graph cannot express, asked for int4 ...
            raise CompressError(str(e)) from None
        if (staging / GENAI_NAME).is_file():  # onnxruntime-genai reads the tokenizer from the same folder
            for name in TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, staging / name)
        reference = slim if weights == "float" else dequantized_reference(slim, path)
        checks = onnx_checks(reference, staging, dtype, ids)
        if weights != "float":
            for c in checks:
                c.name, c.detail = f"onnx {weights}", f"vs the slim model holding the graph's dequantized {weights} " \
                                                      f"weights; {c.detail}"
        for c in checks:
            print("  parity " + c.line())
        raise_on_failure(checks)
        if weights != "float":
            quality = quantization_cost(reference, slim, tokenizer)
            print(f"  {weights} weights on {quality['windows']} held-out windows: perplexity "
                  f"{quality['float_ppl']:.2f} (float) -> {quality['quantized_ppl']:.2f}, KL {quality['kl']:.4f}, "
                  f"top-1 agreement {quality['agreement']:.3f}")
    report_path = folder / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report.setdefault("onnx", {})[_variant(dtype, weights)] = [c.to_dict() for c in checks]
        if quality is not None:
            report.setdefault("onnx_quantization", {})[_variant(dtype, weights)] = quality
        report_path.write_text(json.dumps(report, indent=1) + "\n")
    return checks


def run(args: argparse.Namespace) -> int:
    checks = export_folder_onnx(args.folder, args.dtype, args.overwrite, args.graph, args.weights)
    print(f"wrote {onnx_dir(args.folder.resolve(), args.dtype, args.weights)} ({len(checks)} parity checks passed)")
    return 0
