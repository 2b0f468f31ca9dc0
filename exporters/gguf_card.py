"""The model card's llama.cpp / ollama section for the GGUF files pushed with a folder
(report.json's "gguf" entries, written by `compress gguf`)."""

from __future__ import annotations

from pathlib import PurePosixPath

__all__ = ["gguf_section"]


def gguf_section(report: dict, repo: str, files: tuple[str, ...]) -> str:
    """Markdown for the GGUF files among `files` (paths in the repo); "" when none was pushed."""
    entries = [(t, e) for t, e in report.get("gguf", {}).items() if e["file"] in files]
    if not entries:
        return ""
    rows = "\n".join(f"| `{e['file']}` | {t} | {e['bytes'] / 1e6:.1f} MB | {_checked(e)} |" for t, e in entries)
    tag = max(entries, key=lambda te: te[0] == "q4_k_m")[0].upper()
    name = PurePosixPath(dict(entries)[tag.lower()]["file"]).name
    return f"""## Use with llama.cpp, ollama, LM Studio

| file | type | size | checked in llama.cpp |
| --- | --- | --- | --- |
{rows}

```sh
llama-cli -hf {repo}:{tag} -p "def fibonacci(n):" -n 32     # or: llama-cli -m {name} ...
ollama run hf.co/{repo}:{tag}
```

The GGUF files use llama.cpp's `deci` architecture, which holds each layer's own query heads, KV
heads and MLP width and runs layers without attention; any llama.cpp since early 2025 loads them.
q8_0 and q4_k_m were made by llama.cpp's own quantizer from the float32 file."""


def _checked(entry: dict) -> str:
    q = entry.get("quality")
    if q:
        return (f"perplexity {q['float_ppl']:.2f} (float slim model) -> {q['quantized_ppl']:.2f}, "
                f"KL {q['kl']:.4f}, top-1 agreement {q['agreement']:.3f}")
    checks = entry.get("checks", [])
    if checks and all(c["passed"] for c in checks):
        gguf = next((c for c in checks if c["name"] == "gguf"), None)
        return "tokenizer identical" + (f"; logits within {gguf['max_abs_diff']:.0e} of the slim model, "
                                        "32 greedy tokens identical" if gguf else "")
    return "not checked"
