"""Small facts and formulas that several layers use, each written once.

Imports neither torch nor numpy at module level: the ONNX runtime (numpy and onnxruntime, no
torch) uses it too, so what needs torch imports it when called. The slim model's own files
cannot import this package and keep private copies of `positions` and `head_rows`;
tests/test_helpers.py holds them equal.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import CompressError

__all__ = ["positions", "head_rows", "dtype_name", "torch_dtype", "DTYPES", "ONNX_TYPES", "SAFETENSORS_CODES",
           "check_ratio", "RatioError", "is_hub_id", "SCOPES"]

# The dtypes a model is loaded, pruned and exported in, by the names configs, reports and the
# command line use: torch's own names (`torch_dtype` and `dtype_name` convert).
DTYPES = ("float32", "float16", "bfloat16")
# The dtypes of an ONNX export: ONNX's element type (TensorProto) and the type onnxruntime reports.
ONNX_TYPES = {"float32": (1, "tensor(float)"), "float16": (10, "tensor(float16)")}
# How much of the model a parity check runs at once (validation.parity.resolve_scope; --parity-scope).
SCOPES = ("auto", "model", "layers")
# safetensors' dtype codes, of every dtype a slim folder's tensors may have.
SAFETENSORS_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                     "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def dtype_name(dtype) -> str:
    """The name of a torch dtype ("float16" for torch.float16): `torch_dtype`'s inverse."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str):
    """The torch dtype called `name` ("bfloat16" -> torch.bfloat16)."""
    import torch

    return getattr(torch, name)


def positions(mask):
    """Position ids from an attention mask [B, S], torch or numpy: the number of real tokens
    before each token, 0 at padding, so a left-padded row counts from 0 like an unpadded one."""
    return (mask.cumsum(-1) - 1) * (mask != 0)


def head_rows(heads, head_dim: int, device=None):
    """Rows of a q projection (columns of o_proj) that hold `heads` (a tensor or a list of head
    indices, in order): head h owns rows h * head_dim to (h + 1) * head_dim - 1."""
    import torch

    heads = torch.as_tensor(heads, dtype=torch.long, device=device)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


class RatioError(CompressError, ValueError):
    """A ratio outside (0, 1): bad input on the command line (CompressError) and in the Python API."""


def check_ratio(ratio: float, name: str = "--ratio", meaning: str = "fraction of decoder-layer linear weights "
                "removed") -> float:
    """`ratio` if it lies strictly between 0 and 1, else a one-line RatioError naming the option."""
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio < 1.0):
        raise RatioError(f"{name} must be strictly between 0 and 1 ({meaning}), got {ratio}")
    return ratio


def is_hub_id(name_or_path) -> bool:
    """Whether a model name is a Hub id: not an existing path, nor written as one (./, /, ~)."""
    return bool(name_or_path) and not (Path(name_or_path).exists() or str(name_or_path).startswith((".", "/", "~")))
