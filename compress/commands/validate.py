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

import torch
from safetensors.torch import load_file

from compress.errors import CompressError
from compress.plan import Plan


def configure(p: argparse.ArgumentParser) -> None:
    from compress.commands.export import add_scope_argument

    p.add_argument("folder", type=Path, help="a folder written by `compress export`")
    p.add_argument("--model", default=None, help="the dense model (default: the one recorded in report.json)")
    p.add_argument("--device", default="auto", help="device for the dense model: auto, cpu, cuda")
    p.add_argument("--json", type=Path, default=None, help="also write the checks as JSON here")
    add_scope_argument(p)
    p.add_argument("--streaming", choices=["auto", "on", "off"], default="auto",
                   help="read the dense model one decoder layer at a time from its safetensors (a folder or a "
                        "Hub id) or GGUF file (layer checks only); auto (default): when the whole-model checks "
                        "would not fit in memory")


def load_export(folder: Path) -> tuple[dict, Plan, dict]:
    """report.json, the plan and the rewritten dense tensors of an exported folder."""
    from exporters.hf_folder import REPLACED_FILE

    if not (folder / "plan.json").is_file():
        raise CompressError(f"{folder}: no plan.json; not a folder written by `compress export`")
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else {}
    replaced = load_file(str(folder / REPLACED_FILE)) if (folder / REPLACED_FILE).is_file() else {}
    return report, Plan.load(folder / "plan.json"), replaced


def probe_tensors(folder: Path, expected: dict) -> dict:
    """The folder's Probe Pruning buffers, checked where they can be: each weight norm recomputed
    from the expected weights; the calibration history (which needs the export's calibration
    text) finite and non-negative."""
    from safetensors import safe_open

    from exporters.hf_folder import INDEX_FILE

    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    out = {}
    for name, filename in weight_map.items():
        if ".probe_" not in name:
            continue
        with safe_open(str(folder / filename), framework="pt") as f:
            t = f.get_tensor(name)
        if name.endswith(".probe_w2"):
            consumer = name.replace("self_attn.probe_w2", "self_attn.o_proj.weight").replace(
                "mlp.probe_w2", "mlp.down_proj.weight")
            want = expected[consumer].double().pow(4).sum(0).sqrt().to(t.dtype)
            if not torch.allclose(t.double(), want.double(), rtol=1e-3, atol=0):
                raise CompressError(f"{folder}: {name} is not the norm of {consumer}")
        elif not bool(torch.isfinite(t).all() and (t >= 0).all()):
            raise CompressError(f"{folder}: {name} holds negative or non-finite values")
        out[name] = t
    return out


def run(args: argparse.Namespace) -> int:
    from compress.loading import load_tokenizer, resolve_dtype
    from compress.reference import CALIB_TEXT
    from compress.streaming import choose_streaming
    from compress.textdata import load_text, token_stream, windows
    from validation.parity import raise_on_failure

    folder = args.folder.resolve()
    report, plan, replaced = load_export(folder)
    base = args.model or report.get("base_model")
    base = None if base in (None, "reference") else base
    dtype = resolve_dtype(json.loads((folder / "config.json").read_text()).get("dtype", "float32"))
    tokenizer = load_tokenizer(folder)
    ids = windows(token_stream(tokenizer, load_text(CALIB_TEXT)), 48, 3)
    dense_folder = choose_streaming(args.streaming, base, None, bool(plan.runtime), args.parity_scope)
    if dense_folder is not None:
        checks = _streamed_checks(dense_folder, plan, replaced, folder, dtype, ids, args.device)
    else:
        checks = _checks(base, plan, replaced, folder, dtype, ids, args)
    for c in checks:
        print("parity " + c.line())
    if args.json:
        args.json.write_text(json.dumps([c.to_dict() for c in checks], indent=1) + "\n")
    raise_on_failure(checks)
    print(f"{folder}: all {len(checks)} checks passed")
    return 0


def _streamed_checks(dense_folder, plan, replaced, folder, dtype, ids, device) -> list:
    from compress.loading import load_config, load_dtype, resolve_device
    from compress.streaming import DenseStream, validate_streamed

    held = load_dtype(load_config(dense_folder), "auto", dtype)
    return validate_streamed(DenseStream(dense_folder, held, resolve_device(device)), plan, replaced, folder, dtype,
                             ids)


def _checks(base, plan, replaced, folder, dtype, ids, args) -> list:
    from compress.adapters import get_adapter
    from compress.loading import load_model, resolve_device
    from compress.plan import model_identity
    from compress.slimming import slim_state_dict
    from validation.parity import check_files, equivalence_checks, resolve_scope

    model = load_model(base, dtype="auto", export_dtype=dtype, device=resolve_device(args.device))
    adapter = get_adapter(model.config)
    plan.check_identity(model_identity(model, adapter.geometry()))
    print(f"plan matches {base or 'the reference model'} ({plan.base.get('fingerprint')})")
    expected = {k: v.to(dtype) if v.is_floating_point() else v
                for k, v in slim_state_dict(model, adapter, plan, replaced).items()}
    if plan.runtime:
        expected.update(probe_tensors(folder, expected))
    scope = resolve_scope(args.parity_scope, sum(p.numel() for p in model.parameters()))
    if plan.runtime and scope == "layers":
        raise CompressError("Probe Pruning's checks run the whole model in float64: use --parity-scope model")
    files = check_files(folder, model, adapter, plan, replaced, expected, scope)
    del expected
    checks = [files, *equivalence_checks(model, adapter, plan, replaced, ids, scope)]
    if plan.runtime:
        from transformers import AutoModelForCausalLM

        from validation.parity import probe_checks

        served = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype).eval()
        checks += probe_checks(served, model, adapter, plan, replaced, ids)
    return checks
