"""Running a GGUF file in llama.cpp (llama-cpp-python): logits, greedy tokens, tokenization and speed.

`LlamaCppModel` is also called like a causal LM (`model(input_ids=...).logits`), so the quality
figures of validation.quality (perplexity, KL against the float slim model) apply to a GGUF as
they do to a PyTorch model. Its KV cache holds float32 by default (llama.cpp's own default is
float16), so a float32 GGUF is compared with PyTorch at float32 throughout.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

__all__ = ["LlamaCppModel", "llamacpp_speed", "decode_bytes"]


class LlamaCppModel:
    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None, f32_cache: bool = True):
        from compress.llamacpp_import import llama_cpp

        cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
        self.path = Path(path)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                   n_threads=threads, n_threads_batch=threads, verbose=False, **cache)

    def logits(self, ids) -> np.ndarray:
        """Logits [len(ids), vocab] of a fresh sequence (the KV cache is cleared first)."""
        self.llm.reset()
        return self.step(ids)

    def step(self, ids) -> np.ndarray:
        """Logits of `ids` appended to the sequence so far (the KV cache is kept)."""
        n = self.llm.n_tokens
        self.llm.eval([int(i) for i in ids])
        return self.llm.scores[n:n + len(ids)].copy()

    def greedy(self, ids, new_tokens: int) -> list[int]:
        """`new_tokens` greedy tokens after `ids`, one decode step each (no EOS stop)."""
        logits, out = self.logits(ids), []
        for _ in range(new_tokens):
            out.append(int(logits[-1].argmax()))
            logits = self.step(out[-1:])
        return out

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokens for `text`: no BOS, special tokens as plain text (as token_stream does)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def __call__(self, input_ids, **_) -> SimpleNamespace:
        """Like a causal LM's forward for unpadded rows: `.logits` [batch, length, vocab], float32."""
        return SimpleNamespace(logits=torch.from_numpy(np.stack([self.logits(row.tolist()) for row in input_ids])))

    def close(self) -> None:
        self.llm.close()


def llamacpp_speed(path: str | Path, threads: int, prompt_tokens: int = 128, new_tokens: int = 64,
                   repeats: int = 3) -> dict:
    """Prefill and decode tokens/s of a GGUF in llama.cpp at `threads` threads, best of `repeats`.

    Decode feeds fixed tokens one step at a time (no sampling), so only the model's work is timed;
    llama.cpp's default float16 KV cache, as a user would run it.
    """
    from compress.llamacpp_import import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_tokens + new_tokens, n_batch=prompt_tokens,
                          n_ubatch=prompt_tokens, n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()
    prompt = [(7 * i + 3) % vocab for i in range(prompt_tokens)]
    prefill = decode = float("inf")
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for i in range(new_tokens):
            llm.eval([prompt[i % prompt_tokens]])
        t2 = time.perf_counter()
        prefill, decode = min(prefill, t1 - t0), min(decode, t2 - t1)
    llm.close()
    return {"threads": threads, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "prefill_tokens_per_s": prompt_tokens / prefill, "decode_tokens_per_s": new_tokens / decode}


def decode_bytes(path: str | Path) -> int:
    """Weight bytes one decode step reads: every tensor, except that of the token embedding only a row
    is read (unless it is also the output matrix, a tied head)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    embd = tensors.pop("token_embd.weight")
    return sum(tensors.values()) + (0 if "output.weight" in tensors else embd)
