"""Quality on the shipped held-out texts, measured, recorded and worded one way everywhere.

The export's report (report.json, report.md, the lines it prints), the model card, `compress
eval` and benchmarks/quality.py all measure on compress.texts.EVAL_TEXTS, with windows spread
evenly over each whole text at a seeded offset (the offsets are recorded), say how each text
relates to the calibration text (in-domain or not), and word what was measured one way
(validation.quality_words): one model's figures then read, and mean, the same wherever they appear.
"""

from __future__ import annotations

from pathlib import Path

from compress.texts import EVAL_SEED, EVAL_TEXTS, EVAL_WINDOWS, identify, relation
from compress.textdata import calibration_offsets, load_text, token_stream
from validation.quality import LayerwiseComparison, compare, perplexity

__all__ = ["eval_paths", "calibration_record", "evaluate", "HeldOutLayerwise"]

NO_CALIBRATION = "not known: no calibration text recorded"


def eval_paths() -> list[Path]:
    return [t.path for t in EVAL_TEXTS]


def calibration_record(path: str | Path, n_tokens: int, seq_len: int, n: int | None = None, seed: int = 0) -> dict:
    """The calibration text as reports keep it: what it is (compress.texts.identify) and the
    windows compress.textdata.calibration_windows cut from its `n_tokens` tokens."""
    offsets = calibration_offsets(n_tokens, seq_len, n, seed)
    return {**identify(path), "text_tokens": n_tokens, "windows": len(offsets), "seq_len": seq_len, "seed": seed,
            "offsets": offsets}


def _record(path: Path, result, calibration: dict | None) -> dict:
    rec = {**identify(path), **result.to_dict()}
    rec["in_domain"], rec["relation"] = relation(rec, calibration) if calibration else (None, NO_CALIBRATION)
    return rec


def evaluate(model, tokenizer, calibration: dict | None, reference=None, texts: list[Path] | None = None,
             windows: int | None = EVAL_WINDOWS, seq_len: int = 256, seed: int = EVAL_SEED, stride: int | None = None,
             batch_size: int = 8, device="cpu", progress: bool = False) -> list[dict]:
    """One record per text (default: the shipped evaluation texts): what the text is, how it relates
    to `calibration` (a `calibration_record`, or None when not known), the windows, and the model's
    perplexity, plus KL and top-1 agreement against `reference` when given. `windows` None: every window."""
    records = []
    for path in texts or eval_paths():
        ids = token_stream(tokenizer, load_text(path))
        kw = dict(seq_len=seq_len, batch_size=batch_size, device=device, stride=stride, max_windows=windows,
                  progress=progress, seed=seed)
        res = perplexity(model, ids, **kw) if reference is None else compare(model, reference, ids, **kw)
        records.append(_record(Path(path), res, calibration))
    return records


class HeldOutLayerwise(LayerwiseComparison):
    """`evaluate` of a slim model against its dense model for an export that streams the layers:
    `finish` returns the same records."""

    def __init__(self, dense, adapter, plan, tokenizer, calibration: dict | None, windows: int = EVAL_WINDOWS,
                 seq_len: int = 256, seed: int = EVAL_SEED):
        self.paths, self.calibration = eval_paths(), calibration
        streams = [token_stream(tokenizer, load_text(p)) for p in self.paths]
        super().__init__(dense, adapter, plan, streams, seq_len, windows, seed=seed)

    def finish(self, shared) -> list[dict]:
        return [_record(p, c, self.calibration) for p, c in zip(self.paths, super().finish(shared))]
