"""Write a slim model as a Hugging Face folder: sharded safetensors, config, modeling code, tokenizer.

Everything goes to a hidden staging folder beside the destination and is moved into place
only when complete, so an interrupted export never leaves a half-written folder. Folders are
made with the user's umask (as mkdir makes them), so another user or a service can read the
export where the umask lets them; and a destination that exists is replaced only where this
tool wrote it, or it is empty.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors import safe_open

from compress.errors import CompressError
from compress.helpers import SAFETENSORS_CODES, dtype_name
from compress.slim import SOURCE_FILES

__all__ = ["staged_folder", "check_destination", "EXPORT_FILES", "ShardWriter", "write_weights", "weight_map", "tensors_differ", "open_safetensors", "write_model_files", "weights_differ", "INDEX_FILE", "REPLACED_FILE"]

INDEX_FILE = "model.safetensors.index.json"
REPLACED_FILE = "replaced.safetensors"
EXPORT_FILES = ("plan.json", "report.json")  # a folder `compress export` wrote holds these


def check_destination(out: Path, overwrite: bool, ours: tuple[str, ...] = EXPORT_FILES) -> None:
    """Refuse in one line, before any work, a destination that cannot be written or whose
    contents would be lost: an existing `out` is replaced only with `overwrite`, and only where it
    is empty or a folder this tool wrote (it holds one of `ours`); never a file or someone's folder."""
    if out.is_file() or out.is_symlink():
        raise FileExistsError(f"{out} already exists and is not a folder; write to another path")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        if entries and not any((out / name).is_file() for name in ours):
            raise FileExistsError(f"{out} already exists and holds files this tool did not write "
                                  f"({', '.join(entries[:3])}); write to another path, or move them away "
                                  f"(--overwrite replaces only a folder holding {' or '.join(ours)}, or an empty one)")
        if not overwrite:
            raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
    above = next(p for p in out.parents if p.exists())
    if not os.access(above, os.W_OK | os.X_OK):
        raise CompressError(f"cannot write in {above} (permission denied or a read-only file system); "
                            f"write to a folder you can write to")


@contextmanager
def staged_folder(out: str | Path, overwrite: bool = False, ours: tuple[str, ...] = EXPORT_FILES) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `out` (see `check_destination`), on any
    error it is removed, with the folders above `out` that it had to make."""
    out = Path(out).resolve()
    check_destination(out, overwrite, ours)
    made = [p for p in out.parents if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()  # mode 0o777 less the umask, as the user's own folders
        yield staging
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            with suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CompressError(f"no space left on the device while writing {out} (nothing was left behind); "
                                "free some space there, or write elsewhere") from None
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


def _raw(t: torch.Tensor):
    """A contiguous CPU tensor's bytes (little-endian, as safetensors stores them), without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy()


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """safe_open with a one-line error for a missing, truncated or corrupt file."""
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise CompressError(f"{path}: unreadable safetensors file ({e}); it is truncated or corrupt: copy or "
                            "download it again") from None
    with f:
        yield f


def _digest_on_disk(path: Path, name: str) -> str:
    """SHA-256 of one tensor's bytes as safetensors reads it back (the file is opened per tensor:
    its memory map, and the resident pages that count against this process, last one tensor)."""
    with open_safetensors(path) as f:
        return hashlib.sha256(_raw(f.get_tensor(name)).data).hexdigest()


class _Shard:
    """One shard being written: tensor bytes go to a data file as they arrive; `finish` writes
    the safetensors header and then the data (the header needs every tensor's offsets first)."""

    def __init__(self, path: Path):
        self.path, self.entries, self.size = path, [], 0
        self.data = path.with_suffix(".data").open("wb")

    def add(self, name: str, t: torch.Tensor) -> str:
        raw = _raw(t)
        self.data.write(raw.data)
        self.entries.append((name, t.dtype, list(t.shape), self.size, self.size + raw.nbytes))
        self.size += raw.nbytes
        return hashlib.sha256(raw.data).hexdigest()

    def finish(self) -> None:
        self.data.close()
        header = {"__metadata__": {"format": "pt"}}
        header.update({name: {"dtype": SAFETENSORS_CODES[dtype_name(dtype)], "shape": shape,
                              "data_offsets": [b, e]} for name, dtype, shape, b, e in self.entries})
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        data = self.path.with_suffix(".data")
        with self.path.open("wb") as out, data.open("rb") as src:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            shutil.copyfileobj(src, out, 16 << 20)
        data.unlink()


