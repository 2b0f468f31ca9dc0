"""Recovery by knowledge distillation: the slim model's kept weights trained towards the dense model.

Pruning removes weights with no way back; the peers that prune hard recover what it cost by
training what is left (LLM-Pruner with LoRA, Sheared-LLaMA and Minitron with continued training
and distillation from the dense model). Here the teacher is the dense model itself, the student
the slim model `build_slim_model` makes from the dense model, the plan and `replaced`, and the loss
is KL(teacher || student) per token on the logits (temperature 1). (A per-layer loss on the
residual stream, the relative squared error of every decoder layer's output, was tried beside it
and made the KL worse at equal steps: benchmarks/results/recovery-reference.json.) AdamW with linear warmup and cosine decay, gradients clipped at norm 1; on
CUDA bf16 autocast and each student layer checkpointed. Only decoder-layer tensors and the final
norm train (see `writeback.TRAINED_PREFIXES`); with LoRA, adapters on the layers' linears, merged
at the end.

The result is still a plan plus dense-named tensors (`writeback`): the plan is unchanged and the
trained tensors are merged into `replaced`, so the export and its parity checks run as for any
method. Held-out KL is measured on calibration windows set aside before training (spread over
the text, never trained on), before and after.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from compress.adapters import get_adapter
from compress.checkpoint import Checkpoint, StateStore, fingerprint, result_digest
from compress.distributed import World
from compress.methods.base import PruneResult
from compress.recover import DEFAULTS
from compress.recover.budget import choose_lora, step_flops, training_bytes
from compress.recover.lora import add_lora, lora_params, merge_lora
from compress.recover.writeback import check_round_trip, trainable, write_back
from compress.sharding import training_device, training_model
from compress.slimming import slim_config, slim_model, slim_state_dict
from compress.training import Batches, budget_steps, checkpointed, frozen

__all__ = ["Recovered", "recover", "DEFAULTS", "student_model", "held_out_kl", "split_windows"]


@dataclass
class Recovered(PruneResult):
    """A recovered result: the same plan, `replaced` with the trained tensors, and what training did."""

    record: dict = field(default_factory=dict)


def student_model(model, adapter, plan, replaced=None):
    """The slim model in float32, its trainable tensors its own copies (the rest may share the dense
    model's storage: it never changes)."""
    sd = {k: v.detach().to(torch.float32, copy=trainable(k)) if v.is_floating_point() else v
          for k, v in slim_state_dict(model, adapter, plan, replaced).items()}
    config = slim_config(model, adapter, plan, replaced)
    config.dtype = "float32"
    student = slim_model(config, sd)
    for name, p in student.named_parameters():
        p.requires_grad_(trainable(name))
    return student


def split_windows(calib: torch.Tensor, held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, `held_out` windows spread evenly over the calibration text)."""
    n = calib.shape[0]
    if not 1 <= held_out < n:
        raise ValueError(f"recover: {n} calibration windows cannot spare {held_out} held-out ones and train on the rest")
    keep = torch.linspace(0, n - 1, held_out).round().long()
    train = torch.ones(n, dtype=torch.bool)
    train[keep] = False
    return calib[train], calib[keep]


def _kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per token, nats."""
    s = student_logits.float().log_softmax(-1).flatten(0, 1)
    return F.kl_div(s, teacher_logp.flatten(0, 1), log_target=True, reduction="batchmean")


@torch.no_grad()
def held_out_kl(student, teacher, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean KL(teacher || student) per token over `windows`, every position."""
    device, own = next(teacher.parameters()).device, next(student.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)
        t = teacher(input_ids=x, use_cache=False).logits.float().log_softmax(-1)
        total += _kl(student(input_ids=x.to(own), use_cache=False).logits.to(device), t).item() * x.numel()
        tokens += x.numel()
    return total / tokens


def _schedule(opt, steps: int, warmup: float):
    """Linear warmup over `warmup` of the steps, then cosine decay to zero."""
    w = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def recover(model, result: PruneResult, calib: torch.Tensor, *, steps: int | None = None, budget: float | None = None,
            lr: float | None = None, lora: bool | None = None, seed: int = 0, held_out: torch.Tensor | None = None,
            progress: bool = True, store: StateStore | None = None, world: World | None = None,
            **settings) -> Recovered:
    """Distil the slim model of `result` from the dense `model` on calibration windows `calib`
    [n, seq_len]; returns the same plan with the trained tensors merged into `replaced`.

    steps: default what fits `budget` FLOPs (default: about an hour of the device, as DISP's;
    `compress.training.BUDGETS`). lora: None chooses from a memory estimate. held_out: windows for
    the before/after KL (default: `eval_windows` calibration windows set aside). store: where the
    training state is saved as it goes and resumed from (compress.checkpoint). world: the processes
    that train together (compress.distributed), each on its share of every batch (`batch_size` is
    the global batch), the student's gradients averaged (DDP) and the teacher held as
    `world.shard` says (compress.sharding); every one calls `recover` alike. Other settings:
    `DEFAULTS`.
    """
    world = world or World()
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"recover: unknown settings {sorted(unknown)}")
    s = {**DEFAULTS, **settings}
    adapter, plan = get_adapter(model.config), result.plan
    device = training_device(model, world)
    cuda = device.type == "cuda"
    if held_out is None:
        calib, held_out = split_windows(calib, min(s["eval_windows"], calib.shape[0] // 4 or 1))
    tokens = s["batch_size"] * calib.shape[1]
    if steps is None:
        steps = budget_steps(step_flops(model, adapter, plan, tokens), device.type, "recover",
                             f"{s['batch_size']} x {calib.shape[1]} tokens", budget)
    student = student_model(model, adapter, plan, result.replaced).to(device)
    memory = {use: training_bytes(model, adapter, plan, s["batch_size"], calib.shape[1], checkpointing=cuda,
                                  lora_params=lora_params(student, s["rank"]) if use else None) for use in (False, True)}
    if lora is None:
        lora = choose_lora(memory[False], memory[True], device)
    lr = lr if lr is not None else s["lora_lr" if lora else "lr"]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with frozen(model):
        kl_before = held_out_kl(student, model, held_out)
        t0 = time.perf_counter()
        run = fingerprint(model, adapter, calib, loop="recover", start=result_digest(plan, result.replaced),
                          **{**s, "steps": steps, "lr": lr, "lora": lora, "seed": seed})
        with training_model(model, adapter, world) as (teacher, _):
            trained, trace = _train(teacher, student, calib, gen, steps, lr, lora, s, progress and world.writer,
                                    store, run, world)
        seconds = time.perf_counter() - t0
        kl_after = held_out_kl(trained, model, held_out)
    before = slim_state_dict(model, adapter, plan, result.replaced)
    tensors = {n: p.detach() for n, p in trained.named_parameters()  # only what changed (LoRA: not the norms)
               if trainable(n) and not torch.equal(p.detach(), before[n].to(p.device, p.dtype))}
    del before
    replaced = write_back(model, adapter, plan, result.replaced, tensors)
    check_round_trip(model, adapter, plan, replaced, tensors)
    record = {"steps": steps, "tokens": steps * tokens, "seconds": round(seconds, 1), "lr": lr, "lora": lora,
              "rank": s["rank"] if lora else None, "batch_size": s["batch_size"], "seq_len": calib.shape[1],
              "warmup": s["warmup"], "seed": seed,
              "train_windows": calib.shape[0], "held_out_windows": held_out.shape[0],
              "held_out_kl_before": kl_before, "held_out_kl_after": kl_after,
              "train_kl_first": trace[0], "train_kl_last": sum(trace[-10:]) / len(trace[-10:]),
              "memory_estimate_gb": round(memory[lora]["total"] / 1e9, 3)}
    print(f"recover: held-out KL {kl_before:.4f} -> {kl_after:.4f} after {steps} steps ({seconds:.0f} s)")
    return Recovered(plan, replaced, record)


def _train(model, student, calib, gen, steps: int, lr: float, lora: bool, s: dict, progress: bool,
           store: StateStore | None, run: dict, world: World):
    """The training loop: (the trained plain student, the training KL of every step); its state saved
    in `store` and resumed from there when `run`, its fingerprint, matches."""
    device = next(student.parameters()).device
    cuda = device.type == "cuda"
    net = add_lora(student, s["rank"]) if lora else student
    params = [p for p in net.parameters() if p.requires_grad]
    run_net = net if world.size == 1 else DistributedDataParallel(net)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = _schedule(opt, steps, s["warmup"])
    ckpt = checkpointed(student.model.layers) if cuda else contextlib.nullcontext()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    stream = Batches(calib, s["batch_size"], gen)
    state = Checkpoint(store, "recover", run, {"student": net, "optimizer": opt, "scheduler": sched, "generator": gen,
                                               "batches": stream}, device)
    start, saved = state.restore()
    trace, running = saved.get("trace", []), None
    bar = tqdm(range(start, steps), desc="recover", unit="step", dynamic_ncols=True, disable=not progress,
               initial=start, total=steps)
    with ckpt, state:
        for step in bar:
            x = world.share(next(stream)).to(device)
            with torch.no_grad(), autocast:
                teacher = model(input_ids=x, use_cache=False).logits.float().log_softmax(-1)
            with autocast:
                kl = _kl(run_net(input_ids=x, use_cache=False).logits, teacher)
            opt.zero_grad(set_to_none=True)
            kl.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            trace.append(world.mean(kl.detach()).item())  # over the global batch
            running = trace[-1] if running is None else 0.95 * running + 0.05 * trace[-1]
            bar.set_postfix({"kl": f"{running:.4f}"})
            state.after_step(step + 1, steps, {"trace": trace})
    return (merge_lora(net) if lora else net).eval(), trace
