"""How a quality figure says what it was measured on: the same words in every output.

report.json's records (validation.heldout) are worded here for the lines `compress export` and
`compress eval` print, report.md, the model card and the benchmarks' tables, e.g. "perplexity on
wikitext-2-test (32 windows of 256 tokens spread over 300,514 tokens, seed 0)". Standard library
only: the model card is written without torch.
"""

from __future__ import annotations

__all__ = ["measured_on", "quality_line", "calibration_line", "quality_markdown"]


def measured_on(rec: dict) -> str:
    """'python-docs (32 windows of 256 tokens spread over 89,969 tokens, seed 0)': what a figure was measured on."""
    if rec.get("mode") == "sliding":
        return (f"{rec['text']} ({rec['windows']} sliding windows of {rec['seq_len']} tokens, stride "
                f"{rec['stride']}, over {rec['text_tokens']:,} tokens)")
    return (f"{rec['text']} ({rec['windows']} windows of {rec['seq_len']} tokens spread over "
            f"{rec['text_tokens']:,} tokens, seed {rec['seed']})")


def quality_line(rec: dict, reference: str = "dense", model: str = "pruned") -> str:
    """One evaluation record as a printed line."""
    if "kl" not in rec:
        return f"perplexity on {measured_on(rec)}: {rec['perplexity']:.2f}; {rec['relation']}"
    return (f"perplexity on {measured_on(rec)}: {reference} {rec['reference_perplexity']:.2f} -> {model} "
            f"{rec['perplexity']:.2f}, KL {rec['kl']:.4f}, top-1 agreement {rec['top1_agreement']:.3f}; "
            f"{rec['relation']}")


def calibration_line(cal: dict) -> str:
    return f"calibrated on {measured_on(cal)}, file {cal['file']}, sha256 {cal['sha256']}"


def quality_markdown(calibration: dict | None, records: list[dict]) -> list[str]:
    """The calibration text and the held-out figures as markdown (report.md and the model card)."""
    if calibration:
        kind = f" ({calibration['kind']})" if calibration.get("kind") else ""
        line = calibration_line(calibration)
        lines = [f"{line[:1].upper()}{line[1:]}{kind}.", ""]
    else:
        lines = ["Calibration: not recorded.", ""]
    if not records:
        return lines + ["Quality: not measured (exported with `--eval-windows 0`)."]
    itself = [r["text"] for r in records if r["sha256"] == (calibration or {}).get("sha256")]
    if itself:
        lines += [f"The calibration text is the evaluation text {itself[0]}: its figures are measured on the text "
                  "the model was calibrated on, not on held-out text.", ""]
    lines += ["Windows are spread evenly over each whole text at a seeded offset (their offsets are in report.json). "
              "KL(dense ‖ pruned) is in nats per token; top-1 agreement is the share of positions where both "
              "models' most likely next token is the same.", "",
              "| perplexity on | relation to the calibration text | dense | pruned | KL | top-1 agreement |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {measured_on(r)} | {r['relation']} | {r['reference_perplexity']:.2f} | {r['perplexity']:.2f} | "
              f"{r['kl']:.4f} | {r['top1_agreement']:.3f} |" for r in records]
    return lines
