"""The Hub model card (README.md) of an exported folder, built only from what the export recorded.

A pure function of report.json, config.json and what the caller knows about the dense model,
so the same folder always gives the same bytes: a retried push then finds nothing changed.
"""

from __future__ import annotations

import re
from pathlib import PurePath

import yaml

from compress.helpers import DTYPES, torch_dtype
from exporters.gguf_card import gguf_section
from validation.quality_words import quality_markdown
from validation.zero_shot import zero_shot_table

__all__ = ["model_card", "base_model_id"]

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
CACHE_REPO = re.compile(r"^models--([\w.-]+)--([\w.-]+)$")  # huggingface_hub cache: models--ORG--NAME/snapshots/SHA


def base_model_id(base: str) -> str | None:
    """The dense model's Hub id when it can be named honestly: the id it was loaded by, or the
    repository of a local path inside the huggingface_hub cache. None for anything else."""
    path = PurePath(base)
    if path.is_absolute():
        for part, nxt in zip(path.parts, path.parts[1:]):
            m = CACHE_REPO.match(part)
            if m and nxt == "snapshots":
                return f"{m[1]}/{m[2]}"
        return None
    return base if base != "reference" and HUB_ID.match(base) else None


def model_card(report: dict, config: dict, repo: str, base_card: dict | None = None, onnx_dirs: tuple[str, ...] = (),
               revision: str | None = None, genai_dirs: tuple[str, ...] = (),
               gguf_files: tuple[str, ...] = ()) -> str:
    """README.md for `repo`. `base_card`: the dense model's card metadata when known (its licence
    is carried over); `onnx_dirs`: the ONNX folders uploaded beside the weights; `genai_dirs`: those
    of them onnxruntime-genai can run (a genai_config.json inside); `gguf_files`: the GGUF files
    uploaded (their llama.cpp / ollama lines)."""
    base = str(report.get("base_model", "reference"))
    base_id = base_model_id(base)
    meta = {}
    if base_id:
        meta.update(base_model=base_id, base_model_relation="pruned")
    meta.update(library_name="transformers", pipeline_tag="text-generation")
    meta.update({k: v for k, v in (base_card or {}).items() if k in ("license", "license_name", "license_link") and v})
    meta["tags"] = ["compress", "pruned", "structured-pruning", report["method"]] + ["gguf"] * bool(gguf_files)
    sections = [
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---",
        f"# {repo.split('/')[-1]}",
        _intro(report, base, base_id, meta),
        _size(report, config),
        _layers(report),
        _recovery(report),
        _quality(report),
        zero_shot_table(report),
        _parity(report, onnx_dirs),
        _speed(report),
        _use(repo, revision, onnx_dirs, genai_dirs, _quantized(report), _stock(report, config)),
        gguf_section(report, repo, gguf_files),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def _intro(report: dict, base: str, base_id: str | None, meta: dict) -> str:
    if base_id:
        origin = f"[`{base_id}`](https://huggingface.co/{base_id})"
    elif base == "reference":
        origin = ("the small reference model shipped with compress (not on the Hub, so no `base_model` is "
                  "declared)")
    else:
        kind = "GGUF file" if base.lower().endswith(".gguf") else "folder"
        origin = (f"a local {kind} (`{PurePath(base).name}`) whose Hub origin was not recorded, so no "
                  f"`base_model` is declared")
    settings = ", ".join(f"{k}={v}" for k, v in report.get("settings", {}).items())
    licence = (f"Licence: `{meta['license']}`, carried over from the dense model's card." if "license" in meta
               else "Licence: not known; the dense model's terms apply.")
    rt = report.get("runtime")
    if rt:
        how = (f"On top of the static widths, Probe Pruning picks per batch which MLP channels"
               f"{' and query heads' if rt.get('heads') else ''} run: a small probe of the batch skips "
               f"{100 * rt['achieved_ratio']:.1f}% of the decoder-layer linear weights (chosen at prefill and kept "
               f"for the request's decode steps); those weights stay in the files, so this saves time, not memory.")
    else:
        how = "Nothing is masked at run time."
    return (f"Structurally pruned from {origin} with `compress`, method `{report['method']}` (seed "
            f"{report.get('seed')}; {settings}). Whole attention heads and MLP channels are removed, so the weights "
            f"are smaller and every layer is narrower. {how}\n\n{licence}")


def _size(report: dict, config: dict) -> str:
    r, p = report["ratio"], report["params"]
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    rows = [("all parameters", p["total_before"], p["total_after"], r["achieved_total"]),
            ("decoder-layer linear weights", p["linear_before"], p["linear_after"], r["achieved_linear"])]
    slim_bytes = report.get("files", {}).get("slim_weight_bytes")
    if slim_bytes and dtype in DTYPES:
        dense_bytes = p["total_before"] * torch_dtype(dtype).itemsize
        rows.append((f"weight bytes ({dtype})", dense_bytes, slim_bytes, 1 - slim_bytes / dense_bytes))
    table = ["| | dense | pruned | removed |", "|---|---:|---:|---:|"]
    table += [f"| {name} | {a:,} | {b:,} | {100 * frac:.1f}% |" for name, a, b, frac in rows]
    return ("## Size\n\n" + f"Requested ratio {r['requested']} (of the decoder-layer linear weights).\n\n"
            + "\n".join(table)
            + "\n\nDense bytes are its parameter count at the same dtype; pruned bytes are the safetensors on "
              "disk, index buffers included.")


def _layers(report: dict) -> str:
    b = report["base"]
    hidden = b["hidden"]
    keys = ["heads", "kv_heads", "mlp_hidden"]
    residual = [k for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")
                if any(lay[k] != hidden for lay in report["layers"])]
    runs: list[list] = []  # [first, last, widths] for runs of identical consecutive layers
    for i, lay in enumerate(report["layers"]):
        widths = [lay[k] for k in keys + residual]
        if runs and runs[-1][2] == widths:
            runs[-1][1] = i
        else:
            runs.append([i, i, widths])
    head = ["layers", "heads", "kv heads", "mlp hidden", *[k.replace("_", " ") for k in residual]]
    table = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head),
             "| dense | " + " | ".join(str(v) for v in [b["num_heads"], b["num_kv_heads"], b["intermediate"]]
                                       + [hidden] * len(residual)) + " |"]
    table += [f"| {a if a == z else f'{a}-{z}'} | " + " | ".join(map(str, w)) + " |" for a, z, w in runs]
    note = ("Every layer reads and writes all {} residual dimensions." if not residual else
            "attn/mlp in/out: residual dimensions each sublayer reads and writes (of {}).").format(hidden)
    return "## Layer widths\n\n" + "\n".join(table) + "\n\n" + note


