"""The export report: what was removed, how the result was checked, how good it is (JSON + Markdown)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.adapters import Adapter
from compress.plan import Plan
from validation.quality_words import calibration_line, quality_line, quality_markdown

__all__ = ["build_report", "write_report", "summary_lines", "count_params"]

# Buffers that are not weights: index tensors, and Probe Pruning's calibration history and norms.
BUFFER_SUFFIX = ("_index", ".kv_map", ".probe_history", ".probe_w2")


def count_params(state_dict: dict[str, torch.Tensor]) -> int:
    """Parameters of a slim state dict (buffers excluded; a tied head counted once)."""
    return sum(t.numel() for k, t in state_dict.items() if not k.endswith(BUFFER_SUFFIX))


def _dense_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied tensors once


def build_report(model, adapter: Adapter, plan: Plan, slim_sd: dict, checks: list, tolerances: dict,
                 quality: list[dict] | None = None, extra: dict | None = None) -> dict:
    g = adapter.geometry()
    lin_before, lin_after = plan.linear_params(g)
    total_before = _dense_params(model)
    total_after = count_params(slim_sd)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "method": plan.method,
        "settings": plan.settings,
        "seed": plan.seed,
        "base": plan.base,
        "ratio": {
            "requested": plan.settings.get("ratio"),
            "achieved_linear": round(1 - lin_after / lin_before, 6),
            "achieved_total": round(1 - total_after / total_before, 6),
        },
        "params": {"linear_before": lin_before, "linear_after": lin_after,
                   "total_before": total_before, "total_after": total_after},
        "files": {"dense_weight_bytes": dense_bytes},
        "layers": [
            {"heads": len(r.heads), "kv_heads": len(r.kv_heads), "mlp_hidden": len(r.mlp_hidden),
             "attn_in": len(r.attn_in), "attn_out": len(r.attn_out), "mlp_in": len(r.mlp_in),
             "mlp_out": len(r.mlp_out)}
            for r in (lp.resolved(g) for lp in plan.layers)
        ],
        "tolerances": tolerances,
        "parity": [c.to_dict() for c in checks],
        "quality": quality or [],  # validation.heldout records, one per evaluation text
        **(extra or {}),
    }


def summary_lines(report: dict) -> list[str]:
    """The last lines `compress export` prints: achieved ratio both ways and the counts, the
    calibration text and the held-out figures."""
    lines = _size_lines(report)
    if report.get("calibration"):
        lines.append(calibration_line(report["calibration"]))
    return lines + [quality_line(rec) for rec in report.get("quality") or []]


def _size_lines(report: dict) -> list[str]:
    r, p = report["ratio"], report["params"]
    lines = [
        f"method {report['method']}: requested ratio {r['requested']}",
        f"achieved: {r['achieved_linear']:.4f} of decoder-layer linear weights "
        f"({p['linear_before']:,} -> {p['linear_after']:,}), "
        f"{r['achieved_total']:.4f} of all parameters ({p['total_before']:,} -> {p['total_after']:,})",
    ]
    rt = report.get("runtime")
    if rt:
        lines.append(f"run time: Probe Pruning skips {rt['achieved_ratio']:.4f} of the slim model's decoder-layer "
                     f"linear weights per batch (requested {rt['ratio']}; all weights stay in the files); the probe "
                     f"costs {100 * rt['probe_flops_share_8x256']:.1f}% of a forward's FLOPs at batch 8 x 256")
    return lines


def write_report(folder: Path, report: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    scope = {"model": "Scope: the whole model (slim vs masked dense, float64 on CPU).",
             "layers": "Scope: one decoder layer at a time in float64 (the whole-model checks need about three "
                       "float64 copies of the model); the files compared tensor by tensor."}.get(report.get("parity_scope"), "")
    md = ["# Compression report", "", *[f"- {line}" for line in _size_lines(report)], "",
          "## Parity", "", *([scope, ""] if scope else []),
          "| check | device | dtype | max abs diff | tolerance | result | detail |", "|---|---|---|---|---|---|---|"]
    md += [f"| {c['name']} | {c['device']} | {c['dtype']} | {c['max_abs_diff']:.2e} | {c['tolerance']:.0e} | "
           f"{'pass' if c['passed'] else 'FAIL'} | {c.get('detail', '').replace('|', '/')} |" for c in report["parity"]]
    md += ["", "## Calibration and quality", "", *quality_markdown(report.get("calibration"), report.get("quality"))]
    md += ["", "## Layers", "", "| layer | heads | kv heads | mlp hidden | attn in | attn out | mlp in | mlp out |",
           "|---|---|---|---|---|---|---|---|"]
    md += [f"| {i} | {lay['heads']} | {lay['kv_heads']} | {lay['mlp_hidden']} | {lay['attn_in']} | "
           f"{lay['attn_out']} | {lay['mlp_in']} | {lay['mlp_out']} |" for i, lay in enumerate(report["layers"])]
    (folder / "report.md").write_text("\n".join(md) + "\n")
