"""The one-command GPU suite, run small on CPU so that it keeps working without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_runs_small_on_cpu_and_writes_its_table(tmp_path: Path):
    out = tmp_path / "suite.json"
    command = [
        str(ROOT / "benchmarks" / "gpu_suite.sh"),
        "--device", "cpu", "--model", "tiny", "--latent", "8", "--batches", "1",
        "--steps", "1", "--compile_backend", "eager", "--oft_block_size", "8",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    variants = {"frozen", "peft_lora", "peft_oft", "peft_hra", "ours"}
    for mode in ("eager", "compiled"):
        assert {r["variant"] for r in report["rows"] if r["mode"] == mode} == variants
    eager = {r["variant"]: r for r in report["rows"] if r["mode"] == "eager"}
    assert all(r["ops"] > 0 and r["median_s"] > 0 for r in eager.values())
    assert eager["ours"]["params"] > 0 and eager["frozen"]["params"] == 0
    summary = {(s["batch"], s["mode"]): s for s in report["summary"]}
    assert {"ours_over_peft_lora_time", "ops_above_floor_over_lora"} <= set(summary[(1, "eager")])
    assert "| batch | mode | variant |" in done.stdout
