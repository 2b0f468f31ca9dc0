"""Push an exported folder to the Hugging Face Hub with a model card built from its report.

The token is passed to huggingface_hub and never printed or logged.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.errors import CompressError

__all__ = ["model_card", "push_folder"]


def model_card(report: dict, repo: str) -> str:
    """README.md for the Hub: what was removed, how it was checked, how to load it."""
    from validation.report import summary_lines

    base = report.get("base_model", "unknown")
    hub_base = f"base_model: {base}\n" if "/" in base and not Path(base).is_absolute() else ""
    parity = "\n".join(f"| {c['name']} | {c['device']} | {c['dtype']} | {c['max_abs_diff']:.2e} | "
                       f"{c['tolerance']:.0e} | {'pass' if c['passed'] else 'FAIL'} |" for c in report.get("parity", []))
    return f"""---
library_name: transformers
tags: [pruning, structured-pruning, {report.get('method', 'compress')}]
{hub_base}---

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


def push_folder(folder: Path, repo: str, private: bool = False, token: str | None = None,
                message: str = "Upload slim model from compress") -> str:
    """Create the repo if needed, write README.md (unless one exists) and upload; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    folder = Path(folder).resolve()
    if not (folder / "report.json").is_file():
        raise CompressError(f"{folder}: no report.json; not a folder written by `compress export`")
    card = folder / "README.md"
    if not card.exists():
        card.write_text(model_card(json.loads((folder / "report.json").read_text()), repo))
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=message)
    except (HfHubHTTPError, LocalTokenNotFoundError, OSError) as e:
        raise CompressError(f"push to {repo} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return getattr(info, "commit_url", repo)
