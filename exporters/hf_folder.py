"""Write a slim model as a Hugging Face folder: sharded safetensors, config, modeling code, tokenizer.

Everything goes to a hidden staging folder beside the destination and is moved into place
only when complete, so an interrupted export never leaves a half-written folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.errors import CompressError
from compress.slim import SOURCE_FILES

__all__ = ["staged_folder", "ShardWriter", "write_weights", "write_model_files", "weights_differ", "INDEX_FILE", "REPLACED_FILE"]

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


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes of "2GB", "500MB", "1GiB" or a plain integer; a one-line error otherwise."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise CompressError(f"not a size: {size!r} (write e.g. 2GB, 500MB or 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class ShardWriter:
    """Sharded safetensors written as the tensors arrive, so a streamed export holds at most one
    shard. The split is huggingface_hub's greedy one (a tensor that does not fit the current
    shard starts the next; one larger than a shard gets its own), and the files and index are
    named as `save_pretrained` names them, so either path writes the same bytes.

    With `verify`, each shard is read back and compared tensor by tensor before it is let go;
    `problem` then says what differed (None when every tensor read back equal).
    """

    def __init__(self, folder: Path, max_shard_size: str | int = "2GB", verify: bool = False):
        self.folder, self.verify = Path(folder), verify
        self.limit = parse_size(max_shard_size)
        self.current: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.files: list[list[str]] = []  # tensor names per shard, in writing order
        self.problem: str | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.total += nbytes
        if nbytes > self.limit:
            self._flush({name: tensor})
            return
        if self.size + nbytes > self.limit:
            self._flush(self.current)
            self.current, self.size = {}, 0
        self.current[name] = tensor
        self.size += nbytes

    def _flush(self, tensors: dict[str, torch.Tensor]) -> None:
        path = self.folder / f".shard-{len(self.files):05d}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        self.files.append(list(tensors))
        if self.verify and self.problem is None:
            with safe_open(str(path), framework="pt") as f:
                self.problem = next((f"tensor {k} read back from disk differs from the one written"
                                     for k in tensors if not torch.equal(f.get_tensor(k), tensors[k])), None)

    def close(self) -> int:
        """Write the last shard, give the shards their final names, write the index; total bytes."""
        if self.current or not self.files:
            self._flush(self.current)
        n, weight_map = len(self.files), {}
        for i, names in enumerate(self.files):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".shard-{i:05d}.safetensors").rename(self.folder / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.total


def write_weights(folder: Path, state_dict: dict[str, torch.Tensor], max_shard_size: str | int = "2GB",
                  progress: Callable[[Iterator], Iterator] = iter) -> int:
    """Sharded safetensors plus an index file (always written, even for one shard); returns bytes."""
    writer = ShardWriter(folder, max_shard_size)
    for name, tensor in progress(state_dict.items()):
        writer.add(name, tensor)
    return writer.close()


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
