"""bench_op_count.py --arch sd3/flux: a quick run of one block of each kind at the real
widths, on meta, writes the report with ours, PEFT LoRA and PEFT HRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_one_block_run_counts_every_variant(arch: str, tmp_path: Path):
    bench = load_benchmark("bench_op_count")
    out = tmp_path / "report.json"
    report = bench.main(["--arch", arch, "--blocks", "1", "--out", str(out)])
    assert json.loads(out.read_text())["arch"] == arch
    results, summary = report["results"], report["summary"]
    assert set(results) == {"frozen", "peft_lora", "peft_hra", "ours"}
    assert (
        report["adapted_layers"] == {"sd3": 7, "flux": 15}[arch]
    )  # SD3: a last block has no to_add_out
    for name in ("peft_lora", "peft_hra", "ours"):
        assert results[name]["ops_above_floor"] > 0 and results[name]["saved_bytes_above_floor"] > 0
    # ours costs about what LoRA costs; PEFT's HRA builds dense d × d reflections
    assert summary["ours"]["flops_over_lora"]["native_1024px"] < 1.01
    assert summary["peft_hra"]["flops_over_lora"]["native_1024px"] > 1.2
    assert (
        summary["ours"]["ops_above_floor_over_lora"]
        < summary["peft_hra"]["ops_above_floor_over_lora"]
    )
