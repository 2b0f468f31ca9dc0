"""Push an exported folder to the Hugging Face Hub, with a model card built from its report.

The token comes from --token, $HF_TOKEN or `hf auth login`; it is never printed or logged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compress.errors import CompressError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="a folder written by `compress export`")
    p.add_argument("--repo", required=True, help="Hub repository id, e.g. me/llama-slim-50")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the cached login)")
    p.add_argument("--message", default="Upload slim model from compress", help="commit message")


def model_card(report: dict, repo: str) -> str:
    """README.md for the Hub: what was removed, how it was checked, how to load it."""
    from validation.report import summary_lines

    base = report.get("base_model", "unknown")
    parity = "\n".join(f"| {c['name']} | {c['device']} | {c['dtype']} | {c['max_abs_diff']:.2e} | "
                       f"{c['tolerance']:.0e} | {'pass' if c['passed'] else 'FAIL'} |" for c in report.get("parity", []))
    return f"""---
library_name: transformers
tags: [pruning, structured-pruning, {report.get('method', 'compress')}]
base_model: {base}
---

# {repo}

Structurally pruned from `{base}` with `compress` (method `{report.get('method')}`).

{chr(10).join('- ' + line for line in summary_lines(report))}

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

Each layer reads and writes its own subset of the residual stream (index-select / index-add);
the modeling code ships in this repository (`modeling_slim.py`).

## Parity against the dense model

| check | device | dtype | max abs diff | tolerance | result |
|---|---|---|---|---|---|
{parity}
"""


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = args.folder.resolve()
    if not (folder / "report.json").is_file():
        raise CompressError(f"{folder}: no report.json; not a folder written by `compress export`")
    report = json.loads((folder / "report.json").read_text())
    card = folder / "README.md"
    if not card.exists():
        card.write_text(model_card(report, args.repo))
    api = HfApi(token=args.token)
    try:
        api.create_repo(args.repo, private=args.private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=args.repo, commit_message=args.message)
    except HfHubHTTPError as e:
        raise CompressError(f"push to {args.repo} failed: {str(e).splitlines()[0]}") from None
    print(f"pushed {folder} to {getattr(info, 'commit_url', args.repo)}")
    return 0
