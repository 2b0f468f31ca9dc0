"""The shipped calibration and evaluation texts: the files are the ones their NOTICE lists, held-out
parts never appear in what calibrates, and the calibration text is chosen in one place."""

from __future__ import annotations

import hashlib
import re

import pytest

from compress.reference import DATA_DIR as REFERENCE_DATA, MODEL_DIR
from compress.texts import (BROAD_CALIB, DATA_DIR, EVAL_TEXTS, REFERENCE_CALIB, default_calibration, identify,
                            relation)


def notice_sha256(folder) -> dict[str, str]:
    """{file: sha256} from the lines `<sha256>  <file>` that list the folder's own files."""
    listed = dict(reversed(m) for m in re.findall(r"^([0-9a-f]{64})  (\S+)$", (folder / "NOTICE").read_text(), re.M))
    return {name: sha for name, sha in listed.items() if (folder / name).exists()}


def test_shipped_texts_are_the_files_their_notice_lists():
    listed = notice_sha256(DATA_DIR)
    shipped = {p.name for p in DATA_DIR.iterdir() if p.suffix == ".txt"}
    assert set(listed) == shipped == {"calib-broad.txt", "code-test.txt", "fiction-test.txt", "wikitext-2-raw-test.txt"}
    for name, sha in listed.items():
        assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == sha, f"{name} differs from its NOTICE"
    assert sum((DATA_DIR / n).stat().st_size for n in shipped) < 4_000_000  # a few MB


def test_notice_names_each_licence_and_source():
    notice = (DATA_DIR / "NOTICE").read_text()
    for words in ("creativecommons.org/licenses/by-sa/3.0", "Pointer Sentinel Mixture", "PSF License Agreement",
                  "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2", "public domain", "Project Gutenberg License",
                  "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c  wiki.test.raw", "LF"):
        assert words in notice, words


def test_wikitext_test_is_shipped_with_lf_line_ends():
    raw = (DATA_DIR / "wikitext-2-raw-test.txt").read_bytes()
    assert b"\r" not in raw and raw.startswith(b" = Robert Boulter = \n")


def snippets(text: str, n: int = 50, size: int = 200) -> list[str]:
    """`n` passages of `size` characters spread evenly over `text`."""
    return [text[i:i + size] for i in range(0, len(text) - size, (len(text) - size) // n)]


@pytest.mark.parametrize("held_out", EVAL_TEXTS, ids=[t.name for t in EVAL_TEXTS])
def test_no_held_out_text_is_in_the_calibration_texts(held_out):
    """Held-out passages spread over each evaluation text occur in neither calibration text."""
    calib = BROAD_CALIB.path.read_text() + REFERENCE_CALIB.path.read_text()
    assert [s for s in snippets(held_out.path.read_text()) if s in calib] == []


def test_the_broad_set_mixes_every_source():
    text = BROAD_CALIB.path.read_text()
    assert REFERENCE_CALIB.path.read_text().strip() in text  # documentation
    for words in ("def ", "import ", "First Citizen:", "Emma", "Laurie", "Mr. Darcy"):
        assert words in text, words
    assert " @-@ " not in text and "<unk>" not in text  # WikiText's tokenisation undone


def test_the_calibration_text_is_chosen_in_one_place(tmp_path):
    assert default_calibration(None) == default_calibration(MODEL_DIR) == REFERENCE_CALIB
    assert REFERENCE_CALIB.path.parent == REFERENCE_DATA
    assert default_calibration(tmp_path / "Llama-3.2-1B") == default_calibration("org/name") == BROAD_CALIB


def test_relation_to_the_calibration_text(tmp_path):
    docs, code, wiki, fiction = (identify(t.path) for t in EVAL_TEXTS)
    reference, broad = identify(REFERENCE_CALIB.path), identify(BROAD_CALIB.path)
    assert relation(docs, reference)[0] is True and "held out from Python docs" in relation(docs, reference)[1]
    assert [relation(t, reference)[0] for t in (code, wiki, fiction)] == [False, False, False]
    assert [relation(t, broad)[0] for t in (docs, code, wiki, fiction)] == [True] * 4  # it draws from all four
    assert relation(wiki, wiki) == (True, "the calibration text itself: not held out")
    copy = tmp_path / "mine.txt"
    copy.write_bytes(EVAL_TEXTS[2].path.read_bytes())
    assert identify(copy)["text"] == "wikitext-2-test"  # a copy is recognised by its sha256
    own = tmp_path / "own.txt"
    own.write_text("my own calibration text\n")
    sha = hashlib.sha256(own.read_bytes()).hexdigest()
    assert identify(own) == {"text": "own.txt", "file": "own.txt", "sha256": sha, "kind": None, "corpora": []}
    assert relation(docs, identify(own))[0] is None  # not known, never "other documents"
