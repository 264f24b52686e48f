"""DreamBooth steps on the bundled default model: plain, with cached inputs, compiled.

Runs ``train/train_dreambooth_hra.py`` with the demo's options
(``hra_diffusion/world/dreambooth.args``, the bundled robot subject, ``--center_crop
--random_flip``) once per variant and repeat, the variants' order rotating between
repeats:

- ``plain``: the script as the demo runs it;
- ``cached``: ``--cache_latents --pre_compute_text_embeddings``;
- ``compiled``: ``--torch_compile`` (``torch.compile(fullgraph=True)``, Inductor).

A step's time is read from the run's ``training_log.jsonl`` (wall time between two
logged steps), so model loading, cache filling and compilation stay out of it: the first
``--warmup`` steps of every run are left out and the median of the rest is the run's
step time. Compilation time is reported as the first steps' excess over that median (the
table shows the largest of the repeats: later runs in the same process reuse Inductor's
cache), and each variant's final loss beside the plain run's (the tests hold cached inputs
to 1e-6 and the compiled step to 1e-5 of eager; over many steps Inductor's reordered sums
may drift further).

    # writes benchmarks/results/dreambooth_step_cpu.json:
    python benchmarks/bench_dreambooth_step.py
    python benchmarks/bench_dreambooth_step.py --variants plain compiled --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from bench_train_step import versions, write_report

from hra_diffusion.train.reporting import TRAINING_LOG_NAME
from hra_diffusion.train.train_dreambooth_hra import main as dreambooth_main
from hra_diffusion.world.subjects import DREAMBOOTH_RECIPE

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": [],
    "cached": ["--cache_latents", "--pre_compute_text_embeddings"],
    "compiled": ["--torch_compile"],
}
"""Each variant's options on top of the demo's."""


def run(variant: str, steps: int, out: Path) -> tuple[list[float], float]:
    """(wall seconds of every step, final loss) of one training run."""
    argv = [
        f"@{DREAMBOOTH_RECIPE}",
        "--instance_data_dir", str(ROOT / "examples" / "subject"),
        "--instance_prompt", "a qwe toy", "--center_crop", "--random_flip",
        "--max_train_steps", str(steps), "--output_dir", str(out), "--overwrite_output_dir",
        "--report_to", "none",
        *VARIANTS[variant],
    ]  # fmt: skip
    summary = dreambooth_main(argv)
    rows = [json.loads(line) for line in (out / TRAINING_LOG_NAME).read_text().splitlines()]
    return [row["seconds"] for row in rows], summary["loss"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="first steps of a run left out (default 5)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (default 2)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "dreambooth_step_cpu.json"
    )
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    per_step: dict[str, list[float]] = {name: [] for name in args.variants}
    warmup_excess: dict[str, list[float]] = {name: [] for name in args.variants}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            shift = rep % len(args.variants)
            for name in args.variants[shift:] + args.variants[:shift]:
                seconds, losses[name] = run(name, args.steps, Path(tmp) / name)
                step = statistics.median(seconds[args.warmup :])
                per_step[name].append(step)
                warmup_excess[name].append(sum(s - step for s in seconds[: args.warmup]))
                print(f"  repeat {rep} {name:8s} {step:.4f} s/step, final loss {losses[name]}")
    medians = {name: statistics.median(times) for name, times in per_step.items()}
    reference = "plain" if "plain" in medians else args.variants[0]
    report = {
        "benchmark": "bench_dreambooth_step",
        "device": platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "options": VARIANTS,
        "per_step_s": per_step,
        "median_per_step_s": medians,
        "time_over_" + reference: {name: t / medians[reference] for name, t in medians.items()},
        "warmup_excess_s": warmup_excess,
        "final_loss": losses,
        "versions": versions(),
    }
    print(f"\n| variant | median step (s) | vs {reference} | max warm-up excess (s) | final loss |")
    print("|---|---|---|---|---|")
    for name in args.variants:
        print(
            f"| {name} | {medians[name]:.4f} | {medians[name] / medians[reference]:.2f}x | "
            f"{max(warmup_excess[name]):.1f} | {losses[name]:.6f} |"
        )
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
