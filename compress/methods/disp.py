"""DISP: learned, dimension-independent structural pruning (arXiv 2410.11988), as a Plan.

Every sublayer gets its own residual channels: S1 attention input, S2 attention output,
S3 MLP input, S4 MLP hidden, S5 MLP output (plan fields attn_in, attn_out, mlp_in,
mlp_hidden, mlp_out). A hypernetwork (`disp_hypernet`) proposes one logit per channel; the
frozen dense model runs with the Gumbel-sigmoid soft masks through `compress.masking.masked`,
and the loss is next-token cross-entropy + lambda * |log(P_kept / (p * P_total))| on the
hard (straight-through) masks. Only the hypernetwork is trained (AdamW, weight decay 0.05).

Departures from the reference code, each for a reason:
- final masks are deterministic (logit + 3 > 0, no Gumbel noise) and then corrected channel
  by channel to the requested ratio, so the same seed gives the same bytes and the budget is
  met to within one channel;
- `prune_heads` also learns one mask per KV group (all its query heads, and k/v rows), so
  the KV cache and attention FLOPs shrink too; off by default, as in the reference;
- `objective="kl"` (an option; the default is the paper's next-token loss) trains towards the
  dense model's own next-token distribution: the paper's loss also fits the calibration text's
  domain, which lowers perplexity on similar text while moving the model away from the dense one;
- gradient checkpointing wraps each decoder layer in `torch.utils.checkpoint` (CUDA only)
  instead of `gradient_checkpointing_enable()`, which needs train mode and with it dropout.

Default steps: as many batches of 4 x 256 tokens (lr 1e-3) as fit a compute budget, capped.
Training costs about 6 x P x tokens FLOPs (forward and backward through the frozen model; P =
decoder linear weights plus the LM head); the budget is 6e14 FLOPs on CPU and 1e18 on CUDA, with
at most 2,000 steps on CPU and 10,000 on CUDA. The caps bind first on small models: on CPU below
about 49M parameters (6e14 / (6 x 2,000 x 1,024 tokens)), so the shipped reference model trains
2,000 steps and SmolLM2-135M 726; on CUDA below about 16B (1e18 / (6 x 10,000 x 1,024)), so a 7B
model trains 10,000 steps of 1,024 tokens, 10.2M tokens: half of the paper's 20.5M (10,000 steps
of 2,048 tokens on LLaMA-2-7B, 8.6e17 FLOPs). The CUDA default is therefore not the paper's budget
below 16B; `--steps N` (and `--batch-size`, `--seq-len`) set it, and the export prints the choice.
Fewer steps leave masks undecided and cost quality (benchmarks/RESULTS.md has the measurements).
On a CPU shared with other jobs, run one torch thread per free core (the command line's default,
`compress.threads`): two threads contending for one free core slowed a step down 17 times.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from compress.adapters import Adapter, Geometry
from compress.masking import LayerMasks, masked
from compress.methods.base import Method, PruneResult, register
from compress.methods.options import DEFAULTS, OBJECTIVES
from compress.methods.refit import refit_plan
from compress.methods.disp_hypernet import HyperNetwork, OFFSET, budget_loss, gumbel_noise, layer_params, relax
from compress.plan import LayerPlan, Plan, linear_params
from compress.checkpoint import Checkpoint, fingerprint
from compress.sharding import training_model
from compress.training import Batches, budget_steps, checkpointed, frozen

__all__ = ["DISP", "structures", "select", "build_plan", "default_steps"]

KINDS = ("attn_in", "attn_out", "mlp_in", "mlp_hidden", "mlp_out")
GROUPS = "kv_groups"  # one mask per KV group: its query heads and its k/v rows
FLOOR = {k: 1 for k in KINDS} | {GROUPS: 0}  # KV groups may all go: the attention is then removed


def structures(g: Geometry, prune_heads: bool) -> list[tuple[str, int]]:
    """(kind, width) per layer, in the order the hypernetwork's GRU walks them."""
    widths = {"attn_in": g.hidden, "attn_out": g.hidden, "mlp_in": g.hidden,
              "mlp_hidden": g.intermediate, "mlp_out": g.hidden, GROUPS: g.num_kv_heads}
    kinds = KINDS + ((GROUPS,) if prune_heads else ())
    return [(k, widths[k]) for k in kinds]


