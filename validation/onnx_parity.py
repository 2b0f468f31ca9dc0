"""ONNX parity: onnxruntime running an exported graph == the slim PyTorch model it came from,
prefill and every decode step, and the same greedy tokens; with its own tolerances, since an
ONNX graph runs in float32 or float16, never in float64 as the PyTorch checks do.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from compress.helpers import torch_dtype
from compress.slim.modeling_slim import CACHE_NAME
from validation.parity import GENERATION_TOKENS, Check

__all__ = ["ONNX_TOLERANCES", "NOISE_FACTOR", "onnx_checks", "compare_onnx"]

# Max |logit difference| of onnxruntime from the float64 slim model, per ONNX dtype: at least
# these, and NOISE_FACTOR times PyTorch's own error at the same dtype.
ONNX_TOLERANCES = {
    "float32": 1e-4,
    "float16": 1e-2,
}
NOISE_FACTOR = 4


def onnx_checks(slim, onnx_path: str | Path, dtype: str, ids: torch.Tensor) -> list[Check]:
    """ONNX (onnxruntime) vs slim PyTorch on every available execution provider.

    Both are held against the slim model in float64 (for Probe Pruning, forced to PyTorch's
    choice, which onnxruntime's prefill must repeat index for index): onnxruntime may differ from
    it by at most NOISE_FACTOR times PyTorch's own rounding error at this dtype and depth (a
    floor from ONNX_TOLERANCES), since two correct float32 programs that sum in different orders
    differ by about that much. Greedy tokens must be identical in float32 and are reported in float16.
    On CUDA, TF32 is turned off in onnxruntime, as it is in PyTorch by default: like with like.
    """
    from compress.runtime.onnx_runner import OnnxRunner, default_providers

    checks = []
    for provider in default_providers():
        cuda = provider == "CUDAExecutionProvider"
        if cuda and not torch.cuda.is_available():
            continue
        device = "cuda" if cuda else "cpu"
        runner = OnnxRunner(onnx_path, providers=[(provider, {"use_tf32": "0"}) if cuda else provider])
        r = compare_onnx(slim.to(device, torch_dtype(dtype)), runner, ids.to(device))
        floor = ONNX_TOLERANCES[dtype]
        if "error" in r:
            checks.append(Check("onnx", device, dtype, float("inf"), floor, False, r["error"]))
            continue
        tol = max(floor, NOISE_FACTOR * r["torch_float64_error"])
        same = r["greedy_tokens_equal"] and r["probe_indices_equal"]
        probe = "" if not getattr(slim.model, "probing", False) else (
            f"; probe indices {'identical' if r['probe_indices_equal'] else 'DIFFER'}")
        checks.append(Check(
            "onnx", device, dtype, r["float64_error"], tol, r["float64_error"] <= tol and (same or dtype != "float32"),
            f"{runner.config.get('graph', 'traced')} graph; vs float64: PyTorch {dtype} {r['torch_float64_error']:.1e}; "
            f"vs PyTorch {dtype}: prefill "
            f"{r['prefill_max_abs_diff']:.1e}, decode max {max(r['decode_max_abs_diff']):.1e}; "
            f"{GENERATION_TOKENS} greedy tokens {'identical' if r['greedy_tokens_equal'] else 'DIFFER'}"
            f"{' (KV buffers in place)' if runner.shares_cache else ''}{probe}"))
    slim.to("cpu", torch.float32)
    return checks


def compare_onnx(slim, runner, input_ids, steps: int = GENERATION_TOKENS) -> dict:
    """Run onnxruntime, the slim model and its float64 copy in lockstep: prefill, then one token per
    step, every side fed the same (PyTorch greedy) token so the diffs measure the graph, not a
    diverged sequence; then greedy generation on both. Numbers only; an exception becomes {"error": ...}.
    """
    ids = input_ids.cpu().numpy() if torch.is_tensor(input_ids) else np.asarray(input_ids)
    try:
        return _lockstep(slim, runner, np.atleast_2d(ids).astype(np.int64), steps)
    except Exception as e:  # noqa: BLE001 - the caller compares numbers to tolerances and reports
        return {"error": f"{type(e).__name__}: {e}", "steps": steps}


@torch.no_grad()
def _lockstep(slim, runner, ids, steps: int) -> dict:
    device = next(slim.parameters()).device
    exact = copy.deepcopy(slim).to("cpu", torch.float64)
    mask = np.ones_like(ids)
    caches = (DynamicCache(), DynamicCache())  # full caches: the slim mask handles any sliding window itself
    diffs, onnx_err, torch_err, argmax_equal = [], [], [], True
    nxt, past = ids, None
    probing = getattr(slim.model, "probing", False)
    same_choice = True
    for step in range(steps + 1):  # prefill, then one token per step
        x, m = torch.from_numpy(nxt), torch.from_numpy(mask)
        ref = slim(input_ids=x.to(device), attention_mask=m.to(device), cache=caches[0]).logits.double().cpu().numpy()
        if probing and step == 0:  # float64 follows PyTorch's choice: the diffs measure arithmetic
            chosen = {k: sel["index"].cpu() for k, sel in caches[0].probe_selection.items()}
            exact.model.probe_forced = chosen
        ref64 = exact(input_ids=x, attention_mask=m, cache=caches[1]).logits.numpy()
        logits, past = runner.forward(nxt, mask, past=past)
        if probing and step == 0:
            from exporters.onnx_export import probe_keys

            n = len(runner.past_names)
            onnx_choice = past[n:n + len(runner.probe_index_names)]
            same_choice = len(onnx_choice) == len(chosen) and all(
                np.array_equal(_numpy(c), chosen[k].numpy()) for k, c in zip(probe_keys(slim), onnx_choice))
        logits = logits.astype(np.float64)
        diffs.append(float(np.abs(logits - ref).max()))
        onnx_err.append(float(np.abs(logits - ref64).max()))
        torch_err.append(float(np.abs(ref - ref64).max()))
        nxt = ref[:, -1].argmax(-1)[:, None].astype(np.int64)
        argmax_equal &= bool((logits[:, -1].argmax(-1) == nxt[:, 0]).all())
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
    del exact

    t_ids = torch.from_numpy(ids).to(device)
    torch_tokens = slim.generate(t_ids, attention_mask=torch.ones_like(t_ids), do_sample=False, max_new_tokens=steps,
                                 eos_token_id=None, pad_token_id=0, **{CACHE_NAME: DynamicCache()},
                                 )[:, ids.shape[1]:].cpu().numpy()
    onnx_tokens = runner.generate(ids, max_new_tokens=steps, eos_token_id=None).new_ids
    n = min(torch_tokens.shape[1], onnx_tokens.shape[1])
    differ = np.nonzero((torch_tokens[:, :n] != onnx_tokens[:, :n]).any(0))[0]
    return {
        "steps": steps,
        "dtype": runner.dtype_name,
        "provider": runner.provider,
        "prefill_max_abs_diff": diffs[0],  # onnxruntime vs PyTorch at the same dtype
        "decode_max_abs_diff": diffs[1:],
        "max_abs_diff": max(diffs),
        "float64_error": max(onnx_err),  # onnxruntime vs the float64 slim model
        "torch_float64_error": max(torch_err),  # PyTorch at this dtype vs float64: its rounding error
        "step_argmax_equal": argmax_equal,
        "greedy_tokens_equal": bool(torch_tokens.shape == onnx_tokens.shape and differ.size == 0),
        "greedy_first_mismatch": int(differ[0]) if differ.size else None,
        "probe_indices_equal": same_choice,  # Probe Pruning: the prefill chose what PyTorch chose
    }


def _numpy(value):
    """A runner output as numpy: OrtValues (CUDA, I/O binding) have `.numpy()`, numpy arrays do not."""
    return value.numpy() if hasattr(value, "numpy") else value
