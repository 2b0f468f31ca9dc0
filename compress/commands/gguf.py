"""Write an exported slim folder as one GGUF file that llama.cpp (ollama, LM Studio) runs natively.

The GGUF uses llama.cpp's "deci" architecture, which holds per-layer query heads, KV heads and MLP
widths and runs layers without attention; what deci cannot say directly is written as an exact
stand-in (see exporters/gguf_export.py). f32/f16/bf16 are written here; q8_0 and q4_k_m come from
llama.cpp's own quantizer (needs the [llamacpp] extra). With llama-cpp-python installed, the file
is checked before it is moved into place: a float32 GGUF must match the slim PyTorch model (prefill,
each decode step, 32 greedy tokens) and llama.cpp's tokenizer the folder's; other types report
their cost (perplexity, KL against the float slim model on held-out text). The result is recorded
under "gguf" in the folder's report.json. Refused in one line: Probe Pruning's run-time plans and
families deci cannot run (OPT, Qwen3's q/k norms, partial rotary, non-SwiGLU MLPs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

from compress.errors import CompressError
from compress.threads import add_threads_argument

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder written by `compress export`")
    p.add_argument("--type", default="f32", choices=TYPES, help="weight type of the GGUF")
    p.add_argument("--out", type=Path, default=None, help="GGUF file to write (default: FOLDER/gguf/NAME-TYPE.gguf)")
    add_threads_argument(p)  # llama.cpp's quantizer and checks use the same count
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--no-check", action="store_true", help="write without running the file in llama.cpp")


def default_path(folder: Path, gguf_type: str) -> Path:
    return folder / "gguf" / f"{folder.name}-{gguf_type.upper()}.gguf"


def export_folder_gguf(folder: Path, gguf_type: str = "f32", out: Path | None = None, overwrite: bool = False,
                       check: bool = True, threads: int | None = None) -> dict:
    """Write (and check) the GGUF of `folder`; returns the entry recorded under report.json's "gguf"."""
    from exporters.gguf_export import unsupported_reason
    from exporters.gguf_quantize import staged_file

    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder}: not a model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    if (folder / "plan.json").is_file() and "auto_map" not in config:
        raise CompressError(f"{folder} holds the stock layout ({config.get('architectures', ['?'])[0]}): llama.cpp's "
                            "own convert_hf_to_gguf.py converts it; `compress gguf` reads the slim layout "
                            "(export with --layout slim)")
    _require(gguf_type, unsupported_reason(config))
    have_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    out = Path(out).resolve() if out else default_path(folder, gguf_type)
    with staged_file(out, overwrite) as staging:
        layout = write_file(folder, staging, gguf_type, threads, folder.name)
        entry = _entry(folder, out, gguf_type, layout, staging.stat().st_size)
        if check and have_llamacpp:
            entry.update(_check(folder, staging, gguf_type, threads))
        elif check:
            print("  not checked in llama.cpp: llama-cpp-python is not installed "
                  "(pip install 'compress-llm[llamacpp]')")
    _record(folder, gguf_type, entry)
    return entry


def write_file(folder: Path, path: Path, gguf_type: str, threads: int | None = None, name: str | None = None):
    """The GGUF of `folder` at `path`, its layout returned: float types written by us, quantized ones
    by llama.cpp's quantizer from a float32 file whose MLP widths are padded to its blocks."""
    from exporters.gguf_export import write_gguf
    from exporters.gguf_quantize import QUANT_BLOCK, QUANT_TYPES, quantize_gguf

    if gguf_type not in QUANT_TYPES:
        return write_gguf(folder, path, gguf_type, name=name)
    source = path.with_name(path.name + ".f32")
    try:
        layout = write_gguf(folder, source, "f32", mlp_multiple=QUANT_BLOCK, name=name)
        quantize_gguf(source, path, gguf_type, threads or 0)
    finally:
        source.unlink(missing_ok=True)
    return layout


def _require(gguf_type: str, reason: str | None) -> None:
    """One line for what stops a GGUF of `gguf_type`: an unknown type, a quantizer that is not
    installed, or `reason` (exporters.gguf_export.unsupported_reason)."""
    from exporters.gguf_quantize import QUANT_TYPES

    if gguf_type not in TYPES:
        raise CompressError(f"unknown GGUF type {gguf_type!r}; choose from {', '.join(TYPES)}")
    if reason:
        raise CompressError(f"cannot write a GGUF llama.cpp runs: {reason}")
    if gguf_type in QUANT_TYPES and importlib.util.find_spec("llama_cpp") is None:
        raise CompressError(f"--type {gguf_type} uses llama.cpp's quantizer: pip install 'compress-llm[llamacpp]'")


