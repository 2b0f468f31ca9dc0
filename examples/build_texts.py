"""Build the shipped calibration and evaluation texts (compress/texts/data/) and their NOTICE.

A pruned model is only as good as what it was measured on: the Python-docs slices of the
reference model say nothing about prose or code. This writes a broad calibration set (documentation,
code, encyclopedic text, novels, plays) and, for every source, a held-out part kept apart from it,
so quality can be measured in and out of the calibration domain. Each source is cut into documents
(pages, modules, articles, runs of paragraphs); a seeded shuffle fills the calibration part, then
the held-out part, and each part keeps the documents in their original order.

    python examples/build_texts.py --sources /work/textsrc    # rewrites compress/texts/data/

Sources (see the NOTICE it writes for licences): the reference model's Python-docs calibration
slice, the top-level modules of Python 3.11's standard library (--stdlib), the WikiText-2
validation split in its tokenised form (never the test split, which is shipped for evaluation
only), three Project Gutenberg novels and tinyshakespeare.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress.reference import CALIB_TEXT  # noqa: E402
from compress.texts import DATA_DIR  # noqa: E402

NOVELS = {"emma.txt": "Emma, Jane Austen (Project Gutenberg eBook #158)",
          "pride.txt": "Pride and Prejudice, Jane Austen (Project Gutenberg eBook #1342)",
          "little_women.txt": "Little Women, Louisa May Alcott (Project Gutenberg eBook #514)"}
CALIB_BYTES = 300_000  # per source; the docs slice goes in whole (320 KB)
HELD_OUT_BYTES = {"code": 200_000, "novels": 100_000, "plays": 100_000}
BLOCK_BYTES = 16_000  # a "document" of novels and plays: this many bytes of consecutive paragraphs
MAX_MODULE_BYTES = 64_000  # as for the docs slices: a few long modules must not make up a part
SEPARATOR = "\n\n"
RULE = "=" * 72
NOTICE = f"""\
Calibration and evaluation texts shipped with compress, written by examples/build_texts.py
(seeded document-level splits: a source's held-out part never overlaps its calibration part).

sha256 of the files in this folder (tests/test_texts.py holds them to this list):

{{shipped}}

sha256 of the source files they were made from:

{{inputs}}

calib-broad.txt: the default calibration text for any model but the reference model, about
1.5 MB of, in this order:
- documentation: compress/reference/data/calib.txt whole (Python 3.11 documentation pages; their
  held-out pages are compress/reference/data/test.txt; licence: compress/reference/data/NOTICE);
- code: top-level modules of the Python 3.11.7 standard library (Lib/*.py of at most 64 KB, whole
  files, unchanged); held out: code-test.txt;
- encyclopedic: articles of the WikiText-2 validation split (tokenised release), with the
  tokenisation spacing undone (" @-@ " -> "-", " , " -> ", ", ...), headings as plain lines and
  every sentence holding "<unk>" dropped; its held-out part is the WikiText-2 test split
  (wikitext-2-raw-test.txt), which is never used for calibration;
- novels: runs of paragraphs of Emma and Pride and Prejudice (Jane Austen) and Little Women
  (Louisa May Alcott), Project Gutenberg eBooks #158, #1342 and #514; held out: fiction-test.txt;
- plays: runs of speeches of tinyshakespeare (Andrej Karpathy's char-rnn data set: excerpts of
  Shakespeare's plays); held out: fiction-test.txt.

wikitext-2-raw-test.txt: the test split of WikiText-2 (raw), as the Hugging Face data set
wikitext / wikitext-2-raw-v1 gives it (its non-empty rows), with CRLF line ends changed to LF;
otherwise unchanged.

{RULE}
WikiText-2 (calib-broad.txt's encyclopedic part, wikitext-2-raw-test.txt)

Stephen Merity, Caiming Xiong, James Bradbury and Richard Socher, "Pointer Sentinel Mixture
Models", 2016 (arXiv:1609.07843): Wikipedia's Good and Featured articles. The text of Wikipedia
is available under the Creative Commons Attribution-ShareAlike 3.0 Unported licence
(https://creativecommons.org/licenses/by-sa/3.0/) and the GNU Free Documentation License
(https://www.gnu.org/licenses/fdl-1.3.html); WikiText is distributed under CC BY-SA 3.0, and so
are these excerpts and the changes described above. Authors: the Wikipedia contributors of each
article (see each article's history on en.wikipedia.org).

{RULE}
Project Gutenberg novels (calib-broad.txt's novels part, fiction-test.txt)

Emma (1815) and Pride and Prejudice (1813) by Jane Austen, Little Women (1868-69) by Louisa May
Alcott: public domain in the United States. Taken from Project Gutenberg (www.gutenberg.org);
its header, footer, licence and credits are removed, as the Project Gutenberg License asks of
copies distributed without its trademark. These are not Project Gutenberg eBooks. Check the
laws of your country before using them outside the United States.

{RULE}
tinyshakespeare (calib-broad.txt's plays part, fiction-test.txt)

Excerpts of plays by William Shakespeare (1564-1616), public domain, as collected in
https://github.com/karpathy/char-rnn (data/tinyshakespeare/input.txt).

{RULE}
Python standard library (calib-broad.txt's code part, code-test.txt)

Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved. Distributed under the
PSF License Agreement, below (Python 3.11.7's LICENSE.txt).

{{psf}}
"""


def split(docs: list[str], calib_bytes: int, held_out_bytes: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded shuffle; fill calibration, then held-out, to about the byte targets; original order kept."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    calib, held, nc, nh = [], [], 0, 0
    for i in order:
        if nc < calib_bytes:
            calib.append(i)
            nc += len(docs[i].encode())
        elif nh < held_out_bytes:
            held.append(i)
            nh += len(docs[i].encode())
    return [docs[i] for i in sorted(calib)], [docs[i] for i in sorted(held)]


def blocks(text: str, size: int = BLOCK_BYTES) -> list[str]:
    """Runs of consecutive paragraphs (blank-line separated) of about `size` bytes."""
    out, cur = [], []
    for para in re.split(r"\n\s*\n", text.strip()):
        cur.append(para.strip("\n"))
        if sum(len(p) for p in cur) >= size:
            out.append(SEPARATOR.join(cur))
            cur = []
    return out + ([SEPARATOR.join(cur)] if cur else [])


def gutenberg_body(text: str) -> str:
    """The book without Project Gutenberg's header, footer and credits (as PG asks of copies that
    drop its trademark): what lies between the START and END lines, minus paragraphs naming PG."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    body = re.search(r"^\*\*\* ?START OF.*?\*\*\*$(.*?)^\*\*\* ?END OF", text, re.S | re.M)
    if not body:
        raise ValueError("no Project Gutenberg START/END lines")
    paras = re.split(r"\n\s*\n", body.group(1).strip())
    drop = re.compile(r"Project Gutenberg|EBOOK|^Produced by", re.I | re.M)
    return SEPARATOR.join(p for p in paras if not drop.search(p))


def detokenize(line: str) -> str:
    """WikiText's tokenised spacing undone: ` @-@ ` -> `-`, ` , ` -> `, `, `( x )` -> `(x)`, ..."""
    s = line.strip()
    s = re.sub(r" @([-,.])@ ", r"\1", s)
    s = re.sub(r'" ([^"]*?) "', r'"\1"', s)
    s = re.sub(r" ([.,;:!?)\]}%])", r"\1", s)
    s = re.sub(r"([(\[{$]) ", r"\1", s)
    return re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", s)


def wikitext_articles(text: str) -> list[str]:
    """Articles of tokenised WikiText-2, detokenised; sentences holding `<unk>` dropped (most paragraphs
    hold one); headings as lines."""
    articles = []
    for line in text.splitlines():
        if not line.strip():
            continue
        heading = re.fullmatch(r"((?:= )+)(.*?)(?: =)+", line.strip())  # "= Title =", "= = Section = =", ...
        if heading and heading.group(1) == "= ":
            articles.append([])
        if not articles:
            continue
        kept = [s for s in re.split(r"(?<= \.) ", line.strip()) if "<unk>" not in s]  # sentences end " ."
        if kept:
            articles[-1].append(detokenize(heading.group(2) if heading else " ".join(kept)))
    return [SEPARATOR.join(a) for a in articles if len(a) > 1]


def stdlib_modules(stdlib: Path) -> list[str]:
    """Top-level modules of the standard library, by name, at most MAX_MODULE_BYTES each."""
    paths = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size <= MAX_MODULE_BYTES)
    return [p.read_text(encoding="utf-8").strip("\n") for p in paths]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(sources: Path, stdlib: Path, out: Path) -> dict[str, str]:
    """Write the texts; {file name: sha256}."""
    code, code_test = split(stdlib_modules(stdlib), CALIB_BYTES, HELD_OUT_BYTES["code"])
    wiki = wikitext_articles((sources / "wikitext2-tok-valid.txt").read_text(encoding="utf-8"))
    wiki_calib, _ = split(wiki, CALIB_BYTES, 0)
    novels = [b for name in NOVELS for b in blocks(gutenberg_body((sources / name).read_text(encoding="utf-8")))]
    novels_calib, novels_test = split(novels, CALIB_BYTES, HELD_OUT_BYTES["novels"])
    plays = blocks((sources / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    plays_calib, plays_test = split(plays, CALIB_BYTES, HELD_OUT_BYTES["plays"])
    docs = CALIB_TEXT.read_text(encoding="utf-8").strip("\n")
    texts = {
        "calib-broad.txt": [docs, *code, *wiki_calib, *novels_calib, *plays_calib],
        "code-test.txt": code_test,
        "fiction-test.txt": [*novels_test, *plays_test],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, docs_ in texts.items():
        (out / name).write_text(SEPARATOR.join(docs_) + "\n", encoding="utf-8")
    raw = (sources / "wiki.test.raw").read_bytes()
    (out / "wikitext-2-raw-test.txt").write_bytes(raw.replace(b"\r\n", b"\n"))
    return {name: sha256(out / name) for name in [*texts, "wikitext-2-raw-test.txt"]}


def psf_licence(stdlib: Path) -> str:
    """The PSF License Agreement, verbatim from the LICENSE.txt of the Python the code came from."""
    text = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
    m = re.search(r"^PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2.*?(?=^BEOPEN\.COM LICENSE)", text, re.S | re.M)
    if not m:
        raise ValueError(f"PSF License Agreement not found in {stdlib / 'LICENSE.txt'}")
    return m.group(0).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=Path, required=True, help="folder holding the source texts named above")
    ap.add_argument("--stdlib", type=Path, default=Path(sys.base_prefix) / "lib" / "python3.11",
                    help="the standard library folder of Python 3.11 (with its LICENSE.txt)")
    ap.add_argument("--out", type=Path, default=DATA_DIR)
    args = ap.parse_args(argv)
    shas = build(args.sources, args.stdlib, args.out)
    inputs = [args.sources / n for n in (*NOVELS, "tinyshakespeare.txt", "wikitext2-tok-valid.txt", "wiki.test.raw")]
    notice = NOTICE.format(shipped="\n".join(f"{sha}  {name}" for name, sha in shas.items()),
                           inputs="\n".join(f"{sha256(p)}  {p.name}" for p in inputs), psf=psf_licence(args.stdlib))
    (args.out / "NOTICE").write_text(notice, encoding="utf-8")
    for name, sha in shas.items():
        print(f"{sha}  {name}  {(args.out / name).stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
