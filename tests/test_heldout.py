"""What an export says it was calibrated and measured on: the calibration text chosen for the model,
windows spread over each held-out text and recorded, in-domain flags that hold when --calib points
at an evaluation text, and the same figures and words from `compress eval`, report.md and the card."""

from __future__ import annotations

import json

import pytest

from compress.cli import main
from compress.reference import TEST_TEXT
from compress.texts import BROAD_CALIB, EVAL_TEXTS, REFERENCE_CALIB, identify
from exporters.model_card import model_card
from test_pipeline import FAST, save_dense
from tiny import tiny_model
from validation.quality_words import measured_on

FIGURES = ("perplexity", "reference_perplexity", "kl", "top1_agreement")


def export(tmp_path, name: str, *argv: str) -> dict:
    """The report of a quick export to tmp_path/name."""
    out = tmp_path / name
    assert main(["export", "--method", "magnitude", "--ratio", "0.5", "--out", str(out), *FAST, *argv]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return save_dense(tiny_model("llama"), tmp_path_factory.mktemp("heldout") / "dense")


@pytest.fixture(scope="module")
def slim(dense):
    """A model that is not the reference model, exported with the default calibration."""
    export(dense.parent, "slim", "--model", str(dense))
    return dense.parent / "slim"


@pytest.fixture(scope="module")
def broad(slim):
    return json.loads((slim / "report.json").read_text())


def test_a_real_model_is_calibrated_on_the_broad_set_and_says_so(broad):
    cal = broad["calibration"]
    assert (cal["text"], cal["file"], cal["sha256"]) == ("broad-calib", BROAD_CALIB.path.name,
                                                        identify(BROAD_CALIB.path)["sha256"])
    step = cal["text_tokens"] // 8
    assert cal["windows"] == len(cal["offsets"]) == 8 and cal["seq_len"] == 32
    assert cal["offsets"][0] < step and cal["offsets"][-1] + 32 > cal["text_tokens"] - step  # the whole mix


def test_every_held_out_text_is_measured_on_windows_spread_over_it(broad, slim):
    records = broad["quality"]
    assert [r["text"] for r in records] == [t.name for t in EVAL_TEXTS]
    for r in records:
        step = r["text_tokens"] // 2
        assert r["windows"] == len(r["offsets"]) == 2 and r["seed"] == 0 and r["mode"] == "fixed"
        assert r["offsets"][0] < step and r["offsets"][-1] + 32 > r["text_tokens"] - step, r["text"]
        assert r["in_domain"] is True and r["relation"].startswith("in-domain: held out from")  # broad draws on all
        assert r["sha256"] == identify(EVAL_TEXTS[records.index(r)].path)["sha256"]
    text = (slim / "report.md").read_text()
    assert f"Calibrated on {measured_on(broad['calibration'])}" in text
    for r in records:
        row = f"| {measured_on(r)} | {r['relation']} | {r['reference_perplexity']:.2f} | {r['perplexity']:.2f} |"
        assert row in text


def test_the_reference_model_keeps_its_slice_and_its_held_out_pages_are_in_domain(tmp_path):
    report = export(tmp_path, "ref")
    assert report["calibration"]["text"] == REFERENCE_CALIB.name and report["calibration"]["file"] == "calib.txt"
    flags = {r["text"]: r["in_domain"] for r in report["quality"]}
    assert flags == {"python-docs": True, "python-code": False, "wikitext-2-test": False, "fiction": False}


def test_calibrating_on_an_evaluation_text_is_said_plainly(tmp_path, dense):
    report = export(tmp_path, "on-test", "--model", str(dense), "--calib", str(TEST_TEXT))
    docs = report["quality"][0]
    assert report["calibration"]["text"] == docs["text"] == "python-docs"
    assert docs["in_domain"] is True and docs["relation"] == "the calibration text itself: not held out"
    card = model_card(report, json.loads((tmp_path / "on-test" / "config.json").read_text()), "me/slim")
    assert "The calibration text is the evaluation text python-docs" in card
    assert "other documents than its calibration" not in card
    own = tmp_path / "own.txt"
    own.write_text(TEST_TEXT.read_text()[:20_000])
    mine = export(tmp_path, "own", "--model", str(dense), "--calib", str(own))
    assert mine["calibration"]["text"] == "own.txt"
    assert {r["in_domain"] for r in mine["quality"]} == {None}  # not known: never claimed held out


def test_eval_gives_the_report_s_figures_in_the_same_words(broad, slim, dense, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(slim), "--reference", str(dense), "--windows", "2", "--seq-len", "32",
                 "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())["texts"]
    assert json.loads(out.read_text())["calibration"] == broad["calibration"]
    for got, want in zip(records, broad["quality"], strict=True):
        assert got["offsets"] == want["offsets"] and got["relation"] == want["relation"]
        assert [got[k] for k in FIGURES] == pytest.approx([want[k] for k in FIGURES], rel=1e-5)
        assert f"perplexity on {measured_on(want)}: reference {want['reference_perplexity']:.2f}" in printed
