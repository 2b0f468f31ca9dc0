"""Text -> token windows, shared by training, calibration and evaluation.

Everything that turns a text file into model inputs goes through here, so that
calibration of a pruning method and the quality evaluation of its result see the
text cut the same way.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

__all__ = ["load_text", "token_stream", "windows", "spread_offsets", "windows_at", "spread_windows",
           "calibration_offsets", "calibration_windows", "MAX_CALIB_WINDOWS"]

MAX_CALIB_WINDOWS = 512  # the default takes every window of the calibration text up to this many


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file; a missing, binary or empty file is an error, not an empty corpus."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); give a "
                         "UTF-8 text file") from None
    if not text.strip():
        raise ValueError(f"text file is empty: {p}; give a UTF-8 text file with text in it")
    return text


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenize `text` as one stream (no BOS/EOS added) -> 1-D LongTensor.

    One call on the whole text, so the ids are exactly what the tokenizer gives for it
    (no seams from chunking); `verbose=False` only silences the "longer than the
    model's maximum length" warning, which does not apply since we cut windows after.
    """
    if not text:
        raise ValueError("cannot tokenize an empty text")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None,
            stride: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into windows -> LongTensor [n, seq_len].

    Non-overlapping by default (stride = seq_len); a smaller stride gives overlapping
    (sliding) windows. The trailing partial window is dropped. `max_windows` asks for
    exactly that many windows (the first ones); if the text cannot supply them it is
    an error, because quietly using fewer would change a calibration or a figure.
    """
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    n = 0 if ids.numel() < seq_len else (ids.numel() - seq_len) // stride + 1
    if n == 0 or (max_windows is not None and n < max_windows):
        want = max_windows or 1
        raise ValueError(f"text too short: {ids.numel()} tokens give {n} windows of {seq_len} "
                         f"(stride {stride}), {want} requested")
    if max_windows is not None:
        n = max_windows
    return ids.unfold(0, seq_len, stride)[:n].contiguous()


def spread_offsets(n_tokens: int, seq_len: int, n: int | None = None, seed: int = 0) -> list[int]:
    """Where `n` non-overlapping windows of `seq_len` start when spread evenly over a stream of
    `n_tokens`: one every n_tokens // n tokens, all shifted by a seeded offset (so the first starts
    near the beginning and the last ends near the end). None: every window, from token 0.

    The first N windows of a text measure its first few documents; spread windows measure the
    whole of it. More windows than the text holds is an error, as for `windows`.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    fit = n_tokens // seq_len
    if fit == 0 or (n is not None and not 1 <= n <= fit):
        raise ValueError(f"text too short: {n_tokens} tokens give {fit} windows of {seq_len}, {n or 1} requested")
    if n is None:
        return list(range(0, fit * seq_len, seq_len))
    step = n_tokens // n
    shift = random.Random(seed).randint(0, step - seq_len)
    return [shift + i * step for i in range(n)]


def windows_at(ids: torch.Tensor, seq_len: int, offsets: list[int]) -> torch.Tensor:
    """The windows of a 1-D token stream starting at `offsets` -> LongTensor [len(offsets), seq_len]."""
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(ids.shape)}")
    return ids.unfold(0, seq_len, 1)[torch.tensor(offsets, dtype=torch.long)].contiguous()


def spread_windows(ids: torch.Tensor, seq_len: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """The windows at `spread_offsets` of a 1-D token stream -> LongTensor [n, seq_len]."""
    return windows_at(ids, seq_len, spread_offsets(ids.numel(), seq_len, n, seed))


def calibration_offsets(n_tokens: int, seq_len: int, n: int | None = None, seed: int = 0) -> list[int]:
    """Where the calibration windows start: `n` spread evenly, or (None) every window of the text,
    spread evenly at most MAX_CALIB_WINDOWS of them when the text holds more."""
    if n is None and n_tokens // seq_len > MAX_CALIB_WINDOWS:
        n = MAX_CALIB_WINDOWS
    return spread_offsets(n_tokens, seq_len, n, seed)


def calibration_windows(ids: torch.Tensor, seq_len: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """The calibration windows at `calibration_offsets` -> LongTensor [n, seq_len].

    Learned masks (DISP) overfit a small calibration set, so the default uses all the text
    there is (358 windows of 256 tokens in the reference slice) rather than a fixed count; a
    longer text (the broad set) is sampled evenly, so every part of the mix calibrates.
    """
    return windows_at(ids, seq_len, calibration_offsets(ids.numel(), seq_len, n, seed))
