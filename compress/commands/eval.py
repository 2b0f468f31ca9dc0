"""Perplexity of a causal LM on a text, and, with --reference, KL(reference || model) and top-1 agreement.

Defaults evaluate the shipped reference model on the shipped held-out test slice with fixed,
non-overlapping 256-token windows. Give --stride for sliding windows (more context per token,
lower perplexity; the mode is printed with every figure). Models load with trust_remote_code,
so slim folders written by `compress export` evaluate the same way as dense HF models.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from compress.reference import MODEL_DIR, TEST_TEXT
from compress.textdata import load_text, token_stream

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=MODEL_DIR, help="model folder, Hub id or GGUF file to evaluate")
    parser.add_argument("--reference", type=Path, default=None, metavar="DENSE",
                        help="dense model (folder, Hub id or GGUF file) to compare against (KL, top-1 agreement)")
    parser.add_argument("--text", type=Path, default=TEST_TEXT, metavar="FILE", help="UTF-8 text to score")
    parser.add_argument("--seq-len", type=int, default=256, help="window length in tokens")
    parser.add_argument("--stride", type=int, default=None,
                        help="slide windows by this many tokens; without it, windows are fixed and non-overlapping")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device for the models")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="use exactly this many windows from the start of the text; all when not given")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=True,
                        help="allow the custom modeling code of slim folders")


def _tokenizer_source(*models: Path | None) -> Path:
    """The first model that carries a tokenizer (a slim folder may rely on its dense parent's)."""
    for m in models:
        if m is not None and (m.suffix.lower() == ".gguf" or any(
                (m / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))):
            return m
    raise FileNotFoundError(f"no tokenizer in {', '.join(str(m) for m in models if m is not None)}")


def run(args: argparse.Namespace) -> int:
    from compress.loading import load_model, load_tokenizer
    from validation.quality import compare, perplexity

    text = load_text(args.text)
    ids = token_stream(load_tokenizer(_tokenizer_source(args.model, args.reference)), text)
    model = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, device=args.device, stride=args.stride,
              max_windows=args.max_windows)
    if args.reference is None:
        res = perplexity(model, ids, **kw)
    else:
        reference = load_model(args.reference, device=args.device, trust_remote_code=args.trust_remote_code)
        res = compare(model, reference, ids, **kw)
    mode = f"{res.mode} {res.seq_len}-token windows" + (f", stride {res.stride}" if res.stride else "")
    print(f"model:      {args.model}")
    print(f"text:       {args.text} ({len(ids):,} tokens; {res.windows} windows, {res.tokens:,} scored)")
    print(f"windows:    {mode}")
    print(f"perplexity: {res.perplexity:.2f}")
    if args.reference is not None:
        print(f"reference:  {args.reference}")
        print(f"reference perplexity: {res.reference_perplexity:.2f}")
        print(f"KL(reference || model): {res.kl:.6f} nats/token")
        print(f"top-1 agreement: {res.top1_agreement:.4f}")
    if args.json is not None:
        out = {"model": str(args.model), "reference": None if args.reference is None else str(args.reference),
               "text": str(args.text), "text_tokens": len(ids), "device": str(args.device), **res.to_dict()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        log.info("wrote %s", args.json)
    return 0
