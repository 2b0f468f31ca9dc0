"""The Plan: what every layer keeps. Every method ends in one; every exporter starts from one.

Per layer: residual channels each sublayer reads (`attn_in`, `mlp_in`) and writes (`attn_out`,
`mlp_out`), kept query heads and KV heads, kept MLP hidden channels. `None` means "all";
an empty list of heads or hidden channels removes that sublayer's computation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compress.adapters import Geometry
from compress.errors import PlanMismatchError

__all__ = ["LayerPlan", "Plan", "model_identity", "tensor_digest", "linear_params"]

PLAN_VERSION = 1
RESIDUAL_FIELDS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass
class LayerPlan:
    attn_in: list[int] | None = None
    attn_out: list[int] | None = None
    mlp_in: list[int] | None = None
    mlp_out: list[int] | None = None
    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    mlp_hidden: list[int] | None = None

    def resolved(self, g: Geometry) -> LayerPlan:
        """Explicit index lists everywhere (None -> all; kv_heads -> those the kept heads use)."""
        heads = list(range(g.num_heads)) if self.heads is None else sorted(self.heads)
        kv = self.kv_heads
        if kv is None or not heads:
            kv = sorted({h // g.group_size for h in heads})
        full = list(range(g.hidden))
        return LayerPlan(
            attn_in=full if self.attn_in is None else sorted(self.attn_in),
            attn_out=full if self.attn_out is None else sorted(self.attn_out),
            mlp_in=full if self.mlp_in is None else sorted(self.mlp_in),
            mlp_out=full if self.mlp_out is None else sorted(self.mlp_out),
            heads=heads,
            kv_heads=sorted(kv),
            mlp_hidden=list(range(g.intermediate)) if self.mlp_hidden is None else sorted(self.mlp_hidden),
        )


def linear_params(g: Geometry, lp: LayerPlan | None = None) -> int:
    """Weights of a layer's q/k/v/o and MLP linears (biases excluded): what `--ratio` is a fraction of."""
    r = (lp or LayerPlan()).resolved(g)
    n_in, n_out, h, kv = len(r.attn_in), len(r.attn_out), len(r.heads), len(r.kv_heads)
    attn = n_in * (h + 2 * kv) * g.head_dim + n_out * h * g.head_dim if h else 0
    m = len(r.mlp_hidden)
    mlp = ((2 if g.gated else 1) * len(r.mlp_in) * m + m * len(r.mlp_out)) if m else 0
    return attn + mlp


def model_identity(model, geometry: Geometry, digests: dict[str, bytes] | None = None) -> dict:
    """Architecture, shapes and a fingerprint of the weights, so a plan is not applied to the wrong model.

    The fingerprint hashes every tensor's name, shape, dtype and a strided sample of its values:
    cheap on a 70B model, and any retraining or different checkpoint changes it. `digests`
    (name -> `tensor_digest`) stands in for the model's own tensors when they are not all in
    memory at once (a model streamed from disk).
    """
    if digests is None:
        digests = {name: tensor_digest(name, t) for name, t in model.state_dict().items()}
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(digests[name])
    return {
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        **asdict(geometry),
        "vocab_size": model.config.vocab_size,
        "fingerprint": h.hexdigest()[:32],
    }


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    """What `model_identity` hashes of one tensor: name, shape, dtype, 257 strided values."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 257)
    sample = flat[::step][:257].to("cpu", torch.float32)
    return f"{name}|{tuple(t.shape)}|{t.dtype}|".encode() + sample.numpy().round(6).tobytes()


@dataclass
class Plan:
    layers: list[LayerPlan]
    base: dict = field(default_factory=dict)
    method: str = "none"
    settings: dict = field(default_factory=dict)
    seed: int | None = None
    # Run-time pruning on top of the static widths, e.g. {"kind": "probe", "ratio": 0.2, ...};
    # empty for a static model. See compress/probe.py.
    runtime: dict = field(default_factory=dict)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def keep_all(cls, g: Geometry, base: dict | None = None) -> Plan:
        return cls(layers=[LayerPlan() for _ in range(g.num_layers)], base=base or {})

    # --- parameter accounting ------------------------------------------------------------
    def linear_params(self, g: Geometry) -> tuple[int, int]:
        """(before, after) decoder-layer linear weights."""
        return g.num_layers * linear_params(g), sum(linear_params(g, lp) for lp in self.layers)

    def ratio(self, g: Geometry) -> float:
        before, after = self.linear_params(g)
        return 1.0 - after / before

    # --- validation ----------------------------------------------------------------------
    def check(self, g: Geometry) -> None:
        """Raise PlanMismatchError if any index is out of range, repeated, or breaks GQA."""
        if len(self.layers) != g.num_layers:
            raise PlanMismatchError(f"plan has {len(self.layers)} layers, model has {g.num_layers}")
        for i, lp in enumerate(self.layers):
            for name in RESIDUAL_FIELDS:
                _check_indices(getattr(lp, name), g.hidden, f"layer {i} {name}", allow_empty=False)
            _check_indices(lp.heads, g.num_heads, f"layer {i} heads")
            _check_indices(lp.kv_heads, g.num_kv_heads, f"layer {i} kv_heads")
            _check_indices(lp.mlp_hidden, g.intermediate, f"layer {i} mlp_hidden")
            r = lp.resolved(g)
            missing = sorted({h // g.group_size for h in r.heads} - set(r.kv_heads))
            if missing:
                raise PlanMismatchError(
                    f"layer {i}: query heads kept whose KV heads {missing} are pruned "
                    f"(GQA groups of {g.group_size} query heads share one KV head)"
                )

    def check_identity(self, identity: dict) -> None:
        """Refuse a model whose architecture, shapes or weights differ from the plan's base."""
        for key, want in self.base.items():
            have = identity.get(key)
            if have != want:
                raise PlanMismatchError(f"plan was made for a model with {key}={want!r}, this one has {have!r}; "
                                        "give the dense model it was made from")

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION, "method": self.method, "settings": self.settings, "seed": self.seed,
            "base": self.base, "layers": [{k: v for k, v in asdict(lp).items() if v is not None} for lp in self.layers],
            **({"runtime": self.runtime} if self.runtime else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise PlanMismatchError(f"plan version {d.get('version')!r} is not {PLAN_VERSION}")
        return cls(layers=[LayerPlan(**lp) for lp in d["layers"]], base=d.get("base", {}),
                   method=d.get("method", "none"), settings=d.get("settings", {}), seed=d.get("seed"),
                   runtime=d.get("runtime", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PlanMismatchError(f"{path}: not a valid plan ({e})") from None


def _check_indices(idx: list[int] | None, size: int, what: str, allow_empty: bool = True) -> None:
    if idx is None:
        return
    if not allow_empty and not idx:
        raise PlanMismatchError(f"{what}: empty (a sublayer must read and write at least one channel)")
    if len(set(idx)) != len(idx):
        raise PlanMismatchError(f"{what}: repeated indices")
    if any(not 0 <= j < size for j in idx):
        raise PlanMismatchError(f"{what}: index out of range [0, {size})")
