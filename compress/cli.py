"""`compress` command line: one subcommand per module, each exposing `configure(parser)` and `run(args)`."""

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults only where they say something (not None, not on/off flags)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compress",
        description="Make Hugging Face causal LMs structurally smaller and prove the result is right.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=_HelpFormatter)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CompressError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional dependency (onnxruntime, gguf) absent or broken
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
