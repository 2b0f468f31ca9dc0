"""The Python API: `prune(model, method, ratio, calib)` -> PruneResult, `export(model, result, out)`.

The CLI is a thin shell over these two calls.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from compress.adapters import get_adapter
from compress.errors import CompressError
from compress.methods import METHODS, PruneResult
from compress.plan import model_identity
from compress.slimming import build_slim_model, slim_config, slim_state_dict
from exporters.hf_folder import REPLACED_FILE, staged_folder, write_model_files, write_weights
from validation.parity import (TOLERANCES, check_files, equivalence_checks, probe_checks, raise_on_failure,
                               resolve_scope)
from validation.report import build_report, write_report

__all__ = ["prune", "export", "check_ratio", "record"]


def check_ratio(ratio: float) -> float:
    if not 0.0 < ratio < 1.0:
        raise CompressError(f"--ratio must be strictly between 0 and 1 (fraction of decoder-layer linear weights removed), got {ratio}")
    return ratio


def prune(model, method: str, ratio: float, calib: torch.Tensor | None = None, seed: int = 0,
          **settings) -> PruneResult:
    """Run a pruning method; the returned plan carries the model's identity and the settings used."""
    check_ratio(ratio)
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
    adapter = get_adapter(model.config)
    m = METHODS[method](**settings)
    if m.needs_calibration and calib is None:
        raise CompressError(f"method {method!r} needs calibration token ids")
    torch.manual_seed(seed)
    result = m.prune(model, adapter, ratio, calib if m.needs_calibration else None, seed)
    g = adapter.geometry()
    result.plan.check(g)
    record(result.plan, model_identity(model, g), method, ratio, m, seed)
    return result


def record(plan, identity: dict, method: str, ratio: float, m, seed: int) -> None:
    """Stamp a plan with the model it was made for and the settings that made it."""
    plan.base = identity
    plan.method, plan.settings, plan.seed = method, {"ratio": ratio, **m.settings, **plan.settings}, seed


def export(model, result: PruneResult, out: str | Path, *, tokenizer=None, calib: torch.Tensor | None = None,
           dtype: torch.dtype | None = None, overwrite: bool = False, check: bool = True,
           max_shard_size: str | int = "2GB", quality: dict | None = None, extra: dict | None = None,
           parity_scope: str = "auto") -> dict:
    """Write the slim folder (weights, config, modeling code, tokenizer, plan, report) atomically.

    With `check`, parity is run first (on `calib` token windows, or random tokens) and a failure
    raises before anything is written; `parity_scope` "model" runs the whole-model checks,
    "layers" the one-layer-at-a-time check, "auto" the first where its float64 copies fit in
    memory. Returns the report.
    """
    adapter = get_adapter(model.config)
    g = adapter.geometry()
    plan, replaced = result.plan, result.replaced
    plan.check(g)
    ids = calib if calib is not None else torch.randint(0, model.config.vocab_size, (3, 48),
                                                        generator=torch.Generator().manual_seed(0))
    pp = None
    if plan.runtime:  # Probe Pruning: its history comes from the calibration windows
        from compress.probe import with_probe

        pp = with_probe(build_slim_model(model, adapter, plan, replaced), plan.runtime, calib)
    checks = []
    scope = resolve_scope(parity_scope, sum(p.numel() for p in model.parameters()))
    if check:
        if pp is not None and scope == "layers":
            raise CompressError("Probe Pruning's checks run the whole model in float64; that needs "
                                "--parity-scope model (and the memory for it)")
        t0 = time.perf_counter()
        checks = equivalence_checks(model, adapter, plan, replaced, ids, scope)
        if pp is not None:
            checks += probe_checks(pp, model, adapter, plan, replaced, ids)
        for c in checks:
            print("  parity " + c.line())
        raise_on_failure(checks)
        extra = {**(extra or {}), "parity_seconds": round(time.perf_counter() - t0, 2), "parity_scope": scope}
    sd = slim_state_dict(model, adapter, plan, replaced)
    if pp is not None:
        sd.update({k: v for k, v in pp.state_dict().items() if ".probe_" in k})
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    config = slim_config(model, adapter, plan, replaced)
    if pp is not None:
        from compress.probe import probe_flops_share, runtime_ratio

        for key in ("probe", "layer_probe_heads", "layer_probe_intermediate"):
            setattr(config, key, getattr(pp.config, key))
        extra = {**(extra or {}), "runtime": {**plan.runtime, "achieved_ratio": round(runtime_ratio(config), 4),
                                              "probe_flops_share_8x256": round(probe_flops_share(config, 8, 256), 4)}}
        del pp
    config.dtype = str(sd["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    report = build_report(model, adapter, plan, sd, checks, TOLERANCES, quality=quality, extra=extra)
    with staged_folder(out, overwrite=overwrite) as folder:
        bar = lambda it: tqdm(list(it), desc="writing shards", unit="shard", leave=False)  # noqa: E731
        report["files"]["slim_weight_bytes"] = write_weights(folder, sd, max_shard_size, progress=bar)
        write_model_files(folder, config, tokenizer, getattr(model, "generation_config", None))
        plan.save(folder / "plan.json")
        if replaced:
            save_file({k: v.detach().cpu().contiguous() for k, v in replaced.items()}, str(folder / REPLACED_FILE))
        load = check_files(folder, model, adapter, plan, replaced, sd, scope)
        print("  parity " + load.line())
        raise_on_failure([load])
        report["parity"].append(load.to_dict())
        write_report(folder, report)
    return report
