"""benchmarks/hra_step_size.py on tiny configurations: the step-size probe's functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import BENCHMARKS, load_benchmark
from diffusers import DDPMScheduler

from hra_diffusion.world.tiny_sd import tiny_unet


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports bench_train_step
    return load_benchmark("hra_step_size")


def spread(rows: list[dict], method: str) -> float:
    """max / min over the widths of a method's first-step ratio."""
    values = [row["first_step"]["all"] for row in rows if row["method"] == method]
    return max(values) / min(values)


def test_scaled_init_moves_a_layer_alike_at_every_width(probe):
    result = probe.single_layer((16, 64, 256), lr=1e-3, steps=2, hra_ranks=(4,))
    rows = result["rows"]
    assert {row["method"] for row in rows} == {"lora", "lora_gaussian", "hra_paper", "hra_scaled"}
    assert all(row[when]["all"] > 0 for row in rows for when in ("first_step", "last_step"))
    # measured: paper ∝ 1/√d (about 4× over 16 → 256), scaled within a few percent
    assert spread(rows, "hra_scaled") < 1.5 < 2.5 < spread(rows, "hra_paper")


def test_unet_setting_reports_every_width(probe):
    unet = tiny_unet(width=16)
    widths = {
        str(module.weight[0].numel())  # in_features, in·kh·kw for conv1
        for name, module in unet.named_modules()
        if name.endswith(("to_q", "conv1"))
    }
    result = probe.unet_setting(unet, DDPMScheduler(), ("to_q", "conv1"), 1, 8, 1e-3, 1, (2,))
    assert [row["label"] for row in result["rows"]] == [
        f"LoRA k={result['lora_rank']}",
        f"LoRA k={result['lora_rank']} gaussian A",
        "HRA paper r=2",
        "HRA scaled r=2",
    ]
    for row in result["rows"]:
        assert row["first_step"]["all"] > 0
        assert set(row["first_step"]["by_width"]) == widths
    assert not any(name.endswith("hra_u") for name, _ in unet.named_parameters())
    assert "| HRA scaled r=2 |" in probe.unet_table(result, "first_step")


def test_main_writes_json_and_tables(probe, tmp_path: Path, capsys):
    out = tmp_path / "probe.json"
    probe.main(["--settings", "single", "--widths", "16", "32", "--steps", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["lr"] == 1e-4 and len(saved["single"]["rows"]) == 2 * 8
    assert "| adapter | d=16 | d=32 |" in capsys.readouterr().out
