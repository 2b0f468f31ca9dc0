"""Zero-shot accuracy (PIQA, HellaSwag, ARC, WinoGrande) with lm-evaluation-harness, offline.

The pruning papers and users report these figures, measured with lm-eval; here lm-eval scores
the tasks exactly as its own task configs do (validation.zero_shot_tasks), on local data files,
with the model loaded by compress.loading (folders, slim exports, Hub ids, GGUF files). Needs
the `eval` extra: pip install 'compress-llm[eval]'.

    zero_shot("out/slim", ["piqa", "arc_easy"], limit=500)   # {"tasks": {"piqa": {"acc": ...}}, ...}
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib import metadata
from pathlib import Path

from validation.zero_shot_tasks import DEFAULT_DATA_DIR, SHIPPED_SHA256, TASKS, data_file, sha256

__all__ = ["zero_shot", "configure_arguments", "run_command", "zero_shot_table", "DEFAULT_TASKS"]

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("piqa", "hellaswag", "arc_easy", "winogrande")
METRICS = ("acc", "acc_norm")


def _require_lm_eval() -> str:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise ImportError("zero-shot tasks need lm-evaluation-harness: pip install 'compress-llm[eval]'") from None


def zero_shot(model_path: str | Path, tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS, limit: int | None = None,
              data_dir: str | Path | None = None, *, tokenizer_path: str | Path | None = None,
              trust_remote_code: bool = False, device: str = "cpu", batch_size: int = 8,
              samples: bool = False) -> dict:
    """Accuracy of the model at `model_path` on `tasks`, each on its first `limit` items (all when
    None), read from `data_dir` (the shipped benchmarks/data when None).

    `trust_remote_code` as for compress.loading.load_model (the caller decides: only for our own
    exports or when the user asks). `tokenizer_path`: where the tokenizer is, when not beside the
    model. `samples`: also return each item's log-likelihood of every choice (lm-eval's own).
    """
    version = _require_lm_eval()
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from compress.loading import load_model, load_tokenizer

    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    configs = [TASKS[t].lm_eval_config(data_dir) for t in tasks]  # finds every file before loading the model
    model = load_model(model_path, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_path if tokenizer_path is not None else model_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, log_samples=samples,
                                  task_manager=TaskManager(include_defaults=False))
    result = {"model": str(model_path), "lm_eval": version, "limit": limit, "device": str(device),
              "batch_size": batch_size, "num_fewshot": 0,
              "tasks": {t: _task_result(out, t, data_dir) for t in tasks}}
    if samples:
        result["samples"] = {t: [_sample(s) for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])]
                             for t in tasks}
    return result


def _task_result(out: dict, task: str, data_dir: Path) -> dict:
    """One task's figures from lm-eval's results (its keys are "metric,filter"), with the data file read."""
    figures = out["results"][task]
    res = {}
    for m in METRICS:
        if f"{m},none" in figures:
            stderr = figures.get(f"{m}_stderr,none")
            res[m] = figures[f"{m},none"]
            res[f"{m}_stderr"] = stderr if isinstance(stderr, float) else None
    counts = out.get("n-samples", {}).get(task, {})
    path = data_file(TASKS[task], data_dir)
    digest, shipped = sha256(path), SHIPPED_SHA256.get(f"{TASKS[task].folder}/{path.name}")
    if shipped is not None and digest != shipped:
        log.warning("%s differs from the file shipped under that name (sha256 %s)", path, digest)
    res.update(items=counts.get("effective"), of=counts.get("original"),
               data={"file": f"{TASKS[task].folder}/{path.name}", "sha256": digest,
                     "shipped": None if shipped is None else digest == shipped})
    return res


def _sample(s: dict) -> dict:
    """One item: lm-eval's log-likelihood of each choice's continuation, its target (the gold index,
    or for WinoGrande the continuation scored after each choice) and acc."""
    return {"doc_id": s["doc_id"], "target": s["target"], "acc": s.get("acc"),
            "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}


def configure_arguments(parser: argparse.ArgumentParser) -> None:
    """`compress eval`'s zero-shot options (--tasks switches the command from perplexity to these)."""
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=None, metavar="TASK",
                        help=f"zero-shot accuracy with lm-evaluation-harness instead of perplexity; from "
                             f"{', '.join(TASKS)} (needs pip install 'compress-llm[eval]')")
    parser.add_argument("--limit", type=int, default=None,
                        help="with --tasks: score only the first N items of each task")
    parser.add_argument("--task-data", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR",
                        help="with --tasks: folder of the tasks' data files (piqa/, hellaswag/, arc/, winogrande/; "
                             "see benchmarks/data/README.md)")


def run_command(args: argparse.Namespace, *, trust_remote_code: bool, tokenizer: str | Path | None = None) -> int:
    """`compress eval --tasks ...`: print the table, write --json, and keep the figures in the
    model folder's report.json when it has one (the model card shows them)."""
    result = zero_shot(args.model, args.tasks, args.limit, args.task_data, tokenizer_path=tokenizer,
                       trust_remote_code=trust_remote_code, device=str(args.device), batch_size=args.batch_size)
    print(zero_shot_table({"zero_shot": result}))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    report_path = Path(args.model) / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report["zero_shot"] = result
        report_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        log.info("recorded zero-shot accuracy in %s", report_path)
    return 0


def _cell(figures: dict, metric: str) -> str:
    if figures.get(metric) is None:
        return "-"
    stderr = figures.get(f"{metric}_stderr")
    return f"{100 * figures[metric]:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def zero_shot_table(report: dict) -> str:
    """A "Zero-shot accuracy" markdown section from report["zero_shot"] (what zero_shot returns);
    empty when the report has none."""
    z = report.get("zero_shot")
    if not z:
        return ""
    rows = ["| task | items | acc (%) | acc_norm (%) |", "|---|---:|---:|---:|"]
    for task, f in z["tasks"].items():
        items = f"{f.get('items')}" + (f" of {f['of']}" if f.get("of") not in (None, f.get("items")) else "")
        rows.append(f"| {task} | {items} | {_cell(f, 'acc')} | {_cell(f, 'acc_norm')} |")
    setup = (f"lm-evaluation-harness {z.get('lm_eval')}, {z.get('num_fewshot', 0)}-shot, "
             + (f"first {z['limit']} items of each task" if z.get("limit") else "every item")
             + "; ± is the standard error. acc_norm divides each choice's log-likelihood by its length in "
               "characters, as lm-eval does.")
    return "## Zero-shot accuracy\n\n" + setup + "\n\n" + "\n".join(rows)
