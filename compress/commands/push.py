"""Push an exported folder to the Hugging Face Hub in one commit, with a model card built from its report.

The repository is created if needed (an existing one is reused). The card (README.md) gives the
achieved ratio, layer widths, quality and parity against the dense model, and how to load the
model; it is generated into the upload and the folder is left unchanged (a README.md of your
own in the folder is uploaded instead). ONNX folders (onnx/, onnx-float16/) are uploaded only
with --include-onnx, GGUF files (gguf/*.gguf) only with --include-gguf: both are as large as
the weights. The token comes from $HF_TOKEN or `hf auth login` and is never printed.
Everything is one commit, so a failed push landed nothing (or all of it, if only the answer was
lost): run it again; files already on the Hub unchanged are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exporters.hub import DEFAULT_MESSAGE


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder written by `compress export`")
    p.add_argument("--repo", required=True, help="Hub repository id, e.g. me/llama-slim-50")
    p.add_argument("--private", action="store_true", help="create the repository as private (if it is new)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    p.add_argument("--include-onnx", action="store_true", help="also upload DIR/onnx*/ (model.onnx, its data, onnx_config.json)")
    p.add_argument("--include-gguf", action="store_true", help="also upload the folder's GGUF files (`compress gguf`)")
    p.add_argument("--message", default=DEFAULT_MESSAGE, help="commit message")


def run(args: argparse.Namespace) -> int:
    from exporters.hub import push_folder

    url = push_folder(args.folder, args.repo, private=args.private, revision=args.revision,
                      include_onnx=args.include_onnx, message=args.message, include_gguf=args.include_gguf)
    print(f"pushed {args.folder.resolve()} to {url}")
    return 0
