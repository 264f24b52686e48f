"""DreamBooth on the bundled default model with and without cached inputs.

Runs ``train/train_dreambooth_hra.py`` with the demo's options
(``examples/world_dreambooth.args``, the bundled robot subject, ``--center_crop
--random_flip``) twice per repeat, interleaved: plain, and with ``--cache_latents
--pre_compute_text_embeddings``. Records each run's wall time per step (model loading
excluded: the time of a 1-step run is subtracted) and final loss.

    python benchmarks/bench_cached_inputs.py   # writes benchmarks/results/cached_inputs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train_step import versions

from hra_diffusion.train.train_dreambooth_hra import main as dreambooth_main

ROOT = Path(__file__).resolve().parents[1]
CACHES = ["--cache_latents", "--pre_compute_text_embeddings"]


def run(steps: int, cached: bool, out: Path) -> tuple[float, float]:
    """(wall seconds, final loss) of one training run."""
    argv = [
        f"@{ROOT / 'examples' / 'world_dreambooth.args'}",
        "--instance_data_dir", str(ROOT / "examples" / "subject"),
        "--instance_prompt", "a qwe toy", "--center_crop", "--random_flip",
        "--max_train_steps", str(steps), "--output_dir", str(out), "--overwrite_output_dir",
        "--report_to", "none",
        *(CACHES if cached else []),
    ]  # fmt: skip
    started = time.perf_counter()
    summary = dreambooth_main(argv)
    return time.perf_counter() - started, summary["loss"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "cached_inputs_cpu.json"
    )
    args = parser.parse_args(argv)
    per_step: dict[str, list[float]] = {"plain": [], "cached": []}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name in ("plain", "cached") if rep % 2 == 0 else ("cached", "plain"):
                cached = name == "cached"
                setup, _ = run(1, cached, Path(tmp) / name)
                total, losses[name] = run(args.steps + 1, cached, Path(tmp) / name)
                per_step[name].append((total - setup) / args.steps)
                print(f"  repeat {rep} {name:6s} {per_step[name][-1]:.4f} s/step")
    medians = {name: statistics.median(times) for name, times in per_step.items()}
    report = {
        "benchmark": "bench_cached_inputs",
        "device": platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "per_step_s": per_step,
        "median_per_step_s": medians,
        "cached_over_plain_time": medians["cached"] / medians["plain"],
        "final_loss": losses,
        "versions": versions(),
    }
    print(
        f"plain {medians['plain']:.4f} s/step, cached {medians['cached']:.4f} s/step "
        f"({report['cached_over_plain_time']:.2f}x); final losses {losses}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
