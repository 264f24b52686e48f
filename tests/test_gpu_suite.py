"""The one-command GPU suite, run small on CPU so that it keeps working without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_runs_small_on_cpu_and_writes_its_table(tmp_path: Path):
    """The tiny SDXL UNet stands in for SDXL-base (added conditions included), in both modes
    and every variant. The SD-1.5 path is the same code without added conditions; its
    architecture and inputs are checked on the meta device below."""
    out = tmp_path / "suite.json"
    command = [
        str(ROOT / "benchmarks" / "gpu_suite.sh"),
        "--device", "cpu", "--model", "tiny_sdxl", "--latent", "8", "--batches", "1",
        "--steps", "1", "--compile_backend", "eager", "--oft_block_size", "8",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["models"] == ["tiny_sdxl"]
    variants = {"frozen", "peft_lora", "peft_oft", "peft_hra", "ours"}
    rows = report["rows"]
    for mode in ("eager", "compiled"):
        assert {r["variant"] for r in rows if r["mode"] == mode} == variants
    eager = {r["variant"]: r for r in rows if r["mode"] == "eager"}
    assert all(r["ops"] > 0 and r["median_s"] > 0 for r in eager.values())
    assert eager["ours"]["params"] > 0 and eager["frozen"]["params"] == 0
    # 4 projections of attn1 and attn2: 8 per transformer block; tiny_sdxl has 8 blocks
    assert {r["adapted_layers"] for r in rows} == {64}
    summary = {(s["model"], s["batch"], s["mode"]): s for s in report["summary"]}
    assert {"ours_over_peft_lora_time", "ops_above_floor_over_lora"} <= set(
        summary[("tiny_sdxl", 1, "eager")]
    )
    assert "| model | px | batch | mode | variant |" in done.stdout


def test_gpu_suite_defaults_to_sd15_at_512_and_sdxl_at_1024_px():
    """What the suite runs on a GPU: the published architectures at their native sizes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu_suite
        import bench_train_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    defaults = bench_gpu_suite.build_parser().parse_args([])
    assert defaults.model == ["sd15", "sdxl"] and defaults.latent is None
    assert {m: 8 * bench_gpu_suite.NATIVE_LATENT[m] for m in defaults.model} == {
        "sd15": 512,
        "sdxl": 1024,
    }
    sd15 = bench_train_step.build_unet("sd15", torch.device("meta"), torch.bfloat16)
    assert len(bench_train_step.adapted_layers(sd15)) == 128
    inputs = bench_train_step.make_batch(sd15, 2, 64, torch.device("meta"), torch.bfloat16)
    assert inputs["sample"].shape == (2, 4, 64, 64)
    assert inputs["encoder_hidden_states"].shape == (2, 77, 768)
    assert "added_cond_kwargs" not in inputs
    unet = bench_train_step.build_unet("sdxl", torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL-base's UNet
    assert len(bench_train_step.adapted_layers(unet)) == 560
    inputs = bench_train_step.make_batch(unet, 2, 128, torch.device("meta"), torch.bfloat16)
    assert inputs["sample"].shape == (2, 4, 128, 128)
    assert inputs["encoder_hidden_states"].shape == (2, 77, 2048)
    added = inputs["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 1280) and added["time_ids"].shape == (2, 6)
