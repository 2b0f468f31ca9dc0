"""benchmarks/recovery.py as the quality table's one command: several ratios, recovery at some of them,
and zero-shot accuracy of the dense model and of each slim model (exported to a folder, as `compress
eval --tasks` reads it) without and with recovery, in one record. lm-eval itself is replaced by a
stand-in that loads the folder it is given (tests/test_zero_shot.py covers lm-eval)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import recovery  # noqa: E402

from compress.loading import load_model  # noqa: E402
from tiny import tiny_folder  # noqa: E402


def test_ratios_recovery_and_zero_shot_in_one_record(tmp_path, monkeypatch):
    dense = tiny_folder(tmp_path / "dense")
    calls = []

    def fake_zero_shot(path, tasks, limit, *, trust_remote_code):
        model = load_model(path, trust_remote_code=trust_remote_code)  # the folder loads as eval would load it
        calls.append((Path(path), trust_remote_code, sum(p.numel() for p in model.parameters())))
        figures = {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": 0.1, "items": limit, "of": 9}
        return {"lm_eval": "stand-in", "tasks": {t: {**figures, "data": {"file": f"{t}.jsonl"}} for t in tasks}}

    monkeypatch.setattr(recovery, "zero_shot", fake_zero_shot)
    out = tmp_path / "record.json"
    torch.set_num_threads(1)
    assert recovery.main(["--model", str(dense), "--section", "t", "--methods", "magnitude", "disp",
                          "--ratios", "0.25", "0.5", "--recover-ratios", "0.5", "--steps", "2", "--disp-steps", "2",
                          "--seq-len", "32", "--calib-windows", "8", "--test-windows", "2",
                          "--zero-shot", "piqa", "winogrande", "--zero-shot-limit", "3", "--zero-shot-ratios", "0.5",
                          "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    quality, accuracy = rec["tables"]
    models = {(r["method"], r["ratio"], r["variant"]) for r in quality["rows"]}
    more = next(v for m, r, v in models if v.endswith("(equal compute)"))
    assert models == {("magnitude", 0.25, "none"), ("disp 2 steps", 0.25, "none"),
                      ("magnitude", 0.5, "none"), ("magnitude", 0.5, "recover (KL)"),
                      ("disp 2 steps", 0.5, "none"), ("disp 2 steps", 0.5, more), ("disp 2 steps", 0.5, "recover (KL)")}
    assert all(r["vs_dense"] == r["perplexity"] / r["dense"] for r in quality["rows"])
    scored = [(r["method"], r["ratio"], r["variant"]) for r in accuracy["rows"]]
    assert scored == [(m, r, v) for m, r, v in [("dense", 0.0, "none"), ("magnitude", 0.5, "none"),
                                                ("magnitude", 0.5, "recover (KL)"), ("disp 2 steps", 0.5, "none"),
                                                ("disp 2 steps", 0.5, "recover (KL)")] for _ in range(2)]
    assert [r["task"] for r in accuracy["rows"][:2]] == ["piqa", "winogrande"]
    assert accuracy["rows"][0]["acc"] == 50.0 and accuracy["rows"][0]["items"] == "3 of 9"
    # The dense model as given; each slim model from a folder of our own export, so trusted, and smaller.
    assert calls[0][:2] == (dense, False) and all(trusted for _, trusted, _ in calls[1:])
    assert all(n < calls[0][2] for _, _, n in calls[1:])
    assert [z["variant"] for z in rec["data"]["zero_shot"]][:3] == ["none", "none", "recover (KL)"]
