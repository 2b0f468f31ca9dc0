"""Loading checkpoints with one-line errors for bad input: Hugging Face folders (safetensors only,
never pickle), Hub ids, and GGUF files (dequantized to the requested dtype by transformers' GGUF
loader, which needs the `gguf` extra: pip install 'compress-llm[gguf]')."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.helpers import DTYPES, is_hub_id, torch_dtype

__all__ = ["load_model", "load_dtype", "dense_params", "load_tokenizer", "resolve_dtype", "resolve_device", "default_model_dir"]


def default_model_dir() -> Path:
    from compress.reference import MODEL_DIR

    return MODEL_DIR


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CompressError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return torch_dtype(name)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError("--device cuda requested but no CUDA GPU is available")
    return torch.device(name)


def _source(name_or_path: str | Path | None) -> tuple[str, dict]:
    """(what from_pretrained loads, extra keyword arguments): a folder or Hub id as is, a GGUF file
    as its folder plus `gguf_file`."""
    path = Path(name_or_path) if name_or_path else default_model_dir()
    if path.suffix.lower() != ".gguf":
        if not is_hub_id(name_or_path):
            if not path.exists():
                raise CompressError(f"{name_or_path}: no such model folder")
            _check_local(path)
        return str(path), {}
    if not path.is_file():
        raise CompressError(f"{path}: no such GGUF file")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise CompressError(f"loading a GGUF file needs {' and '.join(missing)}: pip install 'compress-llm[gguf]'")
    return str(path.resolve().parent), {"gguf_file": path.name}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_local(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CompressError(f"{path}: no config.json; not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        raise CompressError(f"{path}: no .safetensors weights (pickle checkpoints are not loaded)")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CompressError(f"{path}/config.json is corrupt: {e}") from None


# a float32 dense model may take this share of the available memory before `auto` holds a model
# bound for a half-precision export in that precision instead
FLOAT32_SHARE = 0.5


def load_dtype(config, choice: str, export_dtype: torch.dtype) -> torch.dtype:
    """The dtype to hold the dense model in while pruning: `choice`, or for "auto" float32
    (calibration statistics and searches in full precision) unless the export is in half
    precision and the model in float32 would take over FLOAT32_SHARE of the available memory:
    then the export dtype, since its weights end in it anyway (half the memory)."""
    if choice != "auto":
        return resolve_dtype(choice)
    if export_dtype == torch.float32:
        return torch.float32
    from compress.memory import available_memory

    return torch.float32 if 4 * dense_params(config) <= FLOAT32_SHARE * available_memory() else export_dtype


def dense_params(config) -> int:
    """Parameters of the model a config describes (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def load_model(name_or_path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", trust_remote_code: bool = False,
               export_dtype: torch.dtype = torch.float32):
    """A causal LM from a local folder, a Hub id or a GGUF file, in eval mode, refusing pickle weights.

    `dtype` "auto" picks float32 or half precision by the model's size (`load_dtype`).
    trust_remote_code only for folders this project wrote (their config names our modeling code).
    """
    from transformers import AutoModelForCausalLM

    source, kw = _source(name_or_path)
    config = load_config(name_or_path, trust_remote_code)
    if isinstance(dtype, str):
        dtype = load_dtype(config, dtype, export_dtype)
    if not kw:
        kw["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    except Exception as e:  # noqa: BLE001  safetensors, torch and transformers each raise their own types
        raise CompressError(f"cannot load model {name_or_path or source}: {_first_line(e)}") from None
    return model.to(device).eval()


def load_config(name_or_path: str | Path | None = None, trust_remote_code: bool = False):
    """The config of a folder, Hub id or GGUF file, its family checked (unless remote code) before
    any weight is read."""
    from transformers import AutoConfig

    from compress.adapters import get_adapter

    source, kw = _source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load config of {name_or_path or source}: {_first_line(e)}") from None
    if not trust_remote_code:
        get_adapter(config)
    return config


def load_tokenizer(name_or_path: str | Path | None = None):
    """The tokenizer of a folder, Hub id or GGUF file.

    Never runs remote code: a slim folder's tokenizer needs none, and transformers 5 would
    otherwise ask about the model code its config.json names.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source, kw = _source(name_or_path)
    cfg = Path(source) / "tokenizer_config.json"
    named = json.loads(cfg.read_text()).get("tokenizer_class") if not kw and cfg.is_file() else None
    # Our exports name this class; loading it directly skips transformers 5's look at config.json.
    cls = PreTrainedTokenizerFast if named == "PreTrainedTokenizerFast" else AutoTokenizer
    try:
        return cls.from_pretrained(source, trust_remote_code=False, **kw)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load tokenizer from {name_or_path or source}: {_first_line(e)}") from None
