"""Parity checks, as DESIGN.md defines them, with every tolerance in one table.

1. equivalence: slim logits == dense model with the plan applied as masks (and rewritten tensors);
2. identity:    a keep-all slim model == the dense model;
3. generation:  32 greedy tokens identical between slim and masked dense (KV cache on both);
run on CPU in float64 always and on CUDA in float16 and bfloat16 when a GPU is present.

Why float64 on CPU: in float32 the slim model and the masked dense model differ by summation
order, and that noise grows with depth and logit size (about 1e-2 on a 30-layer model with
|logits| near 40), so any fixed float32 tolerance either raises false alarms on deep models or
hides real mistakes on shallow ones. In float64 a correct plan agrees to about 1e-12 at any
depth, while one wrong index moves logits by orders of magnitude more than the tolerance.
Half precision cannot promise that; its tolerances are bounds on rounding, not proofs.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from compress.adapters import Adapter
from compress.errors import ParityError
from compress.masking import masked, plan_masks, replaced_weights
from compress.plan import Plan
from compress.slimming import build_slim_model

__all__ = ["TOLERANCES", "ONNX_TOLERANCES", "GENERATION_TOKENS", "Check", "parity_batch", "run_parity", "raise_on_failure", "parity_targets"]

# Max |logit difference| allowed, per dtype. float64 (the CPU check) leaves room for rounding
# only; float32 (the folder check, same tensors through the same code) differs by summation
# order at most; half precisions round every matmul of different inner width differently.
TOLERANCES = {
    "float64": 1e-6,
    "float32": 1e-4,
    "float16": 2e-2,
    "bfloat16": 1.5e-1,
}
# ONNX (onnxruntime) vs slim PyTorch logits, prefill and every decode step.
ONNX_TOLERANCES = {
    "float32": 1e-4,
    "float16": 1e-2,
}
GENERATION_TOKENS = 32


@dataclass
class Check:
    name: str
    device: str
    dtype: str
    max_abs_diff: float
    tolerance: float
    passed: bool
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        return (f"{mark} {self.name:<12} {self.device:<5} {self.dtype:<9} max|diff| {self.max_abs_diff:.2e}"
                f" (tol {self.tolerance:.0e}){'  ' + self.detail if self.detail else ''}")

    def to_dict(self) -> dict:
        return asdict(self)


def parity_targets() -> list[tuple[str, torch.dtype]]:
    """(device, dtype) pairs to check on this machine."""
    targets = [("cpu", torch.float64)]
    if torch.cuda.is_available():
        targets += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
    return targets


def parity_batch(ids: torch.Tensor, rows: int = 3, length: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A small batch from token windows, the last row left-padded so masks and positions are exercised."""
    ids = ids[:rows, :length].clone()
    mask = torch.ones_like(ids)
    if ids.shape[0] > 1:
        pad = ids.shape[1] // 4
        mask[-1, :pad] = 0
        ids[-1, :pad] = 0
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def _logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits.double()


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@torch.no_grad()
def _greedy(model, ids, mask, n: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


def _check(name, device, dtype, diff, detail="", passed=None) -> Check:
    tol = TOLERANCES[dtype]
    return Check(name, device, dtype, diff, tol, (diff <= tol) if passed is None else passed, detail)


def run_parity(dense, adapter: Adapter, plan: Plan, replaced: dict | None, ids: torch.Tensor,
               targets=None) -> list[Check]:
    """All checks for one plan, each target's slim model built from the dense one at that dtype.

    `dense` stays where it is; a copy is moved for each other target. That the files on disk
    hold exactly these tensors is `check_files`' job.
    """
    checks = []
    ids, mask = parity_batch(ids)
    g = adapter.geometry()
    for device, dtype in targets or parity_targets():
        dname = str(dtype).removeprefix("torch.")
        w = next(dense.parameters())
        d = dense if (w.device.type, w.dtype) == (device, dtype) else copy.deepcopy(dense).to(device, dtype)
        s = build_slim_model(d, adapter, plan, replaced)
        x, m = ids.to(device), mask.to(device)
        with replaced_weights(d, replaced), masked(d, adapter, plan_masks(plan, g)):
            ref = _logits(d, x, m)
            ref_tokens = _greedy(d, x[:1], m[:1], GENERATION_TOKENS)
        out = _logits(s, x, m)
        checks.append(_check("equivalence", device, dname, _max_diff(ref, out, m)))
        tokens = _greedy(s, x[:1], m[:1], GENERATION_TOKENS)
        del s  # one slim model alive at a time: the keep-all one below is dense-sized
        same = int((tokens == ref_tokens).all(-1).sum())
        checks.append(_check("generation", device, dname, 0.0, f"{same}/1 greedy runs of {GENERATION_TOKENS} "
                             "tokens identical", passed=bool(torch.equal(tokens, ref_tokens))))
        keep_all = build_slim_model(d, adapter, Plan.keep_all(g))
        checks.append(_check("identity", device, dname, _max_diff(_logits(d, x, m), _logits(keep_all, x, m), m)))
    return checks


def raise_on_failure(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        raise ParityError("parity failed: " + "; ".join(
            f"{c.name} on {c.device}/{c.dtype} max|diff| {c.max_abs_diff:.2e} > {c.tolerance:.0e}"
            if c.max_abs_diff > c.tolerance else f"{c.name} on {c.device}/{c.dtype}: {c.detail}" for c in failed))
