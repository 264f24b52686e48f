"""Start-up time: ``import hra_diffusion`` and every command line's ``--help``.

Each measurement is a fresh ``python`` process (the import cache of a process would hide
the cost), timed from start to exit. The reference is ``import torch, diffusers`` in the
same run, so the ratios hold on a busy machine too:

    ratio = median(wall time of the command) / median(wall time of "import torch, diffusers")

The commands are interleaved over ``--repeats`` rounds, so a burst of load elsewhere
falls on all of them alike. The command lines are every module of ``hra_diffusion.train``,
``hra_diffusion.pipelines`` and ``hra_diffusion.eval`` that runs as a script (it has an
``if __name__ == "__main__":`` block), found by reading the package, not from a list.
The target (issue: start-up) is a ratio of at most 1.5 for each.

    python benchmarks/bench_startup.py           # writes benchmarks/results/startup_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hra_diffusion.eval
import hra_diffusion.pipelines
import hra_diffusion.train

TARGET_RATIO = 1.5
"""The most a command may take, as a multiple of ``import torch, diffusers``."""

REFERENCE = "import torch, diffusers"

SCRIPT_PACKAGES = (hra_diffusion.train, hra_diffusion.pipelines, hra_diffusion.eval)


def script_modules() -> list[str]:
    """Dotted names of the package modules that run as scripts."""
    names = []
    for package in SCRIPT_PACKAGES:
        for path in sorted(Path(package.__path__[0]).glob("*.py")):
            if 'if __name__ == "__main__":' in path.read_text():
                names.append(f"{package.__name__}.{path.stem}")
    return names


def commands() -> dict[str, list[str]]:
    """Label -> argv of every timed process."""
    python = sys.executable
    timed = {
        REFERENCE: [python, "-c", REFERENCE],
        "import hra_diffusion": [python, "-c", "import hra_diffusion"],
    }
    for module in script_modules():
        timed[f"{module} --help"] = [python, "-m", module, "--help"]
    return timed


def wall_time(argv: list[str]) -> float:
    """Seconds one process takes from start to exit; a failing command is an error."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=Path.home())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv[1:])} exited {done.returncode}: {done.stderr}")
    return seconds


def measure(timed: dict[str, list[str]], repeats: int) -> dict[str, list[float]]:
    """Every command once per round, ``repeats`` rounds."""
    times: dict[str, list[float]] = {label: [] for label in timed}
    for round_ in range(repeats):
        for label, argv in timed.items():
            times[label].append(wall_time(argv))
        print(f"round {round_ + 1}/{repeats} done", flush=True)
    return times


def summarise(times: dict[str, list[float]]) -> list[dict[str, object]]:
    """Median seconds and ratio to the reference, per command."""
    reference = statistics.median(times[REFERENCE])
    rows = []
    for label, values in times.items():
        median = statistics.median(values)
        rows.append(
            {
                "command": label,
                "median_s": round(median, 3),
                "ratio": round(median / reference, 3),
                "within_target": median / reference <= TARGET_RATIO,
                "seconds": [round(v, 3) for v in values],
            }
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="Rounds. Default: 5.")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "startup_cpu.json",
        help="Result JSON. Default: benchmarks/results/startup_cpu.json.",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1.")
    rows = summarise(measure(commands(), args.repeats))
    print(f"\n| command | median (s) | ratio to `{REFERENCE}` |\n|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.2f} | {row['ratio']:.2f} |")
    report = {
        "reference": REFERENCE,
        "target_ratio": TARGET_RATIO,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
