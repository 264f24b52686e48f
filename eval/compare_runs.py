"""Compare result files of the evaluation drivers (e.g. HRA vs LoRA): bar chart and table.

Every input must be a results.json of the same task (dreambooth, segmentation or canny).
A DreamBooth file with a --checkpoints sweep contributes one bar per checkpoint.  Bars show
the overall means; the table shows mean ± std where the file has one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hra_diffusion import cli
from hra_diffusion.eval.errors import EvaluationError
from hra_diffusion.eval.report import bar_chart, fmt, fmt_stat, markdown_table

TASK_METRICS = {
    "dreambooth": ("dino", "clip_i", "clip_t", "lpips_to_reference", "lpips_diversity"),
    "segmentation": ("mIoU", "mAcc", "aAcc"),
    "canny": ("iou", "f1"),
}


def load_result(path: Path) -> dict:
    """Read one results.json, with a clear error for a missing or foreign file."""
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EvaluationError(
            f"{path} is not JSON (line {error.lineno}); pass a results.json the drivers wrote"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationError(f"cannot read result file {path}: {error}") from error
    if not isinstance(result, dict):
        raise EvaluationError(f"{path} is not a results.json written by the evaluation drivers")
    if result.get("task") not in TASK_METRICS:
        raise EvaluationError(f"{path} is not a results.json written by the evaluation drivers")
    return result


def headline(result: dict, label: str) -> dict[str, dict[str, dict | float | None]]:
    """{run label: {metric: mean_std dict or plain value}} for one result file."""
    if result["task"] == "dreambooth":
        runs = result["checkpoints"]
        return {
            (f"{label} @ {r['checkpoint']}" if r["checkpoint"] else label): r["overall"]
            for r in runs
        }
    return {label: result["metrics"]}


def _mean(value: dict | float | None) -> float | None:
    return value["mean"] if isinstance(value, dict) else value


def compare(paths: list[Path], labels: list[str]) -> tuple[str, dict, str]:
    """Task name, {run: {metric: mean}} for the chart, and the Markdown table."""
    results = [load_result(p) for p in paths]
    tasks = {r["task"] for r in results}
    if len(tasks) > 1:
        raise EvaluationError(f"cannot compare different tasks: {sorted(tasks)}")
    task = tasks.pop()
    metrics = TASK_METRICS[task]
    runs: dict[str, dict] = {}
    for result, label in zip(results, labels, strict=True):
        runs.update(headline(result, label))
    rows = [
        [run] + [fmt_stat(v) if isinstance(v, dict) else fmt(v) for v in (m[k] for k in metrics)]
        for run, m in runs.items()
    ]
    table = markdown_table(["run", *metrics], rows)
    means = {run: {k: _mean(m[k]) for k in metrics} for run, m in runs.items()}
    return task, means, table


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "results", nargs="+", type=cli.existing_file, help="results.json files to compare"
    )
    parser.add_argument(
        "--labels",
        type=cli.text,
        nargs="+",
        help="one name per file for the legend (default: parent folder)",
    )
    parser.add_argument(
        "--output", required=True, type=cli.output_file, help="bar chart PNG to write"
    )
    parser.add_argument(
        "--markdown", type=cli.output_file, help="also write the comparison table to this file"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output or --markdown"
    )
    return parser


@cli.cli_main("the number of result files")
def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, write the bar chart PNG and print (or write) the Markdown table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.results = [Path(p) for p in args.results]
    args.output = Path(args.output)
    args.markdown = args.markdown and Path(args.markdown)
    for flag, path in (("--output", args.output), ("--markdown", args.markdown)):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{flag} {path}: the folder {path.parent} does not exist; create it.")
        if path is not None and path.exists() and not args.overwrite:
            parser.error(f"{flag} {path} exists; pass --overwrite to replace it.")
    labels = args.labels or [p.parent.name or p.stem for p in args.results]
    if len(labels) != len(args.results):
        parser.error(f"{len(args.results)} result files but {len(labels)} --labels")
    task, means, table = compare(args.results, labels)
    bar_chart(means, list(TASK_METRICS[task]), args.output, f"{task}: overall means")
    if args.markdown:
        args.markdown.write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
