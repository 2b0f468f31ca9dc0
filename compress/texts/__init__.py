"""The shipped texts: which one calibrates, which ones every quality figure is measured on.

One place, so that `compress export`, its report and model card, `compress eval` and the
benchmarks measure the same thing and name it the same way. The reference model keeps the
calibration slice of its own corpus; any other model is calibrated on a broad mix (docs, code,
encyclopedic text, novels, plays) unless --calib says otherwise. Quality is measured on held-out
texts of four kinds, and each figure says how its text relates to the calibration text: measuring
only on the calibration domain flatters a pruned model. Sources, licences and sha256: data/NOTICE.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from compress.reference import CALIB_TEXT, MODEL_DIR, TEST_TEXT

__all__ = ["Text", "DATA_DIR", "REFERENCE_CALIB", "BROAD_CALIB", "EVAL_TEXTS", "EVAL_WINDOWS", "EVAL_SEED",
           "default_calibration", "identify", "relation"]

DATA_DIR = Path(__file__).resolve().parent / "data"
EVAL_WINDOWS = 32  # per evaluation text: `compress export --eval-windows` and `compress eval --windows` default
EVAL_SEED = 0  # of the evaluation windows' offset: fixed, so every export of a model is measured on the same windows


@dataclass(frozen=True)
class Text:
    name: str
    path: Path
    kind: str  # what kind of text, in words
    corpora: tuple[str, ...]  # the corpora it is drawn from: an evaluation text of one of them is in-domain


REFERENCE_CALIB = Text("python-docs-calib", CALIB_TEXT, "technical documentation", ("Python docs",))
BROAD_CALIB = Text("broad-calib", DATA_DIR / "calib-broad.txt",
                   "documentation, code, encyclopedic articles, novels and plays",
                   ("Python docs", "Python stdlib", "WikiText-2", "Gutenberg novels", "Shakespeare"))
EVAL_TEXTS = (
    Text("python-docs", TEST_TEXT, "technical documentation", ("Python docs",)),
    Text("python-code", DATA_DIR / "code-test.txt", "code", ("Python stdlib",)),
    Text("wikitext-2-test", DATA_DIR / "wikitext-2-raw-test.txt", "encyclopedic English prose", ("WikiText-2",)),
    Text("fiction", DATA_DIR / "fiction-test.txt", "novels and plays", ("Gutenberg novels", "Shakespeare")),
)


def default_calibration(model: str | Path | None) -> Text:
    """The calibration text when --calib is not given: the reference model's own slice, else the broad set."""
    return REFERENCE_CALIB if model is None or Path(model).resolve() == MODEL_DIR else BROAD_CALIB


@cache
def _sha256(path: Path, stamp: tuple[int, int]) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256(path: str | Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    return _sha256(path, (st.st_size, st.st_mtime_ns))


def identify(path: str | Path) -> dict:
    """What a text file is, as records keep it: its name, file, sha256, kind and corpora. A copy
    of a shipped text (same sha256) is that text; any other file is named by its file name, its
    corpora unknown (empty)."""
    digest = sha256(path)
    for t in (REFERENCE_CALIB, BROAD_CALIB, *EVAL_TEXTS):
        if sha256(t.path) == digest:
            return {"text": t.name, "file": t.path.name, "sha256": digest, "kind": t.kind, "corpora": list(t.corpora)}
    return {"text": Path(path).name, "file": Path(path).name, "sha256": digest, "kind": None, "corpora": []}


def relation(text: dict, calibration: dict) -> tuple[bool | None, str]:
    """(in-domain?, in words) for an evaluation text against the calibration text (`identify` records):
    the same file, a held-out part of a corpus the calibration text draws from, other corpora, or
    not known (a text of the user's own)."""
    if text["sha256"] == calibration["sha256"]:
        return True, "the calibration text itself: not held out"
    shared = [c for c in text["corpora"] if c in calibration["corpora"]]
    if shared:
        return True, f"in-domain: held out from {' and '.join(shared)}, which the calibration text draws from"
    if not (text["corpora"] and calibration["corpora"]):
        return None, "not known: a text not shipped with compress (only an identical file is recognised)"
    return False, "out of domain: other documents and corpora than the calibration text"
