"""Probe Pruning (arXiv 2502.15618) at export: per-layer kept counts, calibration history, weight norms.

The run-time half (probe, fusion, selection, gathers, decode reuse) lives in the slim modeling
file; this module decides what it needs and computes it from a static slim model:

- counts: one share removed from every probed layer's MLP channels and, with `heads`, query
  heads (the same number in every KV group, each group keeping one, or anywhere with one query
  head per KV head; k/v and the KV cache stay whole); the heads' share is rounded to whole heads per group and the MLP share solved so
  the whole model skips `ratio` of the static slim model's decoder linear weights per batch. The first `skip_layers` layers are never probed
  (default: a tenth of the layers, the paper's 3 of 32); their share moves to the others.
- history: per position and channel, the mean of X^2 at each probed `o_proj` / `down_proj`
  input over the calibration windows, from the static slim model (the probe's prior).
- w2: per consumer input channel j, ||W[:, j]^2||_2, so a score costs no pass over the weights.
"""

from __future__ import annotations

import copy
import math

import torch
from tqdm.auto import tqdm

from compress.errors import CompressError
from compress.helpers import check_ratio
from compress.plan import LayerPlan, Plan
from compress.slim import SlimConfig, SlimForCausalLM

__all__ = ["DEFAULTS", "probe_runtime", "with_probe", "build_serving_model", "probe_counts", "runtime_ratio",
           "probe_flops_share",
           "probe_state", "full_selection", "random_selection", "selection_plan"]

# positions / samples: the probe's share of token positions and of samples (the paper's 50% / 5%);
# history_windows: calibration windows averaged into the history; momentum: EMA of history
# updates while serving (None: off, so serving is deterministic).
# heads: also prune query heads per batch (off: on the shipped reference model at 0.4, pruning
# half the heads of every layer took perplexity from 48.7 to 114, MLP channels alone to 51.0).
DEFAULTS = {"skip_layers": None, "heads": False, "positions": 0.5, "samples": 0.05, "history_windows": 128,
            "momentum": None}


def probe_runtime(ratio: float, **settings) -> dict:
    """The `Plan.runtime` record of Probe Pruning at `ratio`."""
    check_ratio(ratio, "the run-time ratio (--runtime-ratio)",
                "share of the slim model's decoder-layer linear weights skipped per batch")
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"probe: unknown settings {sorted(unknown)}")
    return {"kind": "probe", "ratio": ratio, **DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}


def _costs(c: SlimConfig, i: int) -> tuple[int, int]:
    """Weights one query head / one MLP channel of layer i costs (biases excluded)."""
    head = c.head_dim * (c.layer_attn_in[i] + c.layer_attn_out[i])
    channel = (2 if c.gated_mlp else 1) * c.layer_mlp_in[i] + c.layer_mlp_out[i]
    return head, channel


def _linear_params(c: SlimConfig, heads: list[int], widths: list[int]) -> int:
    total = 0
    for i in range(c.num_hidden_layers):
        head, channel = _costs(c, i)
        kv = c.layer_kv_heads[i] if heads[i] else 0
        total += heads[i] * head + 2 * kv * c.head_dim * c.layer_attn_in[i] + widths[i] * channel
    return total


def runtime_ratio(c: SlimConfig) -> float:
    """Share of the static slim model's decoder linear weights a probed batch skips."""
    before = _linear_params(c, c.layer_heads, c.layer_intermediate)
    return 1.0 - _linear_params(c, c.layer_probe_heads, c.layer_probe_intermediate) / before