class ShardWriter:
    """Sharded safetensors written as the tensors arrive: each tensor's bytes go to disk at once,
    so writing a 7B export holds one tensor, not one shard (safetensors' own writer takes a whole
    dict of tensors in memory). The split is huggingface_hub's greedy one (a tensor that does not
    fit the current shard starts the next; one larger than a shard gets its own), and files and
    index are named as `save_pretrained` names them.

    With `verify`, each finished shard is read back with safetensors and every tensor's bytes
    compared (by SHA-256) with what was written; `problem` then says what differed, else None.
    """

    def __init__(self, folder: Path, max_shard_size: str | int = "2GB", verify: bool = False):
        self.folder, self.verify = Path(folder), verify
        self.limit = parse_size(max_shard_size)
        self.current: _Shard | None = None
        self.total = 0
        self.files: list[list[str]] = []  # tensor names per shard, in shard order
        self.digests: dict[str, str] = {}
        self.problem: str | None = None

    def _new(self) -> _Shard:
        return _Shard(self.folder / f".shard-{len(self.files):05d}.{len(self.digests)}.safetensors")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        self.total += nbytes
        if nbytes > self.limit:
            shard = self._new()
            self.digests[name] = shard.add(name, tensor)
            self._finish(shard)
            return
        if self.current is not None and self.current.size + nbytes > self.limit:
            self._finish(self.current)
            self.current = None
        self.current = self.current or self._new()
        self.digests[name] = self.current.add(name, tensor)

    def _finish(self, shard: _Shard) -> None:
        shard.finish()
        final = self.folder / f".shard-{len(self.files):05d}.safetensors"
        shard.path.rename(final)
        self.files.append([e[0] for e in shard.entries])
        if self.verify and self.problem is None:
            self.problem = next((f"tensor {k} read back from disk differs from the one written"
                                 for k in self.files[-1] if _digest_on_disk(final, k) != self.digests[k]), None)

    def close(self) -> int:
        """Finish the last shard, give the shards their final names, write the index; total bytes."""
        if self.current is not None or not self.files:
            self._finish(self.current or self._new())
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


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file of a folder written by `write_weights`."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise CompressError(f"{folder}: no {INDEX_FILE}; not a folder written by `compress export`")
    return json.loads(index_path.read_text())["weight_map"]


def weights_differ(folder: Path, expected: dict[str, torch.Tensor]) -> str | None:
    """Why the tensors of a folder written by `write_weights` are not exactly `expected`, or None."""
    names = weight_map(folder)
    if names.keys() != expected.keys():
        diff = sorted(names.keys() ^ expected.keys())
        return f"tensor names differ from the slim state dict: {diff[:3]}"
    return tensors_differ(folder, names, expected)


def tensors_differ(folder: Path, names: dict[str, str], expected: dict[str, torch.Tensor]) -> str | None:
    """Why the folder's tensors named in `expected` (`names`: its `weight_map`) are not exactly
    those, or None. Reads one tensor at a time, so checking a 7B export never holds a second copy
    of it; an unreadable or truncated shard is a one-line CompressError."""
    absent = [k for k in expected if k not in names]
    if absent:
        return f"tensor {absent[0]} is missing from the folder"
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(names[name], []).append(name)
    for filename, group in sorted(by_file.items()):
        try:
            with safe_open(str(folder / filename), framework="pt") as f:
                missing = sorted(set(group) - set(f.keys()))
                differs = None if missing else next(
                    (k for k in group if not torch.equal(f.get_tensor(k), expected[k].cpu())), None)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CompressError(f"{folder / filename}: unreadable safetensors file ({e})") from None
        if missing:
            raise CompressError(f"{folder}: tensors listed in the index are missing: {missing[:3]}")
        if differs:
            return f"tensor {differs} on disk differs from the slim state dict"
    return None


def write_model_files(folder: Path, config, tokenizer=None, generation_config=None, code: bool = True) -> None:
    """config.json, the slim modeling files (`code`; a stock-layout folder runs without them),
    tokenizer and generation config."""
    config.save_pretrained(folder)
    for src in SOURCE_FILES if code else ():
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
