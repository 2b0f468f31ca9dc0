"""Probe Pruning (arXiv 2502.15618) in the slim model: a sibling of modeling_slim.py, copied into
every exported folder with it, and like it importing only torch.

When the config has `probe`: per batch, each probed sublayer
picks the query heads / MLP channels it runs. A probe (the top half of token positions, then
the top 5% of samples, by L2 norm of the residual stream) runs through the sublayer with all
its weights; its mean squared activations at the `o_proj` / `down_proj` inputs are fused with
a calibration history per position and channel (r = P / (P + H + 1e-6), (1 - r) H + r P,
summed over the probe positions); channel j scores fused_j * ||W[:, j]^2||_2, a head the
norm of its channels' scores. The top heads (the same number in every KV group; k/v and so
the KV cache stay whole) and channels are gathered from the weights and the whole batch runs
on them. The choice made at prefill is kept on the KV cache object for the request's decode
steps, so decoding reads only the kept weights and generation is consistent. A layer whose
kept counts equal its width is never probed: with nothing to remove, the model is static.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_slim import SlimConfig


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a q projection (columns of o) that belong to the given heads: a copy of
    `compress.helpers.head_rows` (this folder imports nothing of compress), held equal by a test."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def probe_buffers(module: nn.Module, config: SlimConfig, keep: int, units: int, channels: int) -> bool:
    """Register a probed sublayer's calibration history and weight norms; False if not probed."""
    if not config.probe or not units or keep >= units:
        return False
    # history: per position and channel, the mean of X^2 at the consumer's input (calibration);
    # w2: per input channel of the consumer, ||W[:, j]^2||_2, so a score costs no pass over W.
    module.register_buffer("probe_history", torch.zeros(config.probe["history_len"], channels))
    module.register_buffer("probe_w2", torch.zeros(channels))
    return True


def probe_run(model, cache, past: int, token_mask: torch.Tensor, position_ids: torch.Tensor) -> ProbeRun:
    """One pass of `model` (a SlimModel): under a forced choice, else the prefill's on decode steps, else fresh."""
    if model.probe_forced:
        selection = {}
        for (i, part), given in model.probe_forced.items():
            module = model.layers[i].self_attn if part == "attn" else model.layers[i].mlp
            # indices, or what `gather` returned for them (an ONNX step graph's inputs)
            selection[(i, part)] = given if isinstance(given, dict) else module.gather(given.to(token_mask.device))
    else:
        selection = (getattr(cache, "probe_selection", None) if cache is not None and past else None) or {}
    return ProbeRun(model.config.probe, token_mask.float(), position_ids.expand(token_mask.shape), selection)


class ProbeRun:
    """One forward pass of a probe-pruned model: each probed sublayer's choice, made once.

    `selection` maps (layer, "attn" | "mlp") to the gathered weights and their indices; it
    starts with what an earlier step (the request's prefill) or a caller forced, and what is
    missing is chosen by probing now.
    """

    def __init__(self, settings: dict, token_mask: torch.Tensor, position_ids: torch.Tensor, selection: dict):
        self.settings, self.selection = settings, selection
        self.token_mask, self.position_ids = token_mask, position_ids

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe: top token positions (L2 over the batch), then top samples over those, in order."""
        norms = x.float().norm(dim=-1) * self.token_mask  # [B, T]; padding never probes
        B, T = norms.shape
        # ceil(T * positions) and floor(B * samples), in integers so that an exported graph keeps
        # them symbolic (shares in units of 1e-4)
        p, s = round(self.settings["positions"] * 10000), round(self.settings["samples"] * 10000)
        t = torch.sym_max(1, (T * p + 9999) // 10000)
        b = torch.sym_max(1, (B * s) // 10000)
        pos = norms.norm(dim=0).topk(t).indices.sort().values
        smp = norms.index_select(1, pos).norm(dim=1).topk(b).indices.sort().values
        return smp, pos

    def _scores(self, module: nn.Module, act: torch.Tensor, smp, pos) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """PP importance of each consumer input channel from the probe's activations [b, t, C]."""
        hist = module.probe_history
        pid = self.position_ids.index_select(0, smp).index_select(1, pos).clamp(0, hist.shape[0] - 1)
        probe = act.float().pow(2).mean(0)  # [t, C]
        past = hist[pid].float().mean(0)
        r = probe / (probe + past + 1e-6)
        fused = ((1 - r) * past + r * probe).sum(0)
        return fused * module.probe_w2.float(), pid, probe

    def _update(self, module, pid, probe, kept: torch.Tensor) -> None:
        """EMA of the history at the probed positions, kept channels only (when configured)."""
        m = self.settings.get("momentum")
        if m is None:
            return
        hist = module.probe_history
        rows = pid.reshape(-1)
        new = probe.to(hist.dtype).repeat(pid.shape[0], 1).index_select(1, kept)
        hist[rows[:, None], kept[None, :]] = m * hist[rows][:, kept] + (1 - m) * new

    def attention(self, layer, x, a, cos, sin) -> dict:
        key = (layer.layer_idx, "attn")
        if key not in self.selection:
            attn = layer.self_attn
            smp, pos = self._tokens(x)
            seen = self.token_mask.index_select(0, smp).index_select(1, pos).bool()
            t = pos.shape[0]
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = causal[None] & seen[:, None, :]
            mask = (mask | ~mask.any(-1, keepdim=True))[:, None]
            cs = [None if c is None else c.index_select(0, smp).index_select(2, pos) for c in (cos, sin)]
            ctx = attn.context(a.index_select(0, smp).index_select(1, pos), cs[0], cs[1], mask, None, None,
                               attn.q_proj.weight, attn.q_proj.bias, attn.kv_map if attn.kv_heads != attn.heads else None)
            scores, pid, probe = self._scores(attn, ctx, smp, pos)
            heads = attn.choose(scores)
            self._update(attn, pid, probe, head_rows(heads, attn.head_dim))
            self.selection[key] = attn.gather(heads)
        return self.selection[key]

    def mlp(self, layer, x, b) -> dict:
        key = (layer.layer_idx, "mlp")
        if key not in self.selection:
            mlp = layer.mlp
            smp, pos = self._tokens(x)
            scores, pid, probe = self._scores(mlp, mlp.hidden(b.index_select(0, smp).index_select(1, pos)), smp, pos)
            channels = mlp.choose(scores)
            self._update(mlp, pid, probe, channels)
            self.selection[key] = mlp.gather(channels)
        return self.selection[key]
