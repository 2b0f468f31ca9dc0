"""Text -> token windows, shared by training, calibration and evaluation.

Everything that turns a text file into model inputs goes through here, so that
calibration of a pruning method and the quality evaluation of its result see the
text cut the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_text", "token_stream", "windows", "calibration_windows", "MAX_CALIB_WINDOWS"]

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


def calibration_windows(ids: torch.Tensor, seq_len: int, n: int | None = None) -> torch.Tensor:
    """`n` calibration windows, or (None) every window the text gives, at most MAX_CALIB_WINDOWS.

    Learned masks (DISP) overfit a small calibration set, so the default uses all the text
    there is (358 windows of 256 tokens in the shipped slice) rather than a fixed count.
    """
    if n is not None:
        return windows(ids, seq_len, n)
    return windows(ids, seq_len)[:MAX_CALIB_WINDOWS]

