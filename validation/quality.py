"""Language-model quality figures: perplexity, and KL / top-1 agreement against a reference.

Pruning changes a model's next-token distribution; perplexity says how much worse it
predicts the text, KL(reference || model) and top-1 agreement say how far it moved
from the dense model it came from. Models are anything called as
`model(input_ids=...)` that returns an object with `.logits` (HF causal LMs and the
slim remote-code models alike); nothing else of the model is used.

Window modes: "fixed" (default) cuts the token stream into non-overlapping windows of
`seq_len` and scores every next-token target inside each window (the first token of a
window has no context and is never a target). "sliding" (a `stride` < seq_len) moves
the window by `stride` tokens and scores only the targets new to each window, so every
token after the first window is predicted with at least seq_len - stride tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from compress.textdata import windows

__all__ = ["Perplexity", "Comparison", "perplexity", "compare"]


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # scored target tokens
    windows: int
    seq_len: int
    stride: int | None
    mode: str  # "fixed" or "sliding"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    kl: float  # mean KL(reference || model) per scored position, nats
    top1_agreement: float  # fraction of positions where both argmax tokens agree
    perplexity: float  # of the model
    reference_perplexity: float
    tokens: int
    windows: int
    seq_len: int
    stride: int | None
    mode: str

    def to_dict(self) -> dict:
        return asdict(self)


def _plan(ids: torch.Tensor, seq_len: int, stride: int | None, max_windows: int | None):
    """Windows [n, seq_len] and, per window, the first target index (0..seq_len-2) to score."""
    sliding = stride is not None and stride < seq_len
    wins = windows(ids, seq_len, max_windows=max_windows, stride=stride if sliding else None)
    first = torch.zeros(len(wins), dtype=torch.long)
    if sliding:
        first[1:] = (seq_len - 1) - stride
    return wins, first, ("sliding" if sliding else "fixed"), (stride if sliding else None)


def _logprobs(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities for positions 0..L-2, float32: [b, L-1, V]."""
    logits = model(input_ids=x).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _batches(wins, first, batch_size, device, desc, progress):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pos = torch.arange(wins.shape[1] - 1)
    for i in tqdm(range(0, len(wins), batch_size), desc=desc, unit="batch", disable=not progress,
                  dynamic_ncols=True):
        x = wins[i:i + batch_size].to(device)
        mask = (pos[None, :] >= first[i:i + batch_size, None]).to(device)
        yield x, mask


class _EvalMode:
    """Put modules in eval mode for the duration, restoring their previous mode after."""

    def __init__(self, *models):
        self.models = [m for m in models if isinstance(m, torch.nn.Module)]

    def __enter__(self):
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.models, self.modes):
            m.train(mode)


def perplexity(model, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
               device: str | torch.device = "cpu", stride: int | None = None,
               max_windows: int | None = None, progress: bool = True) -> Perplexity:
    """Perplexity of `model` (already on `device`) on the 1-D token stream `ids`."""
    wins, first, mode, stride = _plan(ids, seq_len, stride, max_windows)
    total, count = 0.0, 0
    with torch.inference_mode(), _EvalMode(model):
        for x, mask in _batches(wins, first, batch_size, device, "perplexity", progress):
            lp = _logprobs(model, x)
            nll = -lp.gather(-1, x[:, 1:, None]).squeeze(-1)
            total += nll[mask].double().sum().item()
            count += int(mask.sum())
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(wins), seq_len, stride, mode)


def compare(model, reference, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
            device: str | torch.device = "cpu", stride: int | None = None,
            max_windows: int | None = None, progress: bool = True) -> Comparison:
    """KL(reference || model), top-1 agreement and both perplexities on the same windows."""
    wins, first, mode, stride = _plan(ids, seq_len, stride, max_windows)
    kl = agree = nll_m = nll_r = 0.0
    count = 0
    with torch.inference_mode(), _EvalMode(model, reference):
        for x, mask in _batches(wins, first, batch_size, device, "compare", progress):
            lp_m = _logprobs(model, x)
            lp_r = _logprobs(reference, x)
            tgt = x[:, 1:, None]
            p_r = lp_r.exp()
            kl_pos = torch.where(p_r > 0, p_r * (lp_r - lp_m), 0.0).sum(-1)  # 0*log0 = 0
            kl += kl_pos[mask].double().sum().item()
            agree += (lp_m.argmax(-1) == lp_r.argmax(-1))[mask].sum().item()
            nll_m -= lp_m.gather(-1, tgt).squeeze(-1)[mask].double().sum().item()
            nll_r -= lp_r.gather(-1, tgt).squeeze(-1)[mask].double().sum().item()
            count += int(mask.sum())
    return Comparison(kl / count, agree / count, math.exp(nll_m / count), math.exp(nll_r / count),
                      count, len(wins), seq_len, stride, mode)
