"""The checks of an exported folder against its dense model (`compress validate`), whether the
dense model is held whole or streamed one layer at a time (compress.source).

The plan must belong to the dense model (architecture, shapes and the weights' fingerprint);
the folder must hold exactly the slim tensors the plan gives; and the slim model must compute
what the masked dense model computes: the whole-model checks where float64 copies fit in memory,
else (and always for a streamed model) each layer on its own, in one pass over the layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from compress.errors import CompressError
from compress.helpers import dtype_name
from compress.plan import Plan, model_identity
from validation.parity import TOLERANCES, Check, resolve_scope

__all__ = ["load_export", "check_scope", "files_check", "folder_checks", "probe_tensors"]


def load_export(folder: Path) -> tuple[dict, Plan, dict]:
    """report.json, the plan and the rewritten dense tensors of an exported folder."""
    from exporters.hf_folder import REPLACED_FILE

    if not (folder / "plan.json").is_file():
        raise CompressError(f"{folder}: no plan.json; not a folder written by `compress export`")
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else {}
    replaced = load_file(str(folder / REPLACED_FILE)) if (folder / REPLACED_FILE).is_file() else {}
    return report, Plan.load(folder / "plan.json"), replaced


def check_scope(source, choice: str) -> str:
    """The parity scope ("model" or "layers") that `choice` ("auto", "model", "layers") comes to
    for a source of layers: a streamed model is never whole, so "layers"."""
    if not source.streamed:
        return resolve_scope(choice, sum(p.numel() for p in source.model.parameters()))
    if choice == "model":
        raise CompressError("a streamed model is checked layer by layer; --parity-scope model needs it whole "
                            "(--streaming off)")
    return "layers"


def files_check(dtype: str, problem: str | None, detail: str) -> Check:
    """The files check where the folder is compared tensor by tensor, not run: failed with
    `problem`, else passed with `detail`."""
    return Check("files", "cpu", dtype, float("inf") if problem else 0.0, TOLERANCES["float64"], problem is None,
                 problem or detail)


def folder_checks(source, folder: Path, plan: Plan, replaced: dict, dtype: torch.dtype, ids: torch.Tensor,
                  parity_scope: str = "auto") -> list[Check]:
    """The files check and the parity checks of `folder` (tensors in `dtype`) against `source`;
    a plan made for another model raises PlanMismatchError."""
    g = source.adapter.geometry()
    # architecture and shapes now (a wrong-shaped model would fail obscurely); the weights' fingerprint
    # where they are read (a streamed model's after the pass over its layers)
    plan.check_identity({**model_identity(source.model, g, {}), "fingerprint": plan.base.get("fingerprint")})
    scope = check_scope(source, parity_scope)
    if plan.runtime and scope == "layers":
        raise CompressError("Probe Pruning's checks run the whole model in float64: use --parity-scope model")
    if scope == "model":
        plan.check_identity(source.identity())
        return _model_checks(source, plan, replaced, folder, dtype, ids)
    checks = _layer_checks(source, plan, replaced, folder, dtype, ids)
    plan.check_identity(source.identity())
    return checks


def _in_dtype(sd: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _model_checks(source, plan: Plan, replaced: dict, folder: Path, dtype: torch.dtype, ids: torch.Tensor) -> list:
    """The folder's tensors and the folder run by transformers, then the whole-model checks."""
    from compress.slimming import slim_state_dict
    from validation.parity import check_files, run_parity

    from compress.stock import is_stock_folder, stock_state_dict

    model, adapter = source.model, source.adapter
    expected = _in_dtype(slim_state_dict(model, adapter, plan, replaced), dtype)
    if is_stock_folder(folder):
        expected = stock_state_dict(model, adapter, expected)
    if plan.runtime:
        expected.update(probe_tensors(folder, expected))
    files = check_files(folder, model, adapter, plan, replaced, expected, "model")
    del expected
    checks = [files, *run_parity(model, adapter, plan, replaced, ids)]
    if plan.runtime:
        from compress.loading import load_folder_model
        from validation.parity import probe_checks

        served = load_folder_model(folder, dtype)
        checks += probe_checks(served, model, adapter, plan, replaced, ids)
    return checks


def _layer_checks(source, plan: Plan, replaced: dict, folder: Path, dtype: torch.dtype, ids: torch.Tensor) -> list:
    """One pass over the layers: per layer the folder's tensors == the slim tensors the plan gives
    (read one at a time) and the slim layer == the masked dense layer in float64."""
    from compress.slimming import slim_layer_state_dict, slim_shared_state_dict
    from compress.stock import is_stock_folder, stock_layer, stock_shared
    from exporters.hf_folder import tensors_differ, weight_map
    from validation.parity import LayerChecker

    model, adapter, stock = source.model, source.adapter, is_stock_folder(folder)
    names = weight_map(folder)
    checker = LayerChecker(model, adapter, plan, ids)
    shared = slim_shared_state_dict(model, adapter, replaced)
    written = _in_dtype(stock_shared(model, adapter, shared) if stock else shared, dtype)
    problem, seen = tensors_differ(folder, names, written), set(written)
    with torch.no_grad():
        for i, layer in source.layers("checking layers"):
            prefix, sd = source.prefixes[i], slim_layer_state_dict(model, adapter, plan, i, replaced)
            expected = (_in_dtype(stock_layer(adapter, layer, prefix, sd), dtype) if stock
                        else _in_dtype(sd, dtype, f"model.layers.{i}."))
            problem = problem or tensors_differ(folder, names, expected)
            seen.update(expected)
            checker.step(i, layer, {k: v for k, v in replaced.items() if k.startswith(prefix)}, sd, prefix)
    extra = sorted(set(names) - seen)
    problem = problem or (f"the folder holds tensors the plan does not give: {extra[:3]}" if extra else None)
    why = "streamed" if source.streamed else "layer scope"
    files = files_check(dtype_name(dtype), problem, "every tensor identical to the layer-checked slim tensors "
                                                    f"(model not run: {why})")
    return [files, checker.finish(shared)]


def probe_tensors(folder: Path, expected: dict) -> dict:
    """The folder's Probe Pruning buffers, checked where they can be: each weight norm recomputed
    from the expected weights; the calibration history (which needs the export's calibration
    text) finite and non-negative."""
    from safetensors import safe_open

    from exporters.hf_folder import weight_map

    out = {}
    for name, filename in weight_map(folder).items():
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