def refuse_before_pruning(config, method: str, runtime: str | None, gguf_type: str) -> None:
    """`compress export --gguf`: raise now what export_folder_gguf would raise after minutes of pruning.
    The slim config's switches come from the dense config and the method alone: the family's adapter
    and a weightless copy of the model on the meta device (its rotary module: rotated dims, scaling)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compress.adapters import get_adapter
    from exporters.gguf_export import unsupported_reason

    if method == "probe" or runtime == "probe":
        return _require(gguf_type, unsupported_reason({"probe": True}))
    adapter = get_adapter(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    inv_freq, scaling = adapter.rotary(model)
    slim = {**adapter.slim_settings(), "base_model_type": config.model_type, "head_dim": adapter.geometry().head_dim,
            "rope_dim": None if inv_freq is None else 2 * inv_freq.shape[0], "rope_attention_scaling": scaling}
    _require(gguf_type, unsupported_reason(slim))


def _entry(folder: Path, out: Path, gguf_type: str, layout, size: int) -> dict:
    lays = layout.layers
    entry = {"file": os.path.relpath(out, folder), "type": gguf_type, "bytes": size, "architecture": "deci",
             "head_count": [x.heads for x in lays], "head_count_kv": [x.kv_heads for x in lays],
             "feed_forward_length": [x.ff for x in lays],
             "attention_standins": [i for i, x in enumerate(lays) if x.attn_standin],
             "mlp_standins": [i for i, x in enumerate(lays) if x.mlp_standin],
             "residual_dense_bytes": round(size * layout.residual_zeros / layout.elements), "notes": layout.notes}
    stand = [f"zero-weight attention head in layers {entry['attention_standins']}"] * bool(entry["attention_standins"])
    stand += [f"zero-weight MLP in layers {entry['mlp_standins']}"] * bool(entry["mlp_standins"])
    print(f"  deci layout: query heads {_span(entry['head_count'])}, KV heads {_span(entry['head_count_kv'])}, "
          f"MLP widths {_span(entry['feed_forward_length'])}" + "".join(f"; {s}" for s in stand))
    if layout.residual_zeros:
        print(f"  residual subsets (DISP) written dense: {entry['residual_dense_bytes'] / 1e6:.2f} MB of zeros "
              f"({entry['residual_dense_bytes'] / size:.1%} of the file)")
    for note in layout.notes:
        print(f"  note: {note}")
    return entry


def _span(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _check(folder: Path, path: Path, gguf_type: str, threads: int | None) -> dict:
    """Parity (f32, enforced) or the cost of the type (others), and the tokenizer (enforced)."""
    import torch

    from transformers import AutoModelForCausalLM

    from compress.loading import load_tokenizer
    from compress.reference import CALIB_TEXT, TEST_TEXT
    from compress.runtime.llamacpp_runner import LlamaCppModel
    from compress.textdata import load_text, token_stream, windows
    from validation.gguf_parity import gguf_checks, tokenizer_check
    from validation.parity import raise_on_failure
    from validation.quality import quantization_cost

    slim = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)
    model = LlamaCppModel(path, n_ctx=512, threads=threads, f32_cache=gguf_type == "f32")
    try:
        checks = [tokenizer_check(model, tokenizer, load_text(TEST_TEXT))]
        if gguf_type == "f32":
            checks += gguf_checks(slim, model, windows(token_stream(tokenizer, load_text(CALIB_TEXT)), 24, 2))
        for c in checks:
            print("  parity " + c.line())
        raise_on_failure(checks)
        result = {"checks": [c.to_dict() for c in checks]}
        if gguf_type != "f32":
            q = result["quality"] = quantization_cost(model, slim, tokenizer)
            print(f"  {gguf_type} in llama.cpp on {q['windows']} held-out windows: perplexity {q['float_ppl']:.2f} "
                  f"(float slim model) -> {q['quantized_ppl']:.2f}, KL {q['kl']:.4f}, "
                  f"top-1 agreement {q['agreement']:.3f}")
    finally:
        model.close()
    return result


def _record(folder: Path, gguf_type: str, entry: dict) -> None:
    report_path = folder / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report.setdefault("gguf", {})[gguf_type] = entry
        report_path.write_text(json.dumps(report, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    entry = export_folder_gguf(args.folder, args.type, args.out, args.overwrite, not args.no_check, args.threads)
    path = (args.folder / entry["file"]).resolve()
    print(f"wrote {path} ({entry['bytes'] / 1e6:.1f} MB, llama.cpp architecture deci)")
    return 0