def _params(g: Geometry, layer: dict):
    return layer_params(g, *(layer[k] for k in KINDS), layer.get(GROUPS))


def _layer_masks(g: Geometry, layer: dict[str, torch.Tensor]) -> LayerMasks:
    groups = layer.get(GROUPS)
    heads = None if groups is None else groups.repeat_interleave(g.group_size)
    return LayerMasks(heads=heads, **{k: layer[k] for k in KINDS})


@register
class DISP(Method):
    name = "disp"
    needs_calibration = True
    defaults = DEFAULTS["disp"]  # layer_targets: set by tyr+disp (Týr's searched per-layer budgets)
    snapshot_steps: frozenset[int] = frozenset()  # steps at which to keep the plan too (benchmarks' steps curve)
    data_parallel = True  # each rank trains on its share of every global batch (--batch-size is global)

    def prune(self, model, adapter: Adapter, ratio: float, calib: torch.Tensor | None, seed: int) -> PruneResult:
        if calib is None or calib.dim() != 2 or calib.shape[1] < 2:
            raise ValueError("disp needs calibration token ids of shape [n_samples, seq_len >= 2]")
        if self.settings["objective"] not in OBJECTIVES:
            raise ValueError(f"disp objective must be one of {', '.join(OBJECTIVES)}, not {self.settings['objective']!r}")
        if self.settings["refit"] < 0:
            raise ValueError("disp: --refit must be >= 0 calibration windows")
        g = adapter.geometry()
        kinds = structures(g, self.settings["prune_heads"])
        steps = self.settings["steps"] or default_steps(model, g, self.settings["batch_size"], calib.shape[1])
        gen = torch.Generator().manual_seed(seed)
        hyper = HyperNetwork([w for _ in range(g.num_layers) for _, w in kinds], gen)
        run = fingerprint(model, adapter, calib, method=self.name, ratio=ratio, seed=seed,
                          **{**self.settings, "steps": steps})
        self._train(model, adapter, hyper, kinds, ratio, calib, gen, steps, run)
        plan = self._plan(g, hyper, kinds, ratio)
        plan.settings = {"steps": steps}  # the resolved default, for the record
        if not self.settings["refit"] or not self.world.writer:  # only rank 0 writes the refit tensors
            return PruneResult(plan)
        return PruneResult(plan, refit_plan(model, adapter, plan, calib[:self.settings["refit"]]))

    def _plan(self, g: Geometry, hyper: HyperNetwork, kinds, ratio: float) -> Plan:
        """The hypernetwork's current deterministic masks, corrected to the budget."""
        with torch.no_grad():
            logits = [t.detach().double().cpu() + OFFSET for t in hyper()]
        scores = _by_layer(logits, kinds)
        targets = self.settings["layer_targets"]
        if targets is None:
            keep = select(g, scores, ratio)
        else:  # each layer corrected to its own budget
            keep = [select(g, [layer], 1.0 - t)[0] for layer, t in zip(scores, targets)]
        return build_plan(g, keep)

    def _masked_loss(self, model, adapter, hyper, kinds, x: torch.Tensor, gen) -> tuple[torch.Tensor, list]:
        """One step's forward: (the objective through the soft masks, the hard masks)."""
        g, device = adapter.geometry(), x.device
        cuda = device.type == "cuda"
        if self.settings["objective"] == "kl":
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                teacher = model(input_ids=x, use_cache=False).logits.float().log_softmax(-1).flatten(0, 1)
        soft, hard = [], []
        for logit in hyper():
            a, b = relax(logit, gumbel_noise(logit.numel(), gen).to(device))
            soft.append(a)
            hard.append(b)
        with masked(model, adapter, [_layer_masks(g, m) for m in _by_layer(soft, kinds)]), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(input_ids=x, use_cache=False).logits
        if self.settings["objective"] == "kl":
            lm = F.kl_div(out.float().log_softmax(-1).flatten(0, 1), teacher, log_target=True, reduction="batchmean")
        else:
            lm = F.cross_entropy(out.float().flatten(0, 1), _next_tokens(x).flatten(), ignore_index=-100)
        return lm, hard

    def _train(self, model, adapter, hyper, kinds, ratio, calib, gen, steps: int, run: dict) -> None:
        """`run`: the fingerprint a saved state must match to be resumed."""
        with training_model(model, adapter, world := self.world) as (dense, device):
            self._loop(dense, device, adapter, hyper, kinds, ratio, calib, gen, steps, run, world)

    def _loop(self, model, device, adapter, hyper, kinds, ratio, calib, gen, steps: int, run: dict, world) -> None:
        """`_train` on the model a step runs (`compress.sharding.training_model`) and its device."""
        s, g = self.settings, adapter.geometry()
        cuda = device.type == "cuda"
        self.snapshots = {}  # step -> the plan `--steps step` gives (same seed, constant lr): a steps curve
        hyper.to(device).train()
        net = hyper if world.size == 1 else DistributedDataParallel(hyper, forward_sync_buffers=False)
        opt = torch.optim.AdamW(hyper.parameters(), lr=s["lr"], weight_decay=0.05)
        total = g.num_layers * linear_params(g)
        target = (1.0 - ratio) * total
        layer_targets = self.settings["layer_targets"]
        if layer_targets is not None:  # a floor: a layer's masks cannot go below one channel each
            layer_targets = [max(t, 0.01) * linear_params(g) for t in layer_targets]
        stream = Batches(calib, s["batch_size"], gen)
        state = Checkpoint(self.store, "disp", run, {"hyper": hyper, "optimizer": opt, "generator": gen,
                                                     "batches": stream}, device)
        start, saved = state.restore()
        self.trace = [tuple(t) for t in saved.get("trace", [])]  # (loss, lm loss, kept fraction) per step
        ckpt = checkpointed(adapter.layers(model)) if cuda else contextlib.nullcontext()
        bar = tqdm(range(start, steps), desc="disp", unit="step", dynamic_ncols=True, initial=start, total=steps,
                   disable=not world.writer)
        with frozen(model), ckpt, state:
            for step in bar:
                lm, hard = self._masked_loss(model, adapter, net, kinds, world.share(next(stream)).to(device), gen)
                per_layer = [_params(g, {k: m.sum() for k, m in layer.items()}) for layer in _by_layer(hard, kinds)]
                kept = sum(per_layer)
                if layer_targets is None:
                    loss = lm + budget_loss(kept, target, s["lam"])
                else:
                    loss = lm + sum(budget_loss(k, t, s["lam"]) for k, t in zip(per_layer, layer_targets)) / len(per_layer)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                both = world.mean(torch.stack([loss.detach(), lm.detach()])).tolist()  # over the global batch
                self.trace.append((*both, kept.item() / total))
                bar.set_postfix({s["objective"]: f"{both[1]:.3f}", "kept": f"{kept.item() / total:.3f}"})
                if step + 1 in self.snapshot_steps and step + 1 < steps:
                    self.snapshots[step + 1] = self._plan(g, hyper, kinds, ratio)
                state.after_step(step + 1, steps, {"trace": self.trace})
        hyper.eval()


