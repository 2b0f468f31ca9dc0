"""benchmarks/RESULTS.md is generated: it must be exactly what benchmarks/render_results.py makes
of the committed JSON records in benchmarks/results/, and every record must say what ran, when,
where and with what."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import render_results  # noqa: E402

from validation.record import SCHEMA, Run, table  # noqa: E402

RECORDS = sorted(render_results.RESULTS_DIR.glob("*.json"))


def test_results_md_is_rendered_from_the_records():
    assert render_results.RESULTS_MD.read_text() == render_results.render(), (
        "benchmarks/RESULTS.md differs from the records in benchmarks/results/: it is generated; rerun the "
        "benchmark (or fix the record), then python benchmarks/render_results.py")


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_every_record_says_what_ran_when_where_and_with_what(path):
    r = json.loads(path.read_text())
    assert r["schema"] == SCHEMA
    assert r["section"] == path.stem
    assert r["command"] and r["date"] and r["wall_s"] >= 0 and r["title"]
    assert {"cores", "cpu", "memory_gib"} <= r["machine"].keys() and r["machine"]["cores"]
    assert {"python", "torch", "transformers", "onnxruntime"} <= r["versions"].keys()
    assert r["versions"]["python"] and r["versions"]["torch"]
    assert r["tables"]
    for t in r["tables"]:
        assert "markdown" in t or (t["columns"] and t["rows"])


def test_a_run_renders_with_its_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    run = Run("demo", [str(ROOT / "benchmarks" / "demo.py"), "--ratios", "0.5"], ["the machine was shared"])
    rows = [{"method": "flap", "ratio": 0.5, "ppl": 82.5178, "ok": True}, {"method": "disp", "ratio": 0.5}]
    rec = run.write(tmp_path / "demo.json", "Demo", "What was measured.",
                    [table([("method", "method"), ("ratio", "ratio", "g"), ("ppl", "perplexity", ".2f"),
                            ("ok", "ok")], rows)])
    assert json.loads((tmp_path / "demo.json").read_text()) == rec
    assert rec["command"] == "OMP_NUM_THREADS=1 python benchmarks/demo.py --ratios 0.5"
    text = render_results.render(tmp_path)
    assert "## Demo" in text and "What was measured." in text
    assert "| flap | 0.5 | 82.52 | yes |" in text and "| disp | 0.5 | - | - |" in text
    assert "Note: the machine was shared" in text
    assert "`OMP_NUM_THREADS=1 python benchmarks/demo.py --ratios 0.5`" in text
    assert f"{rec['machine']['cores']} cores" in text and f"torch {rec['versions']['torch']}" in text


def test_a_tool_s_own_table_is_kept_as_printed(tmp_path):
    Run("speed", ["compress", "bench"]).write(tmp_path / "speed.json", "Speed", "", [{"markdown": "| a |\n|---|\n| 1 |"}])
    assert "| a |\n|---|\n| 1 |" in render_results.render(tmp_path)


def test_compress_bench_writes_a_record(tmp_path, capsys):
    from compress.cli import main

    path = tmp_path / "speed-demo.json"
    assert main(["bench", "--no-onnx", "--no-peer", "--repeats", "1", "--prompt", "8", "--new-tokens", "2",
                 "--threads", "1", "--json", str(path)]) == 0
    rec = json.loads(path.read_text())
    assert rec["section"] == "speed-demo" and rec["title"].startswith("Speed: ")
    printed = capsys.readouterr().out
    assert rec["tables"][0]["markdown"] in printed and "| pytorch | dense |" in rec["tables"][0]["markdown"]
    assert {r["engine"] for r in rec["data"]["rows"]} == {"pytorch"} and rec["data"]["bandwidth"] > 0
    assert "| pytorch | dense |" in render_results.render(tmp_path)
