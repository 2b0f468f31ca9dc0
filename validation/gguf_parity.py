"""GGUF parity: llama.cpp running an exported GGUF == the slim PyTorch model it came from, prefill
and every decode step, the same greedy tokens; and llama.cpp's tokenizer == the folder's on text.

Like the ONNX checks, llama.cpp (float32 weights and KV cache) is held against the slim model in
float64, to within NOISE_FACTOR times PyTorch's own float32 error (GGUF_TOLERANCE at least):
two correct float32 programs that sum in different orders differ by about that much.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache

from compress.slim.modeling_slim import CACHE_NAME
from validation.onnx_parity import NOISE_FACTOR
from validation.parity import GENERATION_TOKENS, Check

__all__ = ["GGUF_TOLERANCE", "gguf_checks", "compare_gguf", "tokenizer_check"]

GGUF_TOLERANCE = 1e-4
TOKENIZER_CHARS = 4000  # of the held-out text, tokenized by both


def gguf_checks(slim, model, ids: torch.Tensor) -> list[Check]:
    """llama.cpp (`model`, a float32 GGUF) vs the slim model on token rows `ids` [rows, length]."""
    r = compare_gguf(slim, model, ids)
    tol = max(GGUF_TOLERANCE, NOISE_FACTOR * r["torch_float64_error"])
    same = r["greedy_tokens_equal"]
    return [Check("gguf", "cpu", "float32", r["float64_error"], tol, r["float64_error"] <= tol and same,
                  f"llama.cpp vs float64: PyTorch float32 {r['torch_float64_error']:.1e}; vs PyTorch float32: "
                  f"prefill {r['prefill_max_abs_diff']:.1e}, decode max {max(r['decode_max_abs_diff']):.1e}; "
                  f"{GENERATION_TOKENS} greedy tokens {'identical' if same else 'DIFFER'}")]


@torch.no_grad()
def compare_gguf(slim, model, ids: torch.Tensor, steps: int = GENERATION_TOKENS) -> dict:
    """Run llama.cpp, the float32 slim model and its float64 copy in lockstep on each row: prefill,
    then one token per step, every side fed the slim model's greedy token (so the diffs measure
    arithmetic, not a diverged sequence); then greedy generation on both. Numbers only."""
    slim = slim.to("cpu", torch.float32).eval()
    exact = copy.deepcopy(slim).to(torch.float64)
    diffs, err, torch_err, greedy_equal = [], [], [], True
    for row in ids.cpu():
        caches = (DynamicCache(), DynamicCache())
        x, got = row[None], model.logits(row.tolist())
        for step in range(steps + 1):
            ref = slim(input_ids=x, cache=caches[0]).logits[0].double()
            ref64 = exact(input_ids=x, cache=caches[1]).logits[0]
            got64 = torch.from_numpy(got).double()
            if step == len(diffs):
                diffs.append(0.0)
            diffs[step] = max(diffs[step], float((got64 - ref).abs().max()))
            err.append(float((got64 - ref64).abs().max()))
            torch_err.append(float((ref - ref64).abs().max()))
            x = ref[-1].argmax()[None, None]
            got = model.step([int(x)])
        expected = slim.generate(row[None], attention_mask=torch.ones_like(row[None]), do_sample=False,
                                 max_new_tokens=steps, eos_token_id=None, pad_token_id=0,
                                 **{CACHE_NAME: DynamicCache()})[0, len(row):].tolist()
        greedy_equal &= model.greedy(row.tolist(), steps) == expected
    del exact
    return {"steps": steps, "prefill_max_abs_diff": diffs[0], "decode_max_abs_diff": diffs[1:],
            "float64_error": max(err), "torch_float64_error": max(torch_err), "greedy_tokens_equal": greedy_equal}


def tokenizer_check(model, tokenizer, text: str) -> Check:
    """llama.cpp's tokens for the start of `text` == the folder's tokenizer's (no special tokens added)."""
    text = text[:TOKENIZER_CHARS]
    want = tokenizer(text, add_special_tokens=False)["input_ids"]
    have = model.tokenize(text)
    first = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None if len(want) == len(have) else
                 min(len(want), len(have)))
    return Check("gguf-tokens", "cpu", "-", float(first is not None), 0.0, first is None,
                 f"{len(want)} tokens of held-out text "
                 + ("identical" if first is None else f"differ from token {first}"))
