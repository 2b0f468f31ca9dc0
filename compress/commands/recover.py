"""Recover what pruning cost: distil an exported slim folder's kept weights from its dense model.

Reads the folder's plan and rewritten tensors, loads the dense model (the teacher), trains the
slim model towards it (KL on the logits; see compress/recover/distill.py), and writes the folder
again through the same export as `compress export` (staged, atomic, every parity check run). The
plan is unchanged; the trained tensors go into replaced.safetensors under their dense names. The
report gains a `recovery` entry: steps, tokens, time, learning rate, held-out KL before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compress.texts import EVAL_WINDOWS


# The default compute budget, as the help states it (compress.training.BUDGETS).
BUDGET_HELP = ("default: as many as fit about an hour of the device: 6e14 FLOPs on CPU, 1e18 on CUDA, at "
               "2 x dense + 6 x slim decoder-linear-and-head weights FLOPs per token; at most 2,000 steps on CPU, "
               "10,000 on CUDA (at ratio 0.5 on CPU: 2,000 for the shipped reference model, 773 for SmolLM2-135M)")


def add_recover_arguments(p: argparse.ArgumentParser, prefix: str = "--recover-") -> None:
    """Recovery's options: `compress export` takes them as --recover-steps ..., this command as --steps ..."""
    from compress.recover import DEFAULTS

    g = p.add_argument_group("recovery (knowledge distillation from the dense model)")
    if prefix != "--":  # `compress export --recover`
        g.add_argument("--recover", action="store_true",
                       help="after pruning, distil the slim model's kept weights from the dense model (KL on the "
                            "logits) before the export; see `compress recover --help`")
    g.add_argument(f"{prefix}steps", dest="recover_steps", type=int, metavar="N", default=None,
                   help=f"training steps of {prefix}batch-size windows ({BUDGET_HELP})")
    g.add_argument(f"{prefix}lr", dest="recover_lr", type=float, metavar="LR", default=None,
                   help=f"peak AdamW learning rate (warmup, cosine decay; default {DEFAULTS['lr']:g}, with LoRA "
                        f"{DEFAULTS['lora_lr']:g})")
    g.add_argument(f"{prefix}batch-size", dest="recover_batch_size", type=int, metavar="N", default=DEFAULTS["batch_size"],
                   help="calibration windows per step")
    g.add_argument(f"{prefix}lora", dest="recover_lora", action=argparse.BooleanOptionalAction, default=None,
                   help=f"train rank-{DEFAULTS['rank']} LoRA adapters (merged at the end; needs the [recover] extra, "
                        "peft) instead of the kept weights themselves; default: LoRA only where full "
                        "fine-tuning's optimizer state would not fit in memory")


def recover_result(args: argparse.Namespace, model, result, calib, store=None, world=None):
    """(the recovered result, its record): `recover` with the options of `add_recover_arguments`, its
    state kept in `store` (compress.checkpoint.StateStore), trained by the processes of `world`."""
    from compress.recover import recover

    rec = recover(model, result, calib, steps=args.recover_steps, lr=args.recover_lr, lora=args.recover_lora,
                  seed=getattr(args, "seed", 0), batch_size=args.recover_batch_size, store=store,
                  world=world)
    return rec, rec.record


def configure(p: argparse.ArgumentParser) -> None:
    from compress.commands.export import add_scope_argument
    from compress.commands.ranks import add_arguments as add_ranks_arguments
    from compress.threads import add_threads_argument

    p.add_argument("folder", type=Path, help="a slim folder written by `compress export`")
    p.add_argument("--teacher", default=None,
                   help="the dense model the folder was pruned from: folder, Hub id or GGUF file (default: the "
                        "one its report.json names)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: FOLDER-recovered)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (FOLDER itself too)")
    p.add_argument("--device", default="auto", help="device to train on: auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--calib", default=None,
                   help="training text file (default: as `compress export`: the broad shipped mix, or for the "
                        "reference model the calibration slice of its corpus)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="training windows (default: every window of the text, at most 512; up to 16 of them, a quarter at most, are held out for the KL before and after)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--seed", type=int, default=0, help="seed for batch order and initialisation")
    p.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS,
                   help="windows per held-out text, spread evenly over each, for the report's perplexity/KL (0 to skip)")
    add_scope_argument(p)
    add_threads_argument(p)
    add_ranks_arguments(p)
    add_recover_arguments(p, prefix="--")


def run(args: argparse.Namespace) -> int:
    """Under torchrun every process trains its share of each batch; rank 0 checks and writes."""
    from compress.commands.ranks import run_ranks

    folder = args.folder.resolve()
    args.out = (args.out or folder.with_name(folder.name + "-recovered")).resolve()
    return run_ranks(args, _run, data_parallel=True, recover=True)


def _run(args: argparse.Namespace, session) -> int:
    import json

    from compress.adapters import get_adapter
    from compress.loading import load_model, load_tokenizer, resolve_dtype
    from compress.methods.base import PruneResult
    from compress.pipeline import export
    from compress.plan import model_identity
    from compress.textdata import calibration_windows, load_text, token_stream
    from compress.texts import default_calibration
    from exporters.hf_folder import check_destination
    from validation.folder_checks import load_export
    from validation.report import summary_lines

    folder, out = args.folder.resolve(), args.out
    check_destination(out, args.overwrite)
    report, plan, replaced = load_export(folder)
    base = args.teacher or report.get("base_model")
    base = None if base in (None, "reference") else base
    dtype = resolve_dtype(json.loads((folder / "config.json").read_text()).get("dtype", "float32"))
    device = session.device
    model = load_model(base, dtype="auto", export_dtype=dtype, device=device)
    plan.check_identity(model_identity(model, get_adapter(model.config).geometry()))
    tokenizer = load_tokenizer(folder)
    calib_text = load_text(args.calib or default_calibration(base).path)
    calib = calibration_windows(token_stream(tokenizer, calib_text), args.seq_len, args.calib_samples)
    print(f"teacher {base or 'the reference model'} on {device}; training windows {tuple(calib.shape)}")
    result, record = recover_result(args, model, PruneResult(plan, replaced), calib.to(device), session.store,
                                    session.world)
    if not session.world.writer:
        return session.wait()
    session.trained = True
    quality = _quality(model, result, tokenizer, args, device, report.get("calibration")) if args.eval_windows else []
    extra = {k: report[k] for k in ("base_model", "prune_seconds", "calibration") if k in report}
    final = export(model, result, out, tokenizer=tokenizer, calib=calib, dtype=dtype, overwrite=args.overwrite,
                   quality=quality, extra={**extra, "recovery": record}, parity_scope=args.parity_scope,
                   layout=report.get("layout", "slim"))
    for line in summary_lines(final):
        print(line)
    print(f"wrote {out}")
    session.done()
    return 0


def _quality(model, result, tokenizer, args, device, calibration: dict | None) -> list[dict]:
    """The report's held-out figures of the recovered slim model (validation.heldout: every shipped
    evaluation text, in-domain or not against the calibration text the pruned folder recorded)."""
    from compress.adapters import get_adapter
    from compress.slimming import build_slim_model
    from validation.heldout import evaluate

    slim = build_slim_model(model, get_adapter(model.config), result.plan, result.replaced)
    return evaluate(slim, tokenizer, calibration, reference=model, windows=args.eval_windows, seq_len=args.seq_len,
                    device=device)
