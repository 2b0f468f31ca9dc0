"""`compress` command line: one subcommand per module, each exposing `configure(parser)` and `run(args)`.

Building the parser imports each command module, and they import torch and transformers only
inside `run`, so `--help`, `--version` and argument errors answer in well under a second. Every
error, argument errors included, is one line on stderr starting with "error:", exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from compress.errors import CompressError

__all__ = ["main"]

# name -> (module, one-line help). Each module defines configure(parser) and run(args) -> int.
COMMANDS = {
    "export": ("compress.commands.export", "prune a model and write a slim safetensors folder (and ONNX)"),
    "validate": ("compress.commands.validate", "re-run the parity checks of an exported folder"),
    "eval": ("compress.commands.eval", "perplexity, KL divergence and top-1 agreement of a model"),
    "onnx": ("compress.commands.onnx", "export an existing slim folder to ONNX and check parity"),
    "gguf": ("compress.commands.gguf", "write a slim folder as one GGUF file that llama.cpp runs, checked in llama.cpp"),
    "bench": ("compress.commands.bench", "prefill/decode speed, dense vs slim, PyTorch vs onnxruntime"),
    "push": ("compress.commands.push", "push an exported folder to the Hugging Face Hub"),
    "recover": ("compress.commands.recover", "distil a slim folder's kept weights from its dense model"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults only where they say something (not None, not on/off flags); descriptions
    (the command modules' docstrings) and epilogs keep their own line breaks."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An argument error in one line, as every other error (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"compress {version('compress-llm')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "compress (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="compress",
        description="Make Hugging Face causal LMs structurally smaller and prove the result is right.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=_HelpFormatter)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def _message(e: Exception) -> str:
    """One line: an OSError as its file and reason ("[Errno 28]" says nothing to a user)."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, an argument error: argparse has printed it
        return int(e.code or 0)
    try:
        if "threads" in args:  # every command that computes: the threads it may use, set once
            from compress.threads import use_threads

            args.threads = use_threads(args.threads)
        return int(args._run(args) or 0)
    except (CompressError, OSError, ValueError, ImportError) as e:  # ImportError: an optional extra missing
        print(f"error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
