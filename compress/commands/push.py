"""Push an exported folder to the Hugging Face Hub, with a model card built from its report.

The token comes from --token, $HF_TOKEN or `hf auth login`; it is never printed or logged.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder written by `compress export`")
    p.add_argument("--repo", required=True, help="Hub repository id, e.g. me/llama-slim-50")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the cached login)")
    p.add_argument("--message", default="Upload slim model from compress", help="commit message")


def run(args: argparse.Namespace) -> int:
    from exporters.hub import push_folder

    url = push_folder(args.folder, args.repo, args.private, args.token, args.message)
    print(f"pushed {args.folder.resolve()} to {url}")
    return 0
