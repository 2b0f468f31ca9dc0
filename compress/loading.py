"""Loading checkpoints with one-line errors for bad input: Hugging Face folders (safetensors only,
never pickle), Hub ids, and GGUF files (dequantized to the requested dtype by transformers' GGUF
loader, which needs the `gguf` extra: pip install 'compress-llm[gguf]').

A model is checked in the order its user would fix it, each failure one line naming the file and
the fix: the folder or file exists; its config.json; the architecture it declares; its weights
(present, not pickle, every shard readable); then, on its own, the tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from compress.adapters import adapter_class, get_adapter
from compress.errors import CompressError
from compress.helpers import DTYPES, is_hub_id, torch_dtype
from exporters.hf_folder import open_safetensors

__all__ = ["load_model", "load_dtype", "dense_params", "load_tokenizer", "resolve_dtype", "resolve_device",
           "default_model_dir", "load_folder_model", "gguf_architecture"]

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# A folder's tokenizer: a tokenizers file, a sentencepiece model, or a BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


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
        if is_hub_id(name_or_path):
            _check_hub_id(str(name_or_path))
        elif not path.exists():
            raise CompressError(f"{name_or_path}: no such model folder")
        elif not path.is_dir():
            raise CompressError(f"{path} is a file: give the model folder that holds config.json and the "
                                "*.safetensors weights, or a .gguf file")
        return str(path), {}
    if not path.is_file():
        raise CompressError(f"{path}: no such GGUF file")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise CompressError(f"loading a GGUF file needs {' and '.join(missing)}: pip install 'compress-llm[gguf]'")
    return str(path.resolve().parent), {"gguf_file": path.name}


def _one_line(e: Exception) -> str:
    """An exception's whole message on one line (transformers' span several; the first alone may
    stop mid-sentence)."""
    return " ".join(str(e).split()) or type(e).__name__


def _check_hub_id(repo_id: str) -> None:
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repository id either
        cached = False
    if is_offline_mode() and not cached:
        raise CompressError(f"{repo_id}: no such local folder or file, and as a Hub id it is not in the Hugging Face "
                            f"cache and cannot be downloaded offline (HF_HUB_OFFLINE is set): download it once "
                            f"online (hf download {repo_id}) or give a local folder")


def _check_folder(path: Path, trust_remote_code: bool) -> None:
    """config.json, the architecture it declares (unless the folder's own code runs it), weights."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CompressError(f"{path}: no config.json, so not a Hugging Face model folder; give the folder that "
                            "holds config.json and the *.safetensors weights")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
        raise CompressError(f"{config_file} is not a JSON object ({_one_line(e)}); copy it again from the "
                            "model's source") from None
    if not trust_remote_code:
        adapter_class(model_type, str(config_file))
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise CompressError(f"{path}: weights only as pickle ({pickles[0]}), which is never loaded (unpickling "
                                "can run code); convert them to safetensors (save_pretrained writes them)")
        raise CompressError(f"{path}: no *.safetensors weights; copy the model's weight files into the folder")
    index = path / "model.safetensors.index.json"
    try:
        named = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    except (ValueError, KeyError, AttributeError) as e:
        raise CompressError(f"{index} is not a safetensors index ({_one_line(e)}); copy it again") from None
    absent = sorted(name for name in named if not (path / name).is_file())
    if absent:
        raise CompressError(f"{index} names {absent[0]}, which is not in the folder; copy the missing shards")
    for shard in shards:
        with open_safetensors(shard):
            pass


def gguf_architecture(reader) -> str:
    """The architecture a GGUF file declares (general.architecture), from its `gguf.GGUFReader`."""
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _check_gguf(path: Path) -> None:
    """The GGUF file's architecture, checked before transformers parses the file."""
    from gguf import GGUFReader

    try:
        arch = gguf_architecture(GGUFReader(str(path)))
    except (ValueError, KeyError, OSError) as e:
        raise CompressError(f"{path}: not a readable GGUF file ({_one_line(e)}); download or copy it again") from None
    adapter_class(arch, str(path))


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
        with _code_copy_removed(source, trust_remote_code):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **kw)
    except Exception as e:  # noqa: BLE001  safetensors, torch and transformers each raise their own types
        raise CompressError(f"cannot load model {name_or_path or source}: {_one_line(e)}") from None
    return model.to(device).eval()


def load_folder_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A local folder's model run by the folder's own code (an export's modeling_slim.py) where its
    config names it (auto_map), else by transformers' own class (a stock-layout export), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = Path(folder) / "config.json"
    code = not config.is_file() or "auto_map" in json.loads(config.read_text())
    with _code_copy_removed(folder, code):
        return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=code, dtype=dtype).eval()


@contextmanager
def _code_copy_removed(folder: str | Path, runs_code: bool = True):
    """transformers imports a local folder's model code (trust_remote_code: `runs_code`) from a copy
    it makes, and keeps, under HF_MODULES_CACHE/transformers_modules/<the folder's name>; an export's
    staging folder has a new random name every time (and tests' folders too), so a copy the load
    inside made is removed once the classes are imported (one that was there before is left)."""
    from transformers.dynamic_module_utils import _sanitize_module_name
    from transformers.utils import HF_MODULES_CACHE, TRANSFORMERS_DYNAMIC_MODULE_NAME

    name = _sanitize_module_name(Path(folder).resolve().name)
    copy = Path(HF_MODULES_CACHE) / TRANSFORMERS_DYNAMIC_MODULE_NAME / name
    made = runs_code and Path(folder).is_dir() and not copy.exists()
    try:
        yield
    finally:
        if made:
            shutil.rmtree(copy, ignore_errors=True)


def load_config(name_or_path: str | Path | None = None, trust_remote_code: bool = False):
    """The config of a folder, Hub id or GGUF file, its family checked (unless remote code) before
    any weight is read."""
    from transformers import AutoConfig

    source, kw = _source(name_or_path)
    if kw:
        _check_gguf(Path(source) / kw["gguf_file"])
    elif Path(source).is_dir():
        _check_folder(Path(source), trust_remote_code)
    try:
        with _code_copy_removed(source, trust_remote_code):
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load config of {name_or_path or source}: {_one_line(e)}") from None
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
    if not kw and Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise CompressError(f"{source}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files of "
                            "the model it came from into the folder")
    cfg = Path(source) / "tokenizer_config.json"
    named = json.loads(cfg.read_text()).get("tokenizer_class") if not kw and cfg.is_file() else None
    # Our exports name this class; loading it directly skips transformers 5's look at config.json.
    cls = PreTrainedTokenizerFast if named == "PreTrainedTokenizerFast" else AutoTokenizer
    try:
        return cls.from_pretrained(source, trust_remote_code=False, **kw)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load tokenizer from {name_or_path or source}: {_one_line(e)}") from None
