"""Zero-shot accuracy through lm-evaluation-harness: the shipped data files, the task configs
against lm-eval's own, and lm-eval's per-item scores against log-likelihoods computed directly
with transformers on the reference model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compress.reference import MODEL_DIR
from validation.zero_shot import zero_shot, zero_shot_table
from validation.zero_shot_tasks import DEFAULT_DATA_DIR, SHIPPED_SHA256, TASKS, data_file, sha256

NO_LM_EVAL = "lm-evaluation-harness is not installed (pip install 'compress-llm[eval]')"


def test_shipped_files_are_the_recorded_ones():
    for name, digest in SHIPPED_SHA256.items():
        assert sha256(DEFAULT_DATA_DIR / name) == digest, name
    sizes = {"piqa": 1838, "hellaswag": 1000, "arc_easy": 2376, "arc_challenge": 1172, "winogrande": 1267}
    for task, n in sizes.items():
        docs = TASKS[task].read(data_file(TASKS[task], DEFAULT_DATA_DIR))
        assert len(docs) == n, task


def test_original_formats_read_like_the_shipped_copies(tmp_path):
    """A user's allenai originals (ARC, WinoGrande) become the same documents as the shipped copies."""
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text(json.dumps(
        {"id": "x", "answerKey": "B", "question": {"stem": "Which is a gas?", "choices": [
            {"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}]}}) + "\n")
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text(json.dumps(
        {"sentence": "The cup fell off the table because the _ was unstable.", "option1": "cup", "option2": "table",
         "answer": "2"}) + "\n")
    arc = TASKS["arc_easy"].read(data_file(TASKS["arc_easy"], tmp_path))
    assert arc == [{"question": "Which is a gas?", "answerKey": "B", "choices": {"text": ["ice", "steam"],
                                                                                  "label": ["A", "B"]}}]
    wino = TASKS["winogrande"].read(data_file(TASKS["winogrande"], tmp_path))
    assert wino == [{"context_options": ["The cup fell off the table because the cup",
                                         "The cup fell off the table because the table"],
                     "continuation": "was unstable.", "gold": 1}]


def test_missing_data_names_the_file_and_its_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hellaswag/hellaswag_val.jsonl or .*rowanz/hellaswag"):
        data_file(TASKS["hellaswag"], tmp_path)


class _TagLoader(yaml.SafeLoader):
    """lm-eval's task YAML with `!function module.name` read as the string."""


_TagLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _lm_eval_yaml(path: Path) -> dict:
    cfg = yaml.load(path.read_text(), Loader=_TagLoader)
    if "include" in cfg:
        cfg = {**_lm_eval_yaml(path.parent / cfg.pop("include")), **cfg}
    return cfg


@pytest.mark.parametrize("task, yaml_file", [("piqa", "piqa/piqa.yaml"), ("hellaswag", "hellaswag/hellaswag.yaml"),
                                             ("arc_easy", "arc/arc_easy.yaml"), ("arc_challenge", "arc/arc_challenge.yaml"),
                                             ("winogrande", "winogrande/default.yaml")])
def test_configs_are_lm_evals_own(task, yaml_file):
    lm_eval = pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    theirs = _lm_eval_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_file)
    ours = TASKS[task].lm_eval_config(DEFAULT_DATA_DIR)
    assert theirs["task"] == task and theirs["output_type"] == ours["output_type"]
    assert [m["metric"] for m in theirs["metric_list"]] == [m["metric"] for m in ours["metric_list"]]
    if task == "winogrande":  # lm-eval computes these from the sentence: test_winogrande_... checks ours
        assert theirs["doc_to_choice"] == "preprocess_winogrande.doc_to_choice"
        return
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        assert str(ours[key]) == str(theirs[key]), key
    if task == "hellaswag":
        assert theirs["process_docs"] == "utils.process_docs"


def test_winogrande_scores_what_lm_evals_functions_do(tmp_path):
    """Context per option, one continuation, the answer's index: as lm-eval's preprocess_winogrande."""
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    from lm_eval.tasks.winogrande import preprocess_winogrande as pre

    raw = {"sentence": "Sam gave Alex the book because _'s shelf was full.", "option1": "Sam", "option2": "Alex",
           "answer": "1"}
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text(json.dumps(raw) + "\n")
    doc = TASKS["winogrande"].read(data_file(TASKS["winogrande"], tmp_path))[0]
    cfg = TASKS["winogrande"].lm_eval_config(tmp_path)
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        assert cfg[key](doc) == getattr(pre, key)(raw), key


def _direct_loglikelihoods(model, tok, context: str, continuations: list[str]) -> list[float]:
    """Sum of log-probabilities of each continuation after `context`, computed with transformers
    alone: the continuation's tokens are those of context + continuation past the context's."""
    out = []
    for cont in continuations:
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        ids = tok(context + cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        out.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx_ids), len(ids))))
    return out


def test_lm_eval_scores_match_direct_computation(tmp_path):
    """Eight two-choice PIQA-form items on the reference model, through the same code path as
    `compress eval --tasks piqa`: lm-eval's log-likelihood of every choice, its acc and acc_norm
    equal a direct computation item by item."""
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    items = [("How do you keep bread fresh?", "Store it in a sealed bag.", "Store it in a bath of water.", 0),
             ("How do you print a value in Python?", "Call len on it.", "Call print on it.", 1),
             ("To open a file for reading,", "use open with mode r.", "use open with mode x.", 0),
             ("How do you cool hot soup?", "Put it on the stove.", "Let it stand and stir it.", 1),
             ("To sort a list in place,", "call its sort method.", "call its append method.", 0),
             ("How do you dry wet shoes?", "Stuff them with newspaper.", "Fill them with water.", 0),
             ("To import a module,", "write def and its name.", "write import and its name.", 1),
             ("How do you loosen a tight jar lid?", "Run it under hot water.", "Put it in the freezer.", 0)]
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(
        "".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b, _ in items))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for *_, y in items))

    res = zero_shot(MODEL_DIR, ["piqa"], data_dir=tmp_path, samples=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()

    acc, acc_norm = [], []
    for (goal, a, b, label), sample in zip(items, res["samples"]["piqa"], strict=True):
        direct = _direct_loglikelihoods(model, tok, f"Question: {goal}\nAnswer:", [" " + a, " " + b])
        assert sample["loglikelihoods"] == pytest.approx(direct, abs=1e-3), goal
        assert sample["target"] == label
        acc.append(float(max(range(2), key=lambda i: direct[i]) == label))
        acc_norm.append(float(max(range(2), key=lambda i: direct[i] / len((a, b)[i])) == label))
        assert sample["acc"] == acc[-1]
    figures = res["tasks"]["piqa"]
    assert figures["items"] == len(items) and figures["data"]["shipped"] is False  # not the shipped PIQA
    assert figures["acc"] == pytest.approx(sum(acc) / len(acc))
    assert figures["acc_norm"] == pytest.approx(sum(acc_norm) / len(acc_norm))
    assert "| piqa | 8 |" in zero_shot_table({"zero_shot": res})


def test_table_is_empty_without_figures():
    assert zero_shot_table({"method": "disp"}) == ""


def test_eval_tasks_on_an_export_lands_in_its_report_and_card(tmp_path, capsys):
    """`compress eval --model SLIM --tasks piqa --task-data DIR`: a tiny local task on an export of the
    reference model; the figures go into its report.json, and the model card shows the table."""
    pytest.importorskip("lm_eval", reason=NO_LM_EVAL)
    from compress.cli import main
    from exporters.model_card import model_card

    slim, data = tmp_path / "slim", tmp_path / "data"
    assert main(["export", "--method", "magnitude", "--ratio", "0.3", "--eval-windows", "0", "--out", str(slim)]) == 0
    (data / "piqa").mkdir(parents=True)
    (data / "piqa" / "valid.jsonl").write_text("".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b in [
        ("To print a value in Python,", "call print on it.", "call len on it."),
        ("To open a file for reading,", "use open with mode r.", "use open with mode x."),
        ("To sort a list in place,", "call its sort method.", "call its append method.")]))
    (data / "piqa" / "valid-labels.lst").write_text("0\n0\n0\n")
    capsys.readouterr()
    assert main(["eval", "--model", str(slim), "--tasks", "piqa", "--task-data", str(data)]) == 0
    assert "| piqa | 3 |" in capsys.readouterr().out
    report = json.loads((slim / "report.json").read_text())
    assert report["zero_shot"]["tasks"]["piqa"]["items"] == 3
    card = model_card(report, json.loads((slim / "config.json").read_text()), "me/slim")
    assert "## Zero-shot accuracy" in card and "| piqa | 3 |" in card
    assert main(["eval", "--model", str(slim), "--tasks", "piqa", "--reference", str(MODEL_DIR)]) == 2
