"""Loading dense checkpoints (safetensors only) with one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import CompressError

__all__ = ["load_model", "load_tokenizer", "resolve_dtype", "resolve_device", "default_model_dir"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_model_dir() -> Path:
    from compress.reference import MODEL_DIR

    return MODEL_DIR


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CompressError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError("--device cuda requested but no CUDA GPU is available")
    return torch.device(name)


def _check_local(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CompressError(f"{path}: no config.json; not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        raise CompressError(f"{path}: no .safetensors weights (pickle checkpoints are not loaded)")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"{path}/config.json is corrupt: {e}") from None


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", trust_remote_code: bool = False):
    """A causal LM from a local folder or a Hub id, in eval mode, refusing non-safetensors weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.adapters import get_adapter

    path = Path(name_or_path) if name_or_path else default_model_dir()
    if path.exists():
        _check_local(path)
    elif name_or_path and str(name_or_path).startswith((".", "/", "~")):
        raise CompressError(f"{name_or_path}: no such model folder")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load config of {path}: {str(e).strip().splitlines()[0]}") from None
    if not trust_remote_code:
        get_adapter(config)  # refuse an unsupported family before reading any weights
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # noqa: BLE001  safetensors, torch and transformers each raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompressError(f"cannot load model {path}: {first}") from None
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | Path | None = None, trust_remote_code: bool = False):
    """trust_remote_code only for folders this project wrote (their config names our modeling code)."""
    from transformers import AutoTokenizer

    path = Path(name_or_path) if name_or_path else default_model_dir()
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None
