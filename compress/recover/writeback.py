"""Trained slim tensors back to dense names and shapes, so a recovered model is still a plan plus
`replaced` tensors and every parity check keeps its meaning (slim == the dense model masked by the
plan, with the replaced tensors swapped in).

Where each slim element comes from is not re-derived here: the slimmer itself is run on index
codes. Every dense tensor a layer's slim tensors read from is replaced by its elements' global
numbers (an arange), `slim_layer_state_dict` cuts those exactly as it cuts weights (rows, columns,
fused q/k/v slices, biases, norms), and each slim element's number then names its dense tensor and
position. A trained value is written to that position; pruned positions keep what they held (they
are masked). `check_round_trip` proves the result rebuilds the trained slim model bit for bit.
"""

from __future__ import annotations

import bisect

import torch

from compress.errors import ParityError
from compress.plan import Plan
from compress.slimming import slim_layer_state_dict, slim_shared_state_dict, slim_state_dict

__all__ = ["TRAINED_PREFIXES", "trainable", "write_back", "check_round_trip"]

# The slim tensors recovery trains: every decoder-layer parameter and the final norm. The
# embeddings and LM head are never pruned and stay the dense model's (tied to each other in many
# models, so rewriting one would untie them).
TRAINED_PREFIXES = ("model.layers.", "model.norm.")


def trainable(name: str) -> bool:
    return name.startswith(TRAINED_PREFIXES)


class _Codes:
    """Global element numbers for a set of dense tensors, and the way back from a number."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.names, self.starts, self.codes, n = [], [], {}, 0
        for name, t in tensors.items():
            self.names.append(name)
            self.starts.append(n)
            self.codes[name] = torch.arange(n, n + t.numel(), device=t.device).view(t.shape)
            n += t.numel()

    def source(self, code: torch.Tensor) -> tuple[str, torch.Tensor]:
        """The dense tensor a slim tensor of codes was cut from, and the flat positions in it."""
        i = bisect.bisect_right(self.starts, int(code.min())) - 1
        end = self.starts[i + 1] if i + 1 < len(self.starts) else None
        if end is not None and int(code.max()) >= end:
            raise ParityError(f"a slim tensor reads from more than one dense tensor ({self.names[i]} and after)")
        return self.names[i], code.flatten() - self.starts[i]


def _scatter(base: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`base` (dense-shaped) with the trained `values` written at its flat `positions`."""
    out = base.detach().clone()
    out.view(-1)[positions] = values.detach().reshape(-1).to(out.dtype)
    return out


def _dense_tensors(model, replaced: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The dense tensors under `prefix` as the slimmer reads them: replaced ones win, and a replaced
    tensor the dense model lacks (e.g. FLAP's added bias) is included."""
    out = {n: p for n, p in model.named_parameters() if n.startswith(prefix)}
    out.update({n: t for n, t in replaced.items() if n.startswith(prefix)})
    return out


def _sources(model, adapter, plan: Plan, replaced: dict) -> list[tuple[dict[str, torch.Tensor], _Codes]]:
    """Per decoder layer (then the shared tensors): its slim tensors as codes, and their decoder."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        codes = _Codes(_dense_tensors(model, replaced, names[layer] + "."))
        sd = slim_layer_state_dict(model, adapter, plan, i, {**replaced, **codes.codes})
        out.append(({f"model.layers.{i}.{k}": v for k, v in sd.items()}, codes))
    norm = names[adapter.final_norm(model)] + "."
    codes = _Codes(_dense_tensors(model, replaced, norm))
    sd = slim_shared_state_dict(model, adapter, {**replaced, **codes.codes})
    out.append(({k: v for k, v in sd.items() if k.startswith("model.norm.")}, codes))
    return out


def write_back(model, adapter, plan: Plan, replaced: dict[str, torch.Tensor] | None,
               trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`replaced` updated with the `trained` slim tensors (slim names) at their dense positions, in
    the dense tensors' dtypes. Every trained tensor must find its place."""
    replaced = dict(replaced or {})
    out, placed = dict(replaced), set()
    for slim, codes in _sources(model, adapter, plan, replaced):
        for name, code in slim.items():
            if name not in trained:
                continue
            dense, positions = codes.source(code)
            base = out[dense] if dense in out else model.get_parameter(dense)
            out[dense] = _scatter(base, positions.to(base.device), trained[name].to(base.device))
            placed.add(name)
    missing = sorted(set(trained) - placed)
    if missing:
        raise ParityError(f"trained tensors with no dense place: {missing[:5]}")
    return out


def check_round_trip(model, adapter, plan: Plan, replaced: dict[str, torch.Tensor],
                     trained: dict[str, torch.Tensor]) -> None:
    """The slim model rebuilt from dense + plan + `replaced` holds exactly the trained tensors (in
    the dense dtype): what was trained and measured is what gets exported."""
    rebuilt = slim_state_dict(model, adapter, plan, replaced)
    wrong = [n for n, t in trained.items()
             if n not in rebuilt or rebuilt[n].shape != t.shape
             or not torch.equal(rebuilt[n], t.detach().to(rebuilt[n].device, rebuilt[n].dtype))]
    if wrong:
        raise ParityError(f"the recovered tensors do not rebuild the trained slim model: {wrong[:5]}")
