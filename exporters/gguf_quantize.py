"""Quantized GGUF types, made by llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`)
from a float32 GGUF, so the bytes are exactly what llama.cpp's `llama-quantize` would write."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compress.errors import CompressError

__all__ = ["QUANT_TYPES", "QUANT_BLOCK", "quantize_gguf", "staged_file"]

QUANT_TYPES = ("q8_0", "q4_k_m")
# MLP widths are padded to a multiple of this (zero channels) before quantizing: llama.cpp quantizes
# rows in blocks of 32 values (q8_0, q5_0; k-quants fall back to those) and writes any row whose
# length is not a multiple of 32 in F16, which would leave a pruned down projection unquantized.
QUANT_BLOCK = 32


def quantize_gguf(src: str | Path, dst: str | Path, gguf_type: str, threads: int = 0) -> None:
    """llama.cpp's quantizer: the float GGUF `src` -> `dst` in `gguf_type` (q8_0 or q4_k_m)."""
    from compress.llamacpp_import import llama_cpp

    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    if gguf_type not in ftypes:
        raise CompressError(f"unknown quantized GGUF type {gguf_type!r}; choose from {', '.join(QUANT_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftypes[gguf_type]
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise CompressError(f"llama.cpp could not quantize {src} to {gguf_type}")


@contextmanager
def staged_file(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden staging path beside `out`; on success it replaces `out`, on any error it is removed."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    staging.replace(out)  # a rename within one folder: atomic
