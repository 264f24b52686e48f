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
    """The tiny SDXL UNet stands in for SDXL-base (added conditions included) and the tiny
    SD3 and FLUX.1 transformers for SD3-medium and FLUX.1 [dev], in both modes and every
    variant. The SD-1.5 path is the same code without added conditions; the architectures
    and inputs of the real models are checked on the meta device below."""
    out = tmp_path / "suite.json"
    models = ["tiny_sdxl", "tiny_sd3", "tiny_flux"]
    command = [
        str(ROOT / "benchmarks" / "gpu_suite.sh"),
        "--device", "cpu", "--model", *models, "--latent", "8", "--batches", "1",
        "--steps", "1", "--compile_backend", "eager", "--oft_block_size", "8",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["models"] == models
    variants = {"frozen", "peft_lora", "peft_oft", "peft_hra", "ours"}
    # tiny_sdxl: attn1 and attn2's 4 projections in 8 blocks; tiny_sd3: one MMDiT block, the
    # last (no to_add_out); tiny_flux: 8 projections and 4 feed-forward linears in the double
    # block, to_q/k/v in the single one
    layers = {"tiny_sdxl": 64, "tiny_sd3": 7, "tiny_flux": 15}
    summary = {(s["model"], s["batch"], s["mode"]): s for s in report["summary"]}
    for model in models:
        rows = [r for r in report["rows"] if r["model"] == model]
        for mode in ("eager", "compiled"):
            assert {r["variant"] for r in rows if r["mode"] == mode} == variants
        eager = {r["variant"]: r for r in rows if r["mode"] == "eager"}
        assert all(r["ops"] > 0 and r["median_s"] > 0 for r in eager.values())
        assert eager["ours"]["params"] > 0 and eager["frozen"]["params"] == 0
        assert {r["adapted_layers"] for r in rows} == {layers[model]}
        assert {"ours_over_peft_lora_time", "ops_above_floor_over_lora"} <= set(
            summary[(model, 1, "eager")]
        )
    assert "| model | px | batch | mode | variant |" in done.stdout


def test_gpu_suite_defaults_to_sd15_at_512_and_sdxl_sd3_flux_at_1024_px():
    """What the suite runs on a GPU: the published architectures at their native sizes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu_suite
        import bench_train_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    defaults = bench_gpu_suite.build_parser().parse_args([])
    assert defaults.model == ["sd15", "sdxl", "sd3", "flux"] and defaults.latent is None
    assert {m: 8 * bench_gpu_suite.NATIVE_LATENT[m] for m in defaults.model} == {
        "sd15": 512,
        "sdxl": 1024,
        "sd3": 1024,
        "flux": 1024,
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
    meta = torch.device("meta")
    # SD3-medium: 24 MMDiT blocks of 8 projections, the last without to_add_out; 4096 image
    # tokens (128×128 latents in 2×2 patches) + 333 text tokens
    sd3 = bench_gpu_suite.suite_model("sd3", meta, torch.bfloat16)
    targets = bench_gpu_suite.TRANSFORMER_TARGETS["sd3"]
    assert bench_gpu_suite.count_adapted(sd3, targets) == 24 * 8 - 1
    inputs = bench_gpu_suite.suite_inputs(sd3, "sd3", 2, 128, meta)
    assert inputs["sample"].shape == (2, 16, 128, 128) and inputs["sample"].dtype == torch.bfloat16
    assert inputs["kwargs"]["encoder_hidden_states"].shape == (2, 333, 4096)
    # FLUX.1 [dev]: 19 double blocks of 12 linears, 38 single blocks of 3; 4096 packed
    # image tokens + 512 text tokens
    flux = bench_gpu_suite.suite_model("flux", meta, torch.bfloat16)
    assert (
        bench_gpu_suite.count_adapted(flux, bench_gpu_suite.TRANSFORMER_TARGETS["flux"])
        == 19 * 12 + 38 * 3
    )
    inputs = bench_gpu_suite.suite_inputs(flux, "flux", 2, 128, meta)
    assert inputs["sample"].shape == (2, 4096, 64)
    assert inputs["kwargs"]["encoder_hidden_states"].shape == (2, 512, 4096)
    assert inputs["kwargs"]["img_ids"].shape == (4096, 3)