def _quality(report: dict) -> str:
    """What calibrated the model and how it does on held-out texts of several kinds, each marked in-domain or not."""
    return "## Calibration and quality against the dense model\n\n" + "\n".join(
        quality_markdown(report.get("calibration"), report.get("quality")))


def _recovery(report: dict) -> str:
    r = report.get("recovery")
    if not r:
        return ""
    how = f"rank-{r['rank']} LoRA adapters, merged" if r.get("lora") else "the kept weights themselves"
    return ("## Recovery\n\nAfter pruning, the kept weights were distilled from the dense model (KL on the logits; "
            f"{how}): {r['steps']:,} steps, {r['tokens']:,} tokens of the calibration text, {r['seconds']:,.0f} s. "
            f"KL to the dense model on {r['held_out_windows']} held-out calibration windows: "
            f"{r['held_out_kl_before']:.4f} before, {r['held_out_kl_after']:.4f} after.")


def _parity(report: dict, onnx_dirs: tuple[str, ...]) -> str:
    checks = list(report.get("parity", []))
    from exporters.onnx_export import onnx_dir_name

    for variant, rows in report.get("onnx", {}).items():
        if onnx_dir_name(variant) in onnx_dirs:
            checks += rows
    rows = [f"| {c['name']} | {c['device']} | {c['dtype']} | {c['max_abs_diff']:.2e} | {c['tolerance']:.0e} | "
            f"{'pass' if c['passed'] else 'FAIL'} | {c.get('detail', '').replace('|', '/')} |" for c in checks]
    return ("## Parity with the dense model\n\nThe pruned model was checked against the dense model with the same "
            "heads and channels masked out: they must compute the same function.\n\n"
            "| check | device | dtype | max abs diff | tolerance | result | detail |\n|---|---|---|---:|---:|---|---|\n"
            + "\n".join(rows))


