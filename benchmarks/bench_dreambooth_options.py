"""DreamBooth on the bundled default model: step time with cached inputs and with torch.compile.

Runs ``train/train_dreambooth_hra.py`` with the demo's options
(``examples/world_dreambooth.args``, the bundled robot subject, ``--center_crop
--random_flip``), each variant in its own process, interleaved over the repeats:

- ``plain``: the demo's options;
- ``cached``: plus ``--cache_latents --pre_compute_text_embeddings``;
- ``compiled``: plus ``--torch_compile`` (the UNet compiled with ``fullgraph=True``).

Each variant runs once for 1 step and once for ``--steps + 1`` steps; the difference,
divided by ``--steps``, is its time per step (loading, caching and compiling excluded).
The 1-step run's time above ``plain``'s is the variant's one-off cost (the compile time,
for ``compiled``). Also recorded: each run's final loss from ``training_log.jsonl``.

    python benchmarks/bench_dreambooth_options.py   # all variants, 40 steps, 2 repeats
    python benchmarks/bench_dreambooth_options.py --variants plain compiled --steps 20 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_train_step import versions

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": [],
    "cached": ["--cache_latents", "--pre_compute_text_embeddings"],
    "compiled": ["--torch_compile"],
}


def run(steps: int, variant: str, out: Path) -> tuple[float, float]:
    """(wall seconds, final loss) of one training run in a fresh process."""
    argv = [
        sys.executable, str(ROOT / "train" / "train_dreambooth_hra.py"),
        f"@{ROOT / 'examples' / 'world_dreambooth.args'}",
        "--instance_data_dir", str(ROOT / "examples" / "subject"),
        "--instance_prompt", "a qwe toy", "--center_crop", "--random_flip",
        "--max_train_steps", str(steps), "--output_dir", str(out), "--overwrite_output_dir",
        "--report_to", "none",
        *VARIANTS[variant],
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    seconds = time.perf_counter() - started
    last = (out / "training_log.jsonl").read_text().splitlines()[-1]
    return seconds, json.loads(last)["loss"]


def measure(variants: list[str], steps: int, repeats: int) -> tuple[dict, dict, dict]:
    """Per-step seconds and 1-step-run seconds per variant and repeat, and final losses."""
    per_step = {name: [] for name in variants}
    setup = {name: [] for name in variants}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            order = variants if rep % 2 == 0 else variants[::-1]
            for name in order:
                one, _ = run(1, name, Path(tmp) / name)
                total, losses[name] = run(steps + 1, name, Path(tmp) / name)
                setup[name].append(one)
                per_step[name].append((total - one) / steps)
                print(
                    f"  repeat {rep} {name:8s} {per_step[name][-1]:.4f} s/step, 1 step {one:.1f} s"
                )
    return per_step, setup, losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run (default 40)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (default 2)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="variants to time (default: all; plain always runs, as the reference)",
    )  # fmt: skip
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "dreambooth_options_cpu.json",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1.")
    variants = ["plain", *[name for name in args.variants if name != "plain"]]
    per_step, setup, losses = measure(variants, args.steps, args.repeats)
    medians = {name: statistics.median(times) for name, times in per_step.items()}
    one_off = {
        name: statistics.median(setup[name]) - statistics.median(setup["plain"])
        for name in variants
    }
    report = {
        "benchmark": "bench_dreambooth_options",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "steps": args.steps,
        "per_step_s": per_step,
        "one_step_run_s": setup,
        "median_per_step_s": medians,
        "over_plain_time": {name: medians[name] / medians["plain"] for name in variants},
        "one_off_s_over_plain": one_off,
        "final_loss": losses,
        "versions": versions(),
    }
    for name in variants:
        print(
            f"{name:8s} {medians[name]:.4f} s/step ({report['over_plain_time'][name]:.2f}x plain), "
            f"one-off {one_off[name]:+.1f} s, final loss {losses[name]:.6f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
