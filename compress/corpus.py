"""The reference corpus: reStructuredText sources of the Python 3.11 docs (Debian python3.11-doc).

A fixed, seeded, document-level split into train / calibration / held-out test, so the
reference model never saw the documents it is evaluated (or calibrated) on. Only the
calibration and test slices ship in the package (compress/reference/data/); training
reads the full corpus from the Debian package, which is not needed at run time.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SOURCE_DIR", "Split", "list_documents", "build_split", "join_documents",
           "write_slices", "notice_text"]

SOURCE_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PATTERN = "**/*.rst.txt"
DOC_SEPARATOR = "\n\n"
# Held-out slices are filled from small/medium documents only, so that a few very long
# pages (os, stdtypes, ...) cannot make up most of a slice.
MAX_HELDOUT_DOC_BYTES = 64_000


@dataclass(frozen=True)
class Split:
    """Relative document paths (sorted within each part) of one split."""

    train: tuple[str, ...]
    calib: tuple[str, ...]
    test: tuple[str, ...]


def list_documents(root: Path = SOURCE_DIR) -> list[str]:
    """Sorted relative paths of every *.rst.txt under `root` (sorted: filesystem order varies)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus not found: {root} (install the Debian package python3.11-doc)")
    docs = sorted(p.relative_to(root).as_posix() for p in root.glob(PATTERN) if p.is_file())
    if not docs:
        raise FileNotFoundError(f"no {PATTERN} files under {root}")
    return docs


def build_split(root: Path = SOURCE_DIR, seed: int = 0, calib_bytes: int = 300_000,
                test_bytes: int = 300_000) -> Split:
    """Seeded shuffle of the sorted documents; fill calib, then test, to about the byte targets.

    The license/copyright pages stay in train (they are boilerplate, not a quality probe).
    """
    root = Path(root)
    docs = list_documents(root)
    order = docs[:]
    random.Random(seed).shuffle(order)
    train, calib, test = [], [], []
    nc = nt = 0
    for rel in order:
        size = (root / rel).stat().st_size
        if size > MAX_HELDOUT_DOC_BYTES or rel in ("license.rst.txt", "copyright.rst.txt"):
            train.append(rel)
        elif nc < calib_bytes:
            calib.append(rel)
            nc += size
        elif nt < test_bytes:
            test.append(rel)
            nt += size
        else:
            train.append(rel)
    return Split(tuple(sorted(train)), tuple(sorted(calib)), tuple(sorted(test)))


def join_documents(root: Path, docs: tuple[str, ...] | list[str]) -> str:
    """Concatenate documents (in the given order) separated by a blank line."""
    root = Path(root)
    parts = [(root / rel).read_text(encoding="utf-8").strip("\n") for rel in docs]
    return DOC_SEPARATOR.join(parts) + "\n"


def notice_text(root: Path = SOURCE_DIR) -> str:
    """NOTICE for the shipped slices: the docs' copyright page, PSF and 0BSD licences, verbatim.

    Taken from copyright.rst.txt and license.rst.txt of the same Debian package.
    """
    root = Path(root)
    copyright_page = (root / "copyright.rst.txt").read_text(encoding="utf-8").strip()
    license_page = (root / "license.rst.txt").read_text(encoding="utf-8")
    m = re.search(r"^PSF LICENSE AGREEMENT FOR PYTHON.*?(?=^BEOPEN\.COM LICENSE)", license_page,
                  re.S | re.M)
    if not m:
        raise ValueError(f"PSF License Agreement not found in {root / 'license.rst.txt'}")
    psf = m.group(0).strip()
    m = re.search(r"^ZERO-CLAUSE BSD LICENSE.*?(?=^\.\. _OtherLicenses)", license_page, re.S | re.M)
    if not m:
        raise ValueError(f"Zero-Clause BSD licence not found in {root / 'license.rst.txt'}")
    bsd0 = m.group(0).strip()
    rule = "=" * 72
    header = (
        "The files calib.txt and test.txt in this folder are excerpts of the\n"
        "reStructuredText sources of the Python 3.11 documentation, as shipped in\n"
        "the Debian package python3.11-doc (/usr/share/doc/python3.11/html/_sources).\n"
        "Whole documents were concatenated, separated by a blank line; the text is\n"
        "otherwise unchanged. The list of documents is given by compress.corpus.build_split.\n"
        "\n"
        "The Python documentation is licensed under the PSF License Agreement;\n"
        "since Python 3.8.6, examples, recipes and other code in the documentation\n"
        "are dual licensed under the PSF License Agreement and the Zero-Clause BSD\n"
        "license. (|release| below stands for the Python release, here 3.11.)\n"
    )
    return f"{header}\n{rule}\n{copyright_page}\n\n{rule}\n{psf}\n\n{rule}\n{bsd0}\n"


def write_slices(out_dir: Path, split: Split, root: Path = SOURCE_DIR) -> dict[str, Path]:
    """Write calib.txt, test.txt and NOTICE into `out_dir` (the train slice is never shipped)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, docs in (("calib", split.calib), ("test", split.test)):
        path = out_dir / f"{name}.txt"
        path.write_text(join_documents(root, docs), encoding="utf-8")
        written[name] = path
    written["notice"] = out_dir / "NOTICE"
    written["notice"].write_text(notice_text(root), encoding="utf-8")
    return written
