"""Language-model quality figures: perplexity, and KL / top-1 agreement against a reference.

Pruning changes a model's next-token distribution; perplexity says how much worse it
predicts the text, KL(reference || model) and top-1 agreement say how far it moved
from the dense model it came from. Models are anything called as
`model(input_ids=...)` that returns an object with `.logits` (HF causal LMs and the
slim remote-code models alike); nothing else of the model is used.

Window modes: "fixed" (default) cuts the token stream into non-overlapping windows of
`seq_len` and scores every next-token target inside each window (the first token of a
window has no context and is never a target); `max_windows` takes that many spread evenly
over the whole text at a seeded offset (compress.textdata.spread_offsets; the offsets are in
the result), never the first ones. "sliding" (a `stride` < seq_len) moves the window by
`stride` tokens over the whole text and scores only the targets new to each window, so every
token after the first window is predicted with at least seq_len - stride tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from compress.reference import TEST_TEXT
from compress.textdata import load_text, spread_offsets, token_stream, windows, windows_at

__all__ = ["Perplexity", "Comparison", "perplexity", "compare", "quantization_cost", "LayerwiseComparison"]

QUANTIZATION_WINDOWS = 16  # held-out windows of 256 tokens for the cost of quantizing


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # scored target tokens
    windows: int
    seq_len: int
    stride: int | None
    mode: str  # "fixed" or "sliding"
    text_tokens: int  # tokens of the whole text the windows were cut from
    seed: int  # of the spread windows' offset
    offsets: list[int]  # where each window starts in the text

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
    text_tokens: int
    seed: int
    offsets: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Cut:
    """Windows [n, seq_len] of a text, per window the first target index (0..seq_len-2) to score,
    and what the result records about them."""

    wins: torch.Tensor
    first: torch.Tensor
    mode: str
    stride: int | None
    text_tokens: int
    seed: int
    offsets: list[int]

    def about(self) -> tuple:
        """The fields Perplexity and Comparison end with: windows, seq_len, stride, mode, text_tokens, seed, offsets."""
        return len(self.wins), self.wins.shape[1], self.stride, self.mode, self.text_tokens, self.seed, self.offsets


def _cut(ids: torch.Tensor, seq_len: int, stride: int | None, max_windows: int | None, seed: int) -> _Cut:
    sliding = stride is not None and stride < seq_len
    if sliding:
        if max_windows is not None:
            raise ValueError("sliding windows cover the whole text; max_windows spreads fixed windows over it")
        wins = windows(ids, seq_len, stride=stride)
        offsets = list(range(0, stride * len(wins), stride))
    else:
        offsets = spread_offsets(ids.numel(), seq_len, max_windows, seed)
        wins = windows_at(ids, seq_len, offsets)
    first = torch.zeros(len(wins), dtype=torch.long)
    if sliding:
        first[1:] = (seq_len - 1) - stride
    return _Cut(wins, first, "sliding" if sliding else "fixed", stride if sliding else None, ids.numel(), seed, offsets)


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
               max_windows: int | None = None, progress: bool = True, seed: int = 0) -> Perplexity:
    """Perplexity of `model` (already on `device`) on the 1-D token stream `ids`."""
    cut = _cut(ids, seq_len, stride, max_windows, seed)
    total, count = 0.0, 0
    with torch.inference_mode(), _EvalMode(model):
        for x, mask in _batches(cut.wins, cut.first, batch_size, device, "perplexity", progress):
            lp = _logprobs(model, x)
            nll = -lp.gather(-1, x[:, 1:, None]).squeeze(-1)
            total += nll[mask].double().sum().item()
            count += int(mask.sum())
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, *cut.about())


class _Tally:
    """Running sums of KL(reference || model), top-1 agreement and both NLLs over scored positions."""

    def __init__(self):
        self.kl = self.agree = self.nll_m = self.nll_r = 0.0
        self.count = 0

    def add(self, lp_m: torch.Tensor, lp_r: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        """Log-probabilities [b, n, V] of both models, the next tokens [b, n], which positions count."""
        tgt = targets[..., None]
        p_r = lp_r.exp()
        kl_pos = torch.where(p_r > 0, p_r * (lp_r - lp_m), 0.0).sum(-1)  # 0*log0 = 0
        self.kl += kl_pos[mask].double().sum().item()
        self.agree += (lp_m.argmax(-1) == lp_r.argmax(-1))[mask].sum().item()
        self.nll_m -= lp_m.gather(-1, tgt).squeeze(-1)[mask].double().sum().item()
        self.nll_r -= lp_r.gather(-1, tgt).squeeze(-1)[mask].double().sum().item()
        self.count += int(mask.sum())

    def result(self, cut: _Cut) -> Comparison:
        n = self.count
        return Comparison(self.kl / n, self.agree / n, math.exp(self.nll_m / n), math.exp(self.nll_r / n),
                          n, *cut.about())


def compare(model, reference, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
            device: str | torch.device = "cpu", stride: int | None = None,
            max_windows: int | None = None, progress: bool = True, seed: int = 0) -> Comparison:
    """KL(reference || model), top-1 agreement and both perplexities on the same windows."""
    cut = _cut(ids, seq_len, stride, max_windows, seed)
    tally = _Tally()
    with torch.inference_mode(), _EvalMode(model, reference):
        for x, mask in _batches(cut.wins, cut.first, batch_size, device, "compare", progress):
            tally.add(_logprobs(model, x), _logprobs(reference, x), x[:, 1:], mask)
    return tally.result(cut)


def quantization_cost(quantized, model, tokenizer) -> dict:
    """What quantizing `model`'s weights costs, as report.json records it: `compare` of `quantized`
    (a PyTorch model holding the dequantized weights) against the float `model` on held-out text."""
    q = compare(quantized, model, token_stream(tokenizer, load_text(TEST_TEXT)), seq_len=256,
                max_windows=QUANTIZATION_WINDOWS, progress=False)
    return {"windows": q.windows, "float_ppl": q.reference_perplexity, "quantized_ppl": q.perplexity, "kl": q.kl,
            "agreement": q.top1_agreement}


class LayerwiseComparison:
    """`compare` of a slim model against its dense model when neither is ever whole in memory:
    the caller hands over one dense layer and the slim layer's tensors at a time (`step`), both
    models run the held-out windows of every text in `streams` through it (each on its own hidden
    states, in the dense model's dtype), and `finish` applies the final norms and LM heads: one
    Comparison per text. Fixed windows only."""

    @torch.no_grad()
    def __init__(self, dense, adapter, plan, streams: list[torch.Tensor], seq_len: int = 256,
                 max_windows: int | None = None, batch_size: int = 8, seed: int = 0):
        from compress.calibration import hidden_states, layer_inputs
        from compress.slimming import layer_tables, slim_config

        self.dense, self.adapter = dense, adapter
        self.cuts = [_cut(ids, seq_len, None, max_windows, seed) for ids in streams]
        self.wins = torch.cat([c.wins for c in self.cuts])
        self.owner = [i for i, c in enumerate(self.cuts) for _ in range(len(c.wins))]  # text of each window
        self.seq_len, self.batch_size = seq_len, batch_size
        self.config = slim_config(dense, adapter, plan)
        self.dense_in = layer_inputs(dense, adapter, self.wins, batch_size)
        self.slim_x = [hidden_states(args, kwargs) for args, kwargs in self.dense_in]
        self.cos, self.sin, self.mask = layer_tables(self.config, self.slim_x[0])

    @torch.no_grad()
    def step(self, i: int, layer, slim_sd: dict[str, torch.Tensor], config) -> None:
        """Run dense layer i and the slim layer holding `slim_sd` (built with `config`)."""
        from compress.calibration import run_layer
        from compress.slim.modeling_slim import SlimDecoderLayer

        self.dense_in = run_layer(layer, self.dense_in)
        with torch.device("meta"):
            slim = SlimDecoderLayer(config, i)
        slim.load_state_dict(slim_sd, strict=False, assign=True)
        slim.eval()
        cut = lambda t, n: None if t is None else t[:n]  # noqa: E731  (learned positions: no rotary tables)
        self.slim_x = [slim(x, cut(self.cos, len(x)), cut(self.sin, len(x)), self.mask[:len(x)], None)
                       for x in self.slim_x]

    @torch.no_grad()
    def finish(self, shared: dict[str, torch.Tensor]) -> list[Comparison]:
        """KL, top-1 agreement and both perplexities on each text's windows."""
        from compress.slim.modeling_slim import make_norm
        from compress.calibration import hidden_states
        from compress.slimming import final_tensors

        norm_sd, head = final_tensors(shared)
        norm = make_norm(self.config, self.config.hidden_size)
        norm.load_state_dict(norm_sd, strict=False, assign=True)
        dense_norm, dense_head = self.adapter.final_norm(self.dense), self.dense.get_output_embeddings()
        tallies = [_Tally() for _ in self.cuts]
        for j, ((args, kwargs), xs) in enumerate(zip(self.dense_in, self.slim_x)):
            xd = hidden_states(args, kwargs)
            ids = self.wins[j * self.batch_size:(j + 1) * self.batch_size].to(xd.device)
            for r in range(len(ids)):  # 64 positions' logits at a time: a 128k vocabulary is large
                tally = tallies[self.owner[j * self.batch_size + r]]
                for c in range(0, self.seq_len - 1, 64):
                    hd, hs = xd[r:r + 1, c:min(c + 64, self.seq_len - 1)], xs[r:r + 1, c:min(c + 64, self.seq_len - 1)]
                    lp_r = torch.log_softmax(dense_head(dense_norm(hd)).float(), dim=-1)
                    lp_m = torch.log_softmax(torch.nn.functional.linear(norm(hs), head).float(), dim=-1)
                    every = torch.ones(1, hd.shape[1], dtype=torch.bool, device=xd.device)  # fixed windows
                    tally.add(lp_m, lp_r, ids[r:r + 1, c + 1:c + 1 + hd.shape[1]], every)
        return [tally.result(cut) for tally, cut in zip(tallies, self.cuts)]