def default_steps(model, g: Geometry, batch_size: int, seq_len: int) -> int:
    """Steps of `batch_size` x `seq_len` tokens that fit the device's budget for this model's size."""
    lm_head = model.get_output_embeddings().weight.numel()
    per_step = 6 * (g.num_layers * linear_params(g) + lm_head) * batch_size * seq_len
    return budget_steps(per_step, next(model.parameters()).device.type, "disp", f"{batch_size} x {seq_len} tokens")


def _by_layer(flat: list[torch.Tensor], kinds) -> list[dict[str, torch.Tensor]]:
    n = len(kinds)
    return [{k: flat[i + j] for j, (k, _) in enumerate(kinds)} for i in range(0, len(flat), n)]


def _next_tokens(x: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the logits (last position ignored): no slice of the big logits tensor."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)


def select(g: Geometry, scores: list[dict[str, torch.Tensor]], ratio: float) -> list[dict[str, torch.Tensor]]:
    """Keep masks (bool) from deterministic scores (logit + 3 > 0), corrected to the budget.

    First the channels nearest the threshold are removed (or added) in score order until the
    kept parameters cross (1 - ratio) * total; then single moves (drop the weakest kept or add
    the strongest dropped channel of any structure) are taken while they bring the count
    strictly closer, so the plan lands within one channel's cost of the ratio. Every residual
    selection and the MLP keep at least one channel.
    """
    keep = [{k: v > 0 for k, v in layer.items()} for layer in scores]
    for layer, sc in zip(keep, scores):
        for k, mask in layer.items():
            if int(mask.sum()) < FLOOR[k]:
                mask[sc[k].argmax()] = True
    width = [{k: int(v.sum()) for k, v in layer.items()} for layer in keep]
    per_layer = [_params(g, w) for w in width]
    kept = sum(per_layer)
    target = (1.0 - ratio) * len(scores) * linear_params(g)  # the layers given: all, or one

    def move(i: int, k: str, j: int, on: bool) -> None:
        nonlocal kept
        keep[i][k][j] = on
        width[i][k] += 1 if on else -1
        new = _params(g, width[i])
        kept += new - per_layer[i]
        per_layer[i] = new

    # Coarse: walk the channels in order of distance from the threshold until the budget is crossed.
    owners = [(i, k) for i, layer in enumerate(scores) for k in layer]
    flat = torch.cat([scores[i][k] for i, k in owners])
    owner = torch.cat([torch.full((scores[i][k].numel(),), n) for n, (i, k) in enumerate(owners)])
    pos = torch.cat([torch.arange(scores[i][k].numel()) for i, k in owners])
    on = torch.cat([keep[i][k] for i, k in owners])
    shrink = kept > target
    cand = (on if shrink else ~on).nonzero().squeeze(1)
    for c in cand[torch.argsort(flat[cand], descending=not shrink, stable=True)].tolist():
        if (kept <= target) if shrink else (kept >= target):
            break
        i, k = owners[int(owner[c])]
        if not shrink or width[i][k] > FLOOR[k]:
            move(i, k, int(pos[c]), not shrink)

    # Fine: single moves while they strictly reduce the distance to the budget.
    while True:
        best, best_gap = None, abs(kept - target)
        for i, k in owners:
            sc, kp = scores[i][k], keep[i][k]
            options = []
            if width[i][k] > FLOOR[k]:
                options.append((int(torch.where(kp, sc, torch.inf).argmin()), False))
            if width[i][k] < sc.numel():
                options.append((int(torch.where(kp, -torch.inf, sc).argmax()), True))
            for j, add in options:
                w = dict(width[i])
                w[k] += 1 if add else -1
                gap = abs(kept - per_layer[i] + _params(g, w) - target)
                if gap < best_gap:
                    best, best_gap = (i, k, j, add), gap
        if best is None:
            return keep
        move(*best)


def build_plan(g: Geometry, keep: list[dict[str, torch.Tensor]]) -> Plan:
    """Index lists per layer (None where everything is kept); KV groups expand to their query heads."""
    def ids(mask: torch.Tensor) -> list[int] | None:
        return None if bool(mask.all()) else mask.nonzero().flatten().tolist()

    layers = []
    for layer in keep:
        lp = LayerPlan(**{k: ids(layer[k]) for k in KINDS})
        groups = layer.get(GROUPS)
        if groups is not None and not bool(groups.all()):
            lp.kv_heads = groups.nonzero().flatten().tolist()
            lp.heads = [kv * g.group_size + j for kv in lp.kv_heads for j in range(g.group_size)]
        layers.append(lp)
    return Plan(layers=layers, method="disp")