def _speed(report: dict) -> str:
    """`report["speed"]`, recorded by `compress bench --slim DIR`: setup line, Speed rows, bandwidth, batch."""
    speed = report.get("speed")
    if not speed:
        return ""
    from compress.speed import Speed, format_table

    table = format_table([Speed(**row) for row in speed["rows"]], speed["bandwidth"], speed["batch"])
    return f"## Speed\n\n{speed['setup']}\n\n{table}"


def _quantized(report: dict) -> dict[str, str]:
    """{ONNX folder: a sentence on its quantized weights and what they cost} (`compress onnx --weights`)."""
    from exporters.onnx_export import onnx_dir_name

    out = {}
    for variant, q in report.get("onnx_quantization", {}).items():
        weights = variant.rsplit("-", 1)[-1]
        out[onnx_dir_name(variant)] = (
            f"Its decoder layers' weights are {weights} (onnxruntime's MatMulNBits, blocks of 32 input channels "
            f"with a scale and zero point each; embeddings, norms and LM head in float). Against the float slim "
            f"model on {q['windows']} held-out windows: perplexity {q['float_ppl']:.2f} -> {q['quantized_ppl']:.2f}, "
            f"KL {q['kl']:.4f}, top-1 agreement {q['agreement']:.3f}. Its parity check holds it against the slim "
            f"model carrying the same dequantized weights.")
    return out


def _stock(report: dict, config: dict) -> str | None:
    """The stock architecture of a stock-layout export (compress.stock), else None."""
    return (config.get("architectures") or ["?"])[0] if report.get("layout") == "stock" else None


def _use(repo: str, revision: str | None, onnx_dirs: tuple[str, ...], genai_dirs: tuple[str, ...] = (),
         quantized: dict[str, str] | None = None, stock: str | None = None) -> str:
    rev = f', revision="{revision}"' if revision else ""
    text = f"""## Use with transformers

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}"{rev}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo}"{rev}, trust_remote_code=False)
inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))
```

`trust_remote_code=True` runs `modeling_slim.py` from this repository (per-layer widths, index
buffers for the residual channels each layer reads and writes); read it, and pin `revision=` to a
commit you have read. Works with transformers 4.57 and 5.x. The tokenizer needs no remote code."""
    if stock:  # the family's own class: nothing of ours runs
        text = text.replace(", trust_remote_code=True)", ")").split("\n\n`trust_remote_code=True`")[0] + f"""

A stock `{stock}` (the dense model's own architecture at the kept widths, no code in this
repository): transformers, vLLM, TGI and llama.cpp's `convert_hf_to_gguf.py` load it as it is."""
    for d in onnx_dirs:
        text += f"""

## Use with onnxruntime (`{d}/`)

```python
# pip install 'compress-llm[cpu]'   (or 'compress-llm[gpu]' for onnxruntime-gpu; never both)
from huggingface_hub import snapshot_download
from compress.runtime.onnx_runner import OnnxRunner

path = snapshot_download("{repo}"{rev}, allow_patterns=["{d}/*", "tokenizer*"])
runner = OnnxRunner(f"{{path}}/{d}", tokenizer=path)  # CUDA provider when onnxruntime-gpu has it, else CPU
print(runner.generate("def fibonacci(n):", max_new_tokens=32).text[0])
```

The graph takes `input_ids`, `attention_mask`, `position_ids` and a KV cache with its own head
count per layer (`{d}/onnx_config.json`); `OnnxRunner.forward` runs one step, `generate` does
greedy or sampled decoding. No torch needed."""
        if d in (quantized or {}):
            text += "\n\n" + quantized[d]
        if d in genai_dirs:
            text += f"""

`{d}/` also runs with onnxruntime-genai (its `genai_config.json` and the tokenizer are inside):

```python
import onnxruntime_genai as og

model = og.Model(f"{{path}}/{d}")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=64)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("def fibonacci(n):"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```"""
    return text
