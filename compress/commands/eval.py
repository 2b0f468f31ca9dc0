"""Perplexity of a causal LM on a text, and, with --reference, KL(reference || model) and top-1 agreement.

Defaults evaluate the shipped reference model on the shipped held-out texts (Python docs, code,
WikiText-2 test, fiction) as export reports do: 32 windows of 256 tokens spread evenly over each
whole text at seed 0, so `compress eval --model SLIM --reference DENSE` gives the figures of the
folder's report.md. Every figure names what it was measured on and, when the model folder's
report.json records its calibration text, whether that text is in-domain. Give --stride for
sliding windows over the whole text (more context per token, lower perplexity). --model and
--reference take a folder, a Hub id or a GGUF file, as `compress export` does. --tasks gives
zero-shot accuracy instead (lm-evaluation-harness on local task files; kept in the folder's
report.json, so the model card shows it).

A model's own code (a config.json whose auto_map names modeling files of its folder or Hub
repository) is run only with --trust-remote-code, with one exception: folders written by
`compress export` of this version, recognised by their plan.json and report.json beside a
config.json whose auto_map names only the slim model and that model's files (modeling_slim.py and
the rest) byte for byte as this package ships them, so the code run is ours. Anything else (an
older export, a slim model on the Hub, a folder with other code) needs --trust-remote-code.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from compress.errors import CompressError
from compress.reference import MODEL_DIR
from compress.texts import EVAL_SEED, EVAL_TEXTS, EVAL_WINDOWS
from compress.threads import add_threads_argument
from validation.zero_shot import configure_arguments as configure_zero_shot

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=str, default=MODEL_DIR, help="model folder, Hub id or GGUF file to evaluate")
    parser.add_argument("--reference", type=str, default=None, metavar="DENSE",
                        help="dense model (folder, Hub id or GGUF file) to compare against (KL, top-1 agreement)")
    parser.add_argument("--text", type=Path, action="append", default=None, metavar="FILE",
                        help="UTF-8 text to score; repeat for several (default: the shipped evaluation texts, "
                             + ", ".join(t.name for t in EVAL_TEXTS) + ")")
    parser.add_argument("--seq-len", type=int, default=256, help="window length in tokens")
    parser.add_argument("--windows", type=_count, default=EVAL_WINDOWS, metavar="N",
                        help="windows per text, spread evenly over the whole text (as many as export reports "
                             "use); `all`: every window")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the spread windows' offset")
    parser.add_argument("--stride", type=int, default=None,
                        help="slide windows by this many tokens over the whole text (with --windows all); without "
                             "it, windows are fixed and non-overlapping")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="torch device for the models: auto (CUDA when present), "
                                                          "cpu, cuda, cuda:1 ...")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model code a folder or Hub repository ships (its config's auto_map). Without "
                             "it, only folders `compress export` wrote are trusted: plan.json and report.json "
                             "beside this package's own slim model files (modeling_slim.py, ...), byte for byte")
    add_threads_argument(parser)
    configure_zero_shot(parser)


def _count(value: str) -> int | None:
    return None if value == "all" else int(value)


def _tokenizer_source(*models: str | Path | None) -> str | Path:
    """The first model that carries a tokenizer (a slim folder may rely on its dense parent's): a
    GGUF file, a folder with tokenizer files, or a name that is no local path (a Hub id, whose
    tokenizer `load_tokenizer` fetches or reads from the cache, or fails to in one line)."""
    for m in models:
        if m is None:
            continue
        path = Path(m)
        if path.suffix.lower() == ".gguf" or not path.exists() or any(
                (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return m
    raise CompressError(f"no tokenizer in {', '.join(str(m) for m in models if m is not None)}")


def exported_by_us(model: str | Path) -> bool:
    """Whether `model` is a folder `compress export` of this version wrote, whose model code is
    therefore ours: plan.json and report.json, a config.json whose auto_map is exactly the slim
    model's, and every file of compress/slim that exports copy (modeling_slim.py, ...) byte for byte."""
    from compress.slim import AUTO_MAP, SOURCE_FILES

    folder = Path(model)
    if not all((folder / name).is_file() for name in ("plan.json", "report.json", "config.json")):
        return False
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return False
    return auto_map == AUTO_MAP and all(
        (folder / src.name).is_file() and (folder / src.name).read_bytes() == src.read_bytes() for src in SOURCE_FILES)


def _trusted(model: str | Path, asked: bool) -> bool:
    """Whether `model`'s own code may run (asked, or it is ours); its config is read now, so a bad
    --model or --reference fails in one line before any weights load."""
    from compress.loading import load_config

    trusted = asked or exported_by_us(model)
    try:
        load_config(model, trust_remote_code=trusted)
    except CompressError as e:
        if trusted or not (_own_code(model) or any(k in str(e) for k in ("custom code", "trust_remote_code"))):
            raise
        raise CompressError(f"{e} (its own model code is run only with --trust-remote-code)") from None
    return trusted


def _own_code(model: str | Path) -> bool:
    """Whether a local folder's config.json names model code of its own (auto_map)."""
    try:
        return bool(json.loads((Path(model) / "config.json").read_text()).get("auto_map"))
    except (OSError, ValueError, AttributeError):
        return False


def _calibration(model: str | Path) -> dict | None:
    """The calibration text a folder's report.json records (None for any other model)."""
    report = Path(model) / "report.json"
    try:
        return json.loads(report.read_text()).get("calibration") if report.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def run(args: argparse.Namespace) -> int:
    from compress.loading import load_model, load_tokenizer, resolve_device
    from validation.heldout import evaluate
    from validation.quality_words import calibration_line, quality_line

    args.device = resolve_device(args.device)
    if args.stride is not None and args.windows is not None:
        raise CompressError("--stride slides over the whole text: give it with --windows all")

    trust = {m: _trusted(m, args.trust_remote_code) for m in (args.model, args.reference) if m is not None}
    if args.tasks:
        from validation.zero_shot import run_command

        if args.reference is not None:
            raise CompressError("--tasks scores the model alone: drop --reference (run once per model)")
        return run_command(args, trust_remote_code=trust[args.model],
                           tokenizer=_tokenizer_source(args.model, args.reference))
    tokenizer = load_tokenizer(_tokenizer_source(args.model, args.reference))
    model = load_model(args.model, device=args.device, trust_remote_code=trust[args.model])
    reference = None if args.reference is None else load_model(args.reference, device=args.device,
                                                               trust_remote_code=trust[args.reference])
    calibration = _calibration(args.model)
    records = evaluate(model, tokenizer, calibration, reference=reference, texts=args.text, windows=args.windows,
                       seq_len=args.seq_len, seed=args.seed, stride=args.stride, batch_size=args.batch_size,
                       device=args.device, progress=True)
    print(f"model:      {args.model}")
    if args.reference is not None:
        print(f"reference:  {args.reference} (KL(reference || model) in nats per token)")
    print(calibration_line(calibration) if calibration else "calibration: not known (no report.json records it)")
    for rec in records:
        print(quality_line(rec, reference="reference", model="model"))
    if args.json is not None:
        out = {"model": str(args.model), "reference": None if args.reference is None else str(args.reference),
               "device": str(args.device), "calibration": calibration, "texts": records}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
        log.info("wrote %s", args.json)
    return 0
