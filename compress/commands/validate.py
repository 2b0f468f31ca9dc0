"""Re-run the parity checks of an exported folder against its dense model.

Checks that the plan belongs to the dense model, that the files hold exactly the slim tensors
the plan gives, that the folder loaded by transformers computes the same logits, and the
equivalence / identity / generation checks (CPU float64; CUDA float16 and bfloat16 when present),
or, where float64 copies of the model do not fit in memory, each layer on its own (--parity-scope).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.threads import add_threads_argument


def configure(p: argparse.ArgumentParser) -> None:
    from compress.commands.export import add_scope_argument

    p.add_argument("folder", type=Path, help="a folder written by `compress export`")
    p.add_argument("--model", default=None, help="the dense model (default: the one recorded in report.json)")
    p.add_argument("--device", default="auto", help="device for the dense model: auto, cpu, cuda")
    p.add_argument("--json", type=Path, default=None, help="also write the checks as JSON here")
    add_scope_argument(p)
    p.add_argument("--streaming", choices=["auto", "on", "off"], default="auto",
                   help="read the dense model one decoder layer at a time from its safetensors (a folder or a "
                        "Hub id) or GGUF file (layer checks only); auto: when the whole-model checks would not "
                        "fit in memory")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from compress.loading import load_tokenizer, resolve_device, resolve_dtype
    from compress.pipeline import streaming_for
    from compress.reference import CALIB_TEXT
    from compress.source import open_source
    from compress.textdata import load_text, token_stream, windows
    from validation.folder_checks import folder_checks, load_export
    from validation.parity import raise_on_failure

    folder = args.folder.resolve()
    report, plan, replaced = load_export(folder)
    base = args.model or report.get("base_model")
    base = None if base in (None, "reference") else base
    dtype = resolve_dtype(json.loads((folder / "config.json").read_text()).get("dtype", "float32"))
    tokenizer = load_tokenizer(folder)
    ids = windows(token_stream(tokenizer, load_text(CALIB_TEXT)), 48, 3)
    dense_folder = streaming_for(args.streaming, base, None, bool(plan.runtime), args.parity_scope)
    source = open_source(base, dense_folder, "auto", dtype, resolve_device(args.device))
    checks = folder_checks(source, folder, plan, replaced, dtype, ids, args.parity_scope)
    print(f"plan matches {base or 'the reference model'} ({plan.base.get('fingerprint')})")
    for c in checks:
        print("parity " + c.line())
    if args.json:
        args.json.write_text(json.dumps([c.to_dict() for c in checks], indent=1) + "\n")
    raise_on_failure(checks)
    print(f"{folder}: all {len(checks)} checks passed")
    return 0
