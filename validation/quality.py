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

from compress.reference import TEST_TEXT
from compress.textdata import load_text, token_stream, windows

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

    def result(self, wins, seq_len, stride, mode) -> Comparison:
        n = self.count
        return Comparison(self.kl / n, self.agree / n, math.exp(self.nll_m / n), math.exp(self.nll_r / n),
                          n, len(wins), seq_len, stride, mode)


def compare(model, reference, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
            device: str | torch.device = "cpu", stride: int | None = None,
            max_windows: int | None = None, progress: bool = True) -> Comparison:
    """KL(reference || model), top-1 agreement and both perplexities on the same windows."""
    wins, first, mode, stride = _plan(ids, seq_len, stride, max_windows)
    tally = _Tally()
    with torch.inference_mode(), _EvalMode(model, reference):
        for x, mask in _batches(wins, first, batch_size, device, "compare", progress):
            tally.add(_logprobs(model, x), _logprobs(reference, x), x[:, 1:], mask)
    return tally.result(wins, seq_len, stride, mode)


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
    models run the held-out windows through it (each on its own hidden states, in the dense
    model's dtype), and `finish` applies the final norms and LM heads. Fixed windows only."""

    @torch.no_grad()
    def __init__(self, dense, adapter, plan, ids: torch.Tensor, seq_len: int = 256, max_windows: int | None = None,
                 batch_size: int = 8):
        from compress.calibration import hidden_states, layer_inputs
        from compress.slimming import layer_tables, slim_config

        self.dense, self.adapter = dense, adapter
        self.wins, self.first, self.mode, self.stride = _plan(ids, seq_len, None, max_windows)
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
    def finish(self, shared: dict[str, torch.Tensor]) -> dict:
        """The report's quality entry: windows, perplexities, KL and top-1 agreement."""
        from compress.slim.modeling_slim import make_norm
        from compress.calibration import hidden_states
        from compress.slimming import final_tensors

        norm_sd, head = final_tensors(shared)
        norm = make_norm(self.config, self.config.hidden_size)
        norm.load_state_dict(norm_sd, strict=False, assign=True)
        dense_norm, dense_head = self.adapter.final_norm(self.dense), self.dense.get_output_embeddings()
        pos = torch.arange(self.seq_len - 1)
        tally = _Tally()
        for j, ((args, kwargs), xs) in enumerate(zip(self.dense_in, self.slim_x)):
            xd = hidden_states(args, kwargs)
            ids = self.wins[j * self.batch_size:(j + 1) * self.batch_size].to(xd.device)
            first = self.first[j * self.batch_size:(j + 1) * self.batch_size]
            mask = (pos[None, :] >= first[:, None]).to(xd.device)
            for r in range(len(ids)):  # 64 positions' logits at a time: a 128k vocabulary is large
                for c in range(0, self.seq_len - 1, 64):
                    hd, hs = xd[r:r + 1, c:min(c + 64, self.seq_len - 1)], xs[r:r + 1, c:min(c + 64, self.seq_len - 1)]
                    lp_r = torch.log_softmax(dense_head(dense_norm(hd)).float(), dim=-1)
                    lp_m = torch.log_softmax(torch.nn.functional.linear(norm(hs), head).float(), dim=-1)
                    tally.add(lp_m, lp_r, ids[r:r + 1, c + 1:c + 1 + hd.shape[1]], mask[r:r + 1, c:c + hd.shape[1]])
        q = tally.result(self.wins, self.seq_len, self.stride, self.mode)
        return {"windows": q.windows, "seq_len": self.seq_len, "dense_ppl": q.reference_perplexity,
                "slim_ppl": q.perplexity, "kl": q.kl, "agreement": q.top1_agreement}
