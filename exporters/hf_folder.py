"""Write a slim model as a Hugging Face folder: sharded safetensors, config, modeling code, tokenizer.

Everything goes to a hidden staging folder beside the destination and is moved into place
only when complete, so an interrupted export never leaves a half-written folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from compress.errors import CompressError
from compress.slim import SOURCE_FILES

__all__ = ["staged_folder", "write_weights", "write_model_files", "weights_differ", "INDEX_FILE", "REPLACED_FILE"]

INDEX_FILE = "model.safetensors.index.json"
REPLACED_FILE = "replaced.safetensors"


@contextmanager
def staged_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `out`, on any error it is removed."""
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_weights(folder: Path, state_dict: dict[str, torch.Tensor], max_shard_size: str | int = "2GB",
                  progress: Callable[[Iterator], Iterator] = iter) -> int:
    """Sharded safetensors plus an index file (always written, even for one shard); returns bytes."""
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in progress(split.filename_to_tensors.items()):
        save_file({n: state_dict[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


def weights_differ(folder: Path, expected: dict[str, torch.Tensor]) -> str | None:
    """Why the tensors of a folder written by `write_weights` are not exactly `expected`, or None.

    Reads one tensor at a time, so checking a 7B export never holds a second copy of it.
    An unreadable or truncated shard is a one-line CompressError.
    """
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise CompressError(f"{folder}: no {INDEX_FILE}; not a folder written by `compress export`")
    weight_map = json.loads(index_path.read_text())["weight_map"]
    if weight_map.keys() != expected.keys():
        diff = sorted(weight_map.keys() ^ expected.keys())
        return f"tensor names differ from the slim state dict: {diff[:3]}"
    by_file: dict[str, list[str]] = {}
    for name, filename in weight_map.items():
        by_file.setdefault(filename, []).append(name)
    for filename, names in sorted(by_file.items()):
        try:
            with safe_open(str(folder / filename), framework="pt") as f:
                missing = sorted(set(names) - set(f.keys()))
                differs = None if missing else next(
                    (k for k in names if not torch.equal(f.get_tensor(k), expected[k].cpu())), None)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CompressError(f"{folder / filename}: unreadable safetensors file ({e})") from None
        if missing:
            raise CompressError(f"{folder}: tensors listed in the index are missing: {missing[:3]}")
        if differs:
            return f"tensor {differs} on disk differs from the slim state dict"
    return None


def write_model_files(folder: Path, config, tokenizer=None, generation_config=None) -> None:
    """config.json (with auto_map), the slim modeling files, tokenizer and generation config."""
    config.save_pretrained(folder)
    for src in SOURCE_FILES:
        shutil.copy(src, folder / src.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        _portable_tokenizer_config(folder, tokenizer)
    if generation_config is not None:
        generation_config.save_pretrained(folder)


def _portable_tokenizer_config(folder: Path, tokenizer) -> None:
    """Name a class every transformers release knows, so the tokenizer loads without remote code.

    transformers 5 writes `TokenizersBackend`, which 4.57 does not know; `PreTrainedTokenizerFast`
    is understood by both (5.x maps it to TokenizersBackend). `model_input_names` is written so
    4.57 does not add `token_type_ids`, which causal LMs do not take; machine-local keys go.
    """
    path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file() or not path.is_file():
        return  # a slow-only (e.g. sentencepiece) tokenizer keeps its own class
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_input_names"] = [n for n in tokenizer.model_input_names if n != "token_type_ids"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
