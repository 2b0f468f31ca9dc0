"""The Python API: `prune(model, method, ratio, calib)` -> PruneResult, `export(model, result, out)`.

`model` is a source of decoder layers (compress.source): a transformers model held in memory, or
a `DenseStream`, a checkpoint read one decoder layer at a time. Both run the same steps; where
they differ is named: a streamed pruning scores the layers one at a time and leaves the tensors
its method rewrites to export (`StreamedResult`); the parity scope decides between the
whole-model checks and the layer-by-layer check (a stream is never whole), and with it whether
the files check runs the folder or reads each shard back. The CLI is a thin shell over these calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.checkpoint import StateStore
from compress.distributed import World
from compress.errors import CompressError
from compress.helpers import check_ratio, dtype_name
from compress.methods import METHODS, PruneResult
from compress.methods.select import ScoredMethod
from compress.slimming import build_slim_model, slim_config, slim_layer_state_dict, slim_shared_state_dict
from compress.source import LayerSource, as_source, choose_streaming, spill_folder
from compress.stock import choose_layout, stock_config, stock_layer, stock_mismatch, stock_shared, write_legacy_rope
from exporters.hf_folder import REPLACED_FILE, ShardWriter, staged_folder, write_model_files
from validation.folder_checks import check_scope, files_check
from validation.parity import (TOLERANCES, LayerChecker, check_files, probe_checks, raise_on_failure,
                               resolve_scope, run_parity)
from validation.report import build_report, write_report

__all__ = ["prune", "export", "record", "streaming_for", "StreamedResult"]

NOT_STREAMABLE = "method {!r} needs the whole model in memory"
RUNTIME_NEEDS_WHOLE = "run-time pruning (--runtime) needs the whole model"
RECOVER_NEEDS_WHOLE = "--recover trains the slim model against the whole dense model"


def streaming_for(choice: str, model, method: str | None, runtime: bool, parity_scope: str,
                  recover: bool = False) -> Path | None:
    """`choose_streaming` for a run of `method` (None: checking an export's plan), with run-time
    pruning or recovery or not, under `parity_scope`; "auto" streams where the whole-model checks
    would not fit in memory (`resolve_scope`)."""
    why = (NOT_STREAMABLE.format(method) if method and not METHODS[method].streamable
           else RUNTIME_NEEDS_WHOLE if runtime
           else RECOVER_NEEDS_WHOLE if recover
           else "--parity-scope model runs the whole model" if parity_scope == "model" else None)
    return choose_streaming(choice, model, why, lambda params: resolve_scope("auto", params) == "model")


@dataclass
class StreamedResult(PruneResult):
    """A plan made on a streamed model. The tensors its method rewrites once the plan is known
    (FLAP's biases) need each layer's weights again, so export makes them as it reads the layers,
    from each layer's input statistics (`stats`)."""

    method: ScoredMethod | None = None
    stats: list = field(default_factory=list)


def prune(model, method: str, ratio: float, calib: torch.Tensor | None = None, seed: int = 0, *,
          store: StateStore | None = None, world: World | None = None, **settings) -> PruneResult:
    """Run a pruning method; the returned plan carries the model's identity and the settings used.

    A training method saves its state in `store` as it goes and resumes from it
    (compress.checkpoint); a data-parallel one (DISP) shares its training with the processes of
    `world` (compress.distributed), every one of which calls `prune` alike."""
    source = as_source(model)
    check_ratio(ratio)
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
    m = METHODS[method](**settings)
    m.store, m.world = store, world or World()
    if source.streamed and not m.streamable:
        raise CompressError(f"{NOT_STREAMABLE.format(method)}; use --streaming off")
    if m.needs_calibration and calib is None:
        raise CompressError(f"method {method!r} needs calibration token ids")
    calib = calib if m.needs_calibration else None
    torch.manual_seed(seed)
    if source.streamed:
        result = _score_layers(source, m, ratio, calib, seed)
    else:
        result = m.prune(source.model, source.adapter, ratio, calib, seed)
    result.plan.check(source.adapter.geometry())
    record(result.plan, source.identity(), method, ratio, m, seed)
    return result


def _score_layers(source: LayerSource, m: ScoredMethod, ratio: float, calib: torch.Tensor | None,
                  seed: int) -> StreamedResult:
    """A score-based method one layer at a time: the calibration windows' hidden states enter
    layer 0; each layer in turn runs them (collecting its input statistics) and is scored; the
    plan is then selected from all layers' scores, exactly as in memory."""
    from compress.calibration import layer_input_stats, layer_inputs

    model, adapter = source.model, source.adapter
    heads, mlps, stats = [], [], []
    with spill_folder(source, calib) as spill, torch.no_grad():
        inputs = None if calib is None else layer_inputs(model, adapter, calib, m.settings["calib_batch_size"], spill)
        for _, layer in source.layers("scoring layers"):
            s = None
            if calib is not None:
                s, inputs = layer_input_stats(adapter, layer, inputs, m.stats_parts, spill)
            h, mlp = m.layer_scores(adapter, layer, s)
            heads.append(h)
            mlps.append(mlp)
            stats.append(s)
        del inputs  # the last boundary's files go before their folder
    plan = m.select_plan(adapter.geometry(), torch.stack(heads), torch.stack(mlps), ratio, seed)
    return StreamedResult(plan, method=m, stats=stats)


def record(plan, identity: dict, method: str, ratio: float, m, seed: int) -> None:
    """Stamp a plan with the model it was made for and the settings that made it."""
    plan.base = identity
    plan.method, plan.settings, plan.seed = method, {"ratio": ratio, **m.settings, **plan.settings}, seed


def export(model, result: PruneResult, out: str | Path, *, tokenizer=None, calib: torch.Tensor | None = None,
           dtype: torch.dtype | None = None, overwrite: bool = False, check: bool = True,
           max_shard_size: str | int = "2GB", quality: dict | None = None, comparison=None,
           extra: dict | None = None, parity_scope: str = "auto", layout: str = "slim") -> dict:
    """Write the slim folder (weights, config, modeling code, tokenizer, plan, report) atomically.

    With `check`, parity runs on `calib` token windows (or random tokens), and a failure raises
    before the folder is moved into place. `parity_scope` "model" runs the whole-model checks
    before writing, "layers" checks each layer as it is written, "auto" the first where its
    float64 copies fit in memory (a streamed model: "layers"). The report's quality figures are
    `quality`, or what `comparison` (validation.quality.LayerwiseComparison on held-out text)
    measures beside the export. `layout` (compress.stock): "stock" writes the dense family's own
    config and tensor names (no remote code), "slim" the slim model, "auto" stock where the plan
    allows. Returns the report.
    """
    source = as_source(model)
    model, adapter, plan, replaced = source.model, source.adapter, result.plan, result.replaced
    plan.check(adapter.geometry())
    ids = calib if calib is not None else torch.randint(0, model.config.vocab_size, (3, 48),
                                                        generator=torch.Generator().manual_seed(0))
    scope = check_scope(source, parity_scope)
    rewrites_later = isinstance(result, StreamedResult) and result.method is not None and \
        type(result.method).layer_replaced is not ScoredMethod.layer_replaced
    rewritten = None if rewrites_later else set(replaced)
    stock = choose_layout(layout, model, adapter, plan, rewritten) == "stock"
    if plan.runtime and source.streamed:
        raise CompressError(RUNTIME_NEEDS_WHOLE)
    pp = _probe_model(source, result, calib) if plan.runtime else None
    if check and pp is not None and scope == "layers":
        raise CompressError("Probe Pruning's checks run the whole model in float64; that needs "
                            "--parity-scope model (and the memory for it)")
    t0 = time.perf_counter()
    checks = []
    if check and scope == "model":
        checks = run_parity(model, adapter, plan, replaced, ids)
        if pp is not None:
            checks += probe_checks(pp, model, adapter, plan, replaced, ids)
        _print_and_raise(checks)
    parity_s = time.perf_counter() - t0
    checker = LayerChecker(model, adapter, plan, ids) if check and scope == "layers" else None
    with staged_folder(out, overwrite=overwrite) as folder:
        writer = ShardWriter(folder, max_shard_size, verify=scope == "layers")
        shapes, kept = {}, {}  # kept: the tensors as written, for the whole-model files check

        def write(prefix: str, sd: dict[str, torch.Tensor]) -> None:
            for k, v in sd.items():
                v = v.contiguous()
                v = v.to(dtype) if dtype is not None and v.is_floating_point() else v
                shapes[prefix + k] = torch.empty(v.shape, dtype=v.dtype, device="meta")
                if scope == "model":
                    kept[prefix + k] = v
                writer.add(prefix + k, v)

        shared = slim_shared_state_dict(model, adapter, replaced)
        write("", stock_shared(model, adapter, shared) if stock else shared)
        with torch.no_grad():
            for i, layer in source.layers("slimming layers"):
                own = _layer_replaced(result, adapter, layer, source.prefixes[i], i)
                sd = slim_layer_state_dict(model, adapter, plan, i, replaced)
                if checker is not None:
                    checker.step(i, layer, own, sd, source.prefixes[i])
                if comparison is not None:
                    comparison.step(i, layer, sd, slim_config(model, adapter, plan, own))
                if stock:
                    write("", stock_layer(adapter, layer, source.prefixes[i], sd))
                else:
                    write(f"model.layers.{i}.", sd)
        if pp is not None:
            write("", {k: v for k, v in pp.state_dict().items() if ".probe_" in k})
        if checker is not None:
            checks, parity_s = [checker.finish(shared)], time.perf_counter() - t0
            _print_and_raise(checks)
        extra = {**(extra or {}), "layout": "stock" if stock else "slim",
                 **({"parity_seconds": round(parity_s, 2), "parity_scope": scope} if check else {}),
                 **({"streamed": True} if source.streamed else {})}
        quality = comparison.finish(shared) if comparison is not None else quality
        total = writer.close()
        dtype_written = dtype_name(next(iter(shapes.values())).dtype)  # the embeddings come first
        config = (stock_config(model, adapter, plan, dtype_written) if stock
                  else slim_config(model, adapter, plan, replaced))
        config.dtype = dtype_written
        mismatch = stock and stock_mismatch(config, shapes)
        if mismatch:
            raise CompressError(mismatch)
        if pp is not None:
            extra["runtime"] = _probe_config(config, pp, plan)
            del pp
        write_model_files(folder, config, tokenizer, getattr(model, "generation_config", None), code=not stock)
        if stock:
            write_legacy_rope(folder)
        plan.save(folder / "plan.json")
        if replaced:
            save_file({k: v.detach().cpu().contiguous() for k, v in replaced.items()}, str(folder / REPLACED_FILE))
        why = "streamed export" if source.streamed else "layer scope"
        files = (check_files(folder, model, adapter, plan, replaced, kept, scope) if scope == "model" else
                 files_check(dtype_written, writer.problem, "every shard read back equal to the layer-checked "
                                                           f"slim tensors (model not run: {why})"))
        _print_and_raise([files])
        report = build_report(model, adapter, plan, shapes, checks + [files], TOLERANCES, quality=quality,
                              extra=extra)
        report["files"]["slim_weight_bytes"] = total
        write_report(folder, report)
    return report


def _layer_replaced(result: PruneResult, adapter, layer, prefix: str, i: int) -> dict[str, torch.Tensor]:
    """Layer i's rewritten tensors (dense names starting with `prefix`); a streamed pruning's are
    made now, from the layer being read, and added to `result.replaced`."""
    if isinstance(result, StreamedResult):
        result.replaced.update(result.method.layer_replaced(adapter, layer, prefix, result.plan.layers[i],
                                                            result.stats[i]))
    return {k: v for k, v in result.replaced.items() if k.startswith(prefix)}


def _probe_model(source: LayerSource, result: PruneResult, calib: torch.Tensor | None):
    """The slim model with Probe Pruning on top, its history from the calibration windows."""
    from compress.probe import with_probe

    slim = build_slim_model(source.model, source.adapter, result.plan, result.replaced)
    return with_probe(slim, result.plan.runtime, calib)


def _probe_config(config, pp, plan) -> dict:
    """Copy the probe's settings into the slim config; the report's run-time entry."""
    from compress.probe import probe_flops_share, runtime_ratio

    for key in ("probe", "layer_probe_heads", "layer_probe_intermediate"):
        setattr(config, key, getattr(pp.config, key))
    return {**plan.runtime, "achieved_ratio": round(runtime_ratio(config), 4),
            "probe_flops_share_8x256": round(probe_flops_share(config, 8, 256), 4)}


def _print_and_raise(checks: list) -> None:
    for c in checks:
        print("  parity " + c.line())
    raise_on_failure(checks)