def probe_flops_share(c: SlimConfig, batch: int, seq: int) -> float:
    """FLOPs of the probe over those of the static model's forward on `batch` x `seq` tokens
    (multiply-adds x 2 of the linears, the LM head and causal attention; norms and the score
    arithmetic are left out as negligible)."""
    p = c.probe
    t = max(1, -(-seq * round(p["positions"] * 10000) // 10000))
    b = max(1, batch * round(p["samples"] * 10000) // 10000)

    def attention(n, length, heads):
        return 2 * n * length * heads * c.head_dim  # QK^T and AV over a causal half, x 2 FLOPs

    full = 2 * batch * seq * (_linear_params(c, c.layer_heads, c.layer_intermediate) + c.vocab_size * c.hidden_size)
    full += sum(attention(batch * seq, seq, h) for h in c.layer_heads)
    probe = 0
    for i in range(c.num_hidden_layers):
        head, channel = _costs(c, i)
        if c.layer_probe_heads[i] < c.layer_heads[i]:  # q/k/v on the probe and attention among it
            qkv = c.layer_attn_in[i] * c.head_dim * (c.layer_heads[i] + 2 * c.layer_kv_heads[i])
            probe += 2 * b * t * qkv + attention(b * t, t, c.layer_heads[i])
        if c.layer_probe_intermediate[i] < c.layer_intermediate[i]:  # gate/up on the probe
            probe += 2 * b * t * c.layer_intermediate[i] * (2 if c.gated_mlp else 1) * c.layer_mlp_in[i]
    return probe / full


def probe_counts(c: SlimConfig, ratio: float, skip_layers: int | None, regular_groups: list[bool]) -> tuple[list[int], list[int]]:
    """(query heads, MLP channels) each layer keeps per batch. Layer i's heads are pruned only if
    `regular_groups[i]` (they form equal contiguous KV groups); else the MLP carries the share."""
    n = c.num_hidden_layers
    skip = n // 10 if skip_layers is None else skip_layers
    if not 0 <= skip < n:
        raise CompressError(f"--probe-skip-layers must be in [0, {n}), got {skip}")
    probed = [i for i in range(skip, n) if c.layer_heads[i] or c.layer_intermediate[i]]
    target = ratio * _linear_params(c, c.layer_heads, c.layer_intermediate)
    prunable = sum(c.layer_heads[i] * _costs(c, i)[0] * regular_groups[i]
                   + c.layer_intermediate[i] * _costs(c, i)[1] for i in probed)
    share = target / prunable if prunable else math.inf
    heads, widths = list(c.layer_heads), list(c.layer_intermediate)
    removed = 0
    for i in probed:
        if regular_groups[i] and c.layer_heads[i]:
            kv = c.layer_kv_heads[i]
            group = c.layer_heads[i] // kv
            if group == 1:  # one query head per KV head: heads go anywhere (their k/v stay cached)
                group, kv = kv, 1
            per_group = min(group - 1, round(share * group))
            heads[i] -= per_group * kv
            removed += per_group * kv * _costs(c, i)[0]
    mlp = sum(c.layer_intermediate[i] * _costs(c, i)[1] for i in probed)
    fraction = max(0.0, target - removed) / mlp if mlp else math.inf
    if fraction >= 1.0:
        raise CompressError(f"a run-time ratio of {ratio} removes more than the probed layers' MLPs and "
                            f"query heads hold (lower it, or skip fewer layers)")
    for i in probed:
        if c.layer_intermediate[i]:
            widths[i] = max(1, c.layer_intermediate[i] - round(fraction * c.layer_intermediate[i]))
    return heads, widths


def _regular_groups(slim: SlimForCausalLM) -> list[bool]:
    out = []
    for layer in slim.model.layers:
        attn = layer.self_attn
        if not attn.heads or attn.heads % attn.kv_heads:
            out.append(False)
            continue
        want = torch.arange(attn.kv_heads, device=attn.kv_map.device).repeat_interleave(attn.heads // attn.kv_heads)
        out.append(bool(torch.equal(attn.kv_map, want)))
    return out


@torch.no_grad()
def probe_state(slim: SlimForCausalLM, config: SlimConfig, calib: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """History and weight-norm buffers of every sublayer `config` probes, from the static `slim`."""
    consumers = {}
    for i, layer in enumerate(slim.model.layers):
        if config.layer_probe_heads[i] < config.layer_heads[i]:
            consumers[f"model.layers.{i}.self_attn"] = layer.self_attn.o_proj
        if config.layer_probe_intermediate[i] < config.layer_intermediate[i]:
            consumers[f"model.layers.{i}.mlp"] = layer.mlp.down_proj
    T = calib.shape[1]
    sums = {name: torch.zeros(T, m.in_features, dtype=torch.float64) for name, m in consumers.items()}

    def record(name):
        def hook(_module, args):
            sums[name].add_(args[0].detach().double().pow(2).sum(0).cpu())
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in consumers.items()]
    device = next(slim.parameters()).device
    try:
        for start in tqdm(range(0, calib.shape[0], batch_size), desc="probe history", unit="batch", leave=False):
            slim(input_ids=calib[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    dtype = slim.model.embed_tokens.weight.dtype
    state = {}
    for name, m in consumers.items():
        state[f"{name}.probe_history"] = (sums[name] / calib.shape[0]).to(device, dtype)
        state[f"{name}.probe_w2"] = m.weight.detach().double().pow(4).sum(0).sqrt().to(dtype)
    return state


def with_probe(slim: SlimForCausalLM, runtime: dict, calib: torch.Tensor) -> SlimForCausalLM:
    """`slim` (a static slim model) with Probe Pruning at `runtime["ratio"]`, sharing its weights."""
    from compress.slimming import slim_model

    if runtime.get("kind") != "probe":
        raise CompressError(f"unknown run-time pruning {runtime.get('kind')!r}")
    if calib is None or calib.dim() != 2:
        raise CompressError("Probe Pruning needs calibration token ids [windows, seq_len] for its history")
    windows = calib[: runtime["history_windows"]]
    config = copy.deepcopy(slim.config)
    groups = _regular_groups(slim) if runtime["heads"] else [False] * config.num_hidden_layers
    heads, widths = probe_counts(config, runtime["ratio"], runtime["skip_layers"], groups)
    config.layer_probe_heads, config.layer_probe_intermediate = heads, widths
    config.probe = {"positions": runtime["positions"], "samples": runtime["samples"],
                    "momentum": runtime["momentum"], "history_len": windows.shape[1]}
    state = {**slim.state_dict(), **probe_state(slim, config, windows)}
    return slim_model(config, state)


def build_serving_model(model, adapter, plan: Plan, replaced=None, calib: torch.Tensor | None = None):
    """The model a folder serves: the static slim model, with its run-time pruning if the plan has one."""
    from compress.slimming import build_slim_model

    slim = build_slim_model(model, adapter, plan, replaced)
    return with_probe(slim, plan.runtime, calib) if plan.runtime else slim


def _probed(pp: SlimForCausalLM):
    for i, layer in enumerate(pp.model.layers):
        if layer.self_attn.probed:
            yield (i, "attn"), layer.self_attn
        if layer.mlp.probed:
            yield (i, "mlp"), layer.mlp


def full_selection(pp: SlimForCausalLM) -> dict:
    """Every head and channel of every probed sublayer: forced, the model computes the static one."""
    return {key: torch.arange(m.heads if key[1] == "attn" else m.width) for key, m in _probed(pp)}


def random_selection(pp: SlimForCausalLM, seed: int = 0) -> dict:
    """A random choice with the counts the probe keeps (heads: the same number in every KV group)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, m in _probed(pp):
        if key[1] == "attn":
            groups = m.probe_groups
            group = m.heads // groups
            ranks = torch.rand(groups, group, generator=gen).argsort(1)[:, : m.probe_keep // groups]
            out[key] = (ranks.sort(1).values + torch.arange(groups)[:, None] * group).reshape(-1)
        else:
            out[key] = torch.randperm(m.width, generator=gen)[: m.probe_keep].sort().values
    return out


def selection_plan(plan: Plan, g, selection: dict) -> Plan:
    """The static plan that keeps what `selection` (indices into the slim layers) keeps: the
    independent reference of the gather path (k/v heads stay those of the static plan)."""
    layers = []
    for i, lp in enumerate(plan.layers):
        r = lp.resolved(g)
        heads, hidden = r.heads, r.mlp_hidden
        if (i, "attn") in selection:
            heads = [r.heads[j] for j in selection[(i, "attn")].tolist()]
        if (i, "mlp") in selection:
            hidden = [r.mlp_hidden[j] for j in selection[(i, "mlp")].tolist()]
        layers.append(LayerPlan(attn_in=r.attn_in, attn_out=r.attn_out, mlp_in=r.mlp_in, mlp_out=r.mlp_out,
                                heads=heads, kv_heads=r.kv_heads, mlp_hidden=hidden))
    return Plan(layers=layers, base=plan.base)
