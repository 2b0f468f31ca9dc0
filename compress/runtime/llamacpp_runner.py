"""Running a GGUF file in llama.cpp (llama-cpp-python): logits, greedy tokens, tokenization (its speed:
compress.speed.llamacpp_timer).

`LlamaCppModel` is also called like a causal LM (`model(input_ids=...).logits`), so the quality
figures of validation.quality (perplexity, KL against the float slim model) apply to a GGUF as
they do to a PyTorch model. Its KV cache holds float32 by default (llama.cpp's own default is
float16), so a float32 GGUF is compared with PyTorch at float32 throughout.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

__all__ = ["LlamaCppModel"]


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
