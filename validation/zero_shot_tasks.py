"""The zero-shot tasks as lm-evaluation-harness configs that read local files, never the Hub.

Each task keeps lm-eval's own prompt, choices, target and metrics (its tasks/<name>/*.yaml,
copied; tests/test_zero_shot.py checks them against the installed lm-eval), and swaps the
Hub download for `custom_dataset`, which reads the task's file from a data folder:

    <data>/piqa/valid.jsonl + valid-labels.lst          PIQA validation, as its authors publish it
    <data>/hellaswag/hellaswag_val.jsonl                HellaSwag validation (rowanz/hellaswag), or
    <data>/hellaswag/hellaswag_val_sample1000.jsonl     the shipped 1,000-item sample of it
    <data>/arc/ARC-Easy-Test.jsonl, ARC-Challenge-Test.jsonl   ARC test (allenai), or the shipped
    <data>/arc/arc_easy_test.jsonl, arc_challenge_test.jsonl   copies (query/choices/gold form)
    <data>/winogrande/dev.jsonl                         WinoGrande dev (allenai), or the shipped
    <data>/winogrande/winogrande_dev.jsonl              copy (context_options/continuation/gold form)

benchmarks/data/ holds the shipped files with their licences (benchmarks/data/README.md); the
first file of a task's list that exists is read, so a user's full or original file wins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

__all__ = ["TASKS", "DEFAULT_DATA_DIR", "SHIPPED_SHA256", "LocalTask", "data_file", "sha256"]

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "data"

# sha256 of each shipped file (benchmarks/data/README.md says where each comes from).
SHIPPED_SHA256 = {
    "piqa/valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
    "piqa/valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
    "hellaswag/hellaswag_val_sample1000.jsonl": "79b87117cffba9878961284f233797c5ebeba4193cb48a93eabc4a5a1156cc45",
    "arc/arc_easy_test.jsonl": "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5",
    "arc/arc_challenge_test.jsonl": "1ae3aeedf1951d881cbd5c2e3a31e78a1993d251479afbe4cb413b6707244636",
    "winogrande/winogrande_dev.jsonl": "ea1592526f3bfdd0948ed3acb1b4dfa3f83d23698917118688ee1df7f8d4b8d7",
}

ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _piqa(path: Path) -> list[dict]:
    """valid.jsonl and the labels beside it (valid-labels.lst, one 0/1 a line), as lm-eval's piqa reads them."""
    labels = (path.parent / path.name.replace(".jsonl", "-labels.lst")).read_text().split()
    docs = _jsonl(path)
    if len(labels) != len(docs):
        raise ValueError(f"{path}: {len(docs)} items but {len(labels)} labels")
    return [{**d, "label": int(label)} for d, label in zip(docs, labels)]


def _arc(path: Path) -> list[dict]:
    """ARC items in the Hub's schema (question, choices.text/label, answerKey), from allenai's
    original jsonl or from the query/choices/gold copy shipped here."""
    out = []
    for d in _jsonl(path):
        if "question" in d:  # allenai's original: {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}
            q = d["question"]
            out.append({"question": q["stem"], "answerKey": d["answerKey"],
                        "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}})
        else:
            letters = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            out.append({"question": d["query"].removeprefix("Question: "), "answerKey": letters[d["gold"]],
                        "choices": {"text": d["choices"], "label": letters}})
    return out


def _winogrande(path: Path) -> list[dict]:
    """WinoGrande items as lm-eval's partial scoring needs them: the sentence up to the blank filled
    with each option (the contexts), the rest after it (the one continuation scored), the answer's
    index. From allenai's original (sentence, option1, option2, answer "1"/"2") these are computed as
    lm-eval's preprocess_winogrande does; the shipped copy holds them already."""
    out = []
    for d in _jsonl(path):
        if "sentence" in d:
            s, blank = d["sentence"], d["sentence"].index("_")
            d = {"context_options": [s[:blank] + d["option1"], s[:blank] + d["option2"]],
                 "continuation": s[blank + 1:].strip(), "gold": {"1": 0, "2": 1}[d["answer"]]}
        out.append(d)
    return out


def _hellaswag_process_docs(dataset):
    """lm-eval's own HellaSwag preprocessing (tasks/hellaswag/utils.py), imported, not copied."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


@dataclass(frozen=True)
class LocalTask:
    """One task: lm-eval's name for it, the files it may read (relative to the data folder, first
    found wins) in its folder, how to read them into the Hub schema lm-eval's config expects, and that config."""

    name: str
    folder: str
    files: tuple[str, ...]
    read: Callable[[Path], list[dict]]
    config: dict
    source: str  # where the original data come from, for error messages

    def lm_eval_config(self, data_dir: Path) -> dict:
        """The config dict for lm-eval (simple_evaluate's `tasks`), reading this task's local file."""
        return {"task": self.name, "output_type": "multiple_choice", "validation_split": "validation",
                "custom_dataset": partial(_dataset, self.read, data_file(self, data_dir)),
                "metadata": {"version": 1.0}, **self.config}


def _dataset(read: Callable[[Path], list[dict]], path: Path, **_metadata) -> dict:
    import datasets

    return {"validation": datasets.Dataset.from_list(read(path))}


def data_file(task: LocalTask, data_dir: Path) -> Path:
    """The file `task` reads from `data_dir`: the first of its files that exists."""
    for name in task.files:
        if (path := Path(data_dir) / task.folder / name).is_file():
            return path
    wanted = " or ".join(f"{task.folder}/{n}" for n in task.files)
    raise FileNotFoundError(f"{task.name}: no {wanted} in {data_dir} ({task.source})")


_ARC_CONFIG = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metric_list": [ACC, ACC_NORM],
}
_ARC_SOURCE = "ARC test set, CC BY-SA 4.0: allenai.org/data/arc (ARC-V1-Feb2018)"

TASKS = {t.name: t for t in [
    LocalTask("piqa", "piqa", ("valid.jsonl",), _piqa, {
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": [ACC, ACC_NORM],
    }, "PIQA validation, AFL-3.0: github.com/ybisk/ybisk.github.io, piqa/data/valid.jsonl and valid-labels.lst"),
    LocalTask("hellaswag", "hellaswag", ("hellaswag_val.jsonl", "hellaswag_val_sample1000.jsonl"), _jsonl, {
        "process_docs": _hellaswag_process_docs,
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metric_list": [ACC, ACC_NORM],
    }, "HellaSwag validation, MIT: github.com/rowanz/hellaswag, data/hellaswag_val.jsonl"),
    LocalTask("arc_easy", "arc", ("ARC-Easy-Test.jsonl", "arc_easy_test.jsonl"), _arc, _ARC_CONFIG, _ARC_SOURCE),
    LocalTask("arc_challenge", "arc", ("ARC-Challenge-Test.jsonl", "arc_challenge_test.jsonl"), _arc, _ARC_CONFIG,
              _ARC_SOURCE),
    LocalTask("winogrande", "winogrande", ("dev.jsonl", "winogrande_dev.jsonl"), _winogrande, {
        "doc_to_text": lambda doc: doc["gold"],
        "doc_to_target": lambda doc: doc["continuation"],
        "doc_to_choice": lambda doc: doc["context_options"],
        "metric_list": [ACC],
    }, "WinoGrande 1.1 dev, CC-BY: github.com/allenai/winogrande (download_winogrande.sh), data/dev.jsonl"),
]}
