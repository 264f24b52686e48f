"""The GPU training-step suite: ours vs PEFT LoRA, OFT and HRA, eager and compiled.

One training step (forward, MSE loss, backward, AdamW step) of the SD-1.5 UNet
architecture at 512 px (64×64 latents, 128 attention projections adapted) and of the
SDXL-base UNet architecture at 1024 px (128×128 latents, 560 projections; pooled text
embedding and time ids as added conditions), random weights from their configs (no
download), r = 8 (OFT: PEFT's defaults), bf16 base weights with fp32 adapters under bf16
autocast, batch 1 and 4, eager and ``torch.compile``-d. Reported per (model, batch, mode,
variant): median and fastest step time, ``torch.cuda.max_memory_allocated``, and the aten
ops one eager step dispatches (views excluded; see ``bench_op_count.py``).
Written to ``benchmarks/results/train_step_cuda.json``; run it with
``benchmarks/gpu_suite.sh``.

On a machine without a GPU the same code runs small (``--device cpu --model tiny
tiny_sdxl``: the tiny SD and SDXL UNets), which is how the test suite keeps it working.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_op_count import OpCounter
from bench_train_step import (
    ARCHITECTURES,
    RANK,
    TARGETS,
    VARIANTS,
    _attach_peft,
    adapted_layers,
    build_unet,
    forward,
    make_batch,
    versions,
    write_report,
)
from peft import OFTConfig

from hra_diffusion.world.tiny_sd import tiny_unet
from hra_diffusion.world.tiny_sdxl import tiny_sdxl_unet

MODES = ("eager", "compiled")
TINY_UNETS = {"tiny": tiny_unet, "tiny_sdxl": tiny_sdxl_unet}
"""The CPU test sizes: the tiny SD and SDXL UNets (width 32)."""

NATIVE_LATENT = {"sd15": 64, "sdxl": 128, "tiny": 8, "tiny_sdxl": 8}
"""Each model's latent side without --latent: 512 px for SD-1.5, 1024 px for SDXL."""


def suite_unet(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """An :data:`ARCHITECTURES` UNet or a tiny one, random weights (seed 0), frozen."""
    if name in ARCHITECTURES:
        return build_unet(name, device, dtype)
    torch.manual_seed(0)
    return TINY_UNETS[name](width=32).to(device=device, dtype=dtype).requires_grad_(False)


def step(unet, optimizer, inputs, frozen: bool) -> None:
    sample = inputs["sample"].clone().requires_grad_(frozen)  # the floor needs a leaf
    device = sample.device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        pred = forward(unet, sample, inputs)
    loss = torch.nn.functional.mse_loss(pred.float(), inputs["sample"].float())
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(unet, attach, inputs, mode: str, args) -> dict:
    device = inputs["sample"].device
    params, detach = attach(unet)
    frozen = not params
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True) if params else None
    result: dict = {"params": sum(p.numel() for p in params)}
    if mode == "eager":
        step(unet, optimizer, inputs, frozen)  # warm-up
        with OpCounter() as counter:
            step(unet, optimizer, inputs, frozen)
        result["ops"] = sum(counter.counts.values())
    else:
        torch._dynamo.reset()
        unet.compile(backend=args.compile_backend)
        started = time.perf_counter()
        step(unet, optimizer, inputs, frozen)  # compiles forward and backward
        sync(device)
        result["compile_s"] = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync(device)
        started = time.perf_counter()
        step(unet, optimizer, inputs, frozen)
        sync(device)
        times.append(time.perf_counter() - started)
    result.update(median_s=statistics.median(times), min_s=min(times), times=times)
    result["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    if mode == "compiled":
        unet._compiled_call_impl = None  # back to eager
        torch._dynamo.reset()
    del optimizer, params
    detach()
    return result


def summarise(rows: list[dict]) -> list[dict]:
    """Ratios against ours for each (model, batch, mode): time, memory, ops above the floor."""
    table = {(r["model"], r["batch"], r["mode"], r["variant"]): r for r in rows}
    out = []
    keys = dict.fromkeys((r["model"], r["batch"], r["mode"]) for r in rows)  # in run order
    for model, batch, mode in keys:
        ours = table.get((model, batch, mode, "ours"))
        if ours is None:
            continue
        entry = {"model": model, "batch": batch, "mode": mode}
        for other in ("peft_lora", "peft_oft", "peft_hra"):
            ref = table.get((model, batch, mode, other))
            if ref is None:
                continue
            entry[f"ours_over_{other}_time"] = ours["median_s"] / ref["median_s"]
            if ours["peak_bytes"] and ref["peak_bytes"]:
                entry[f"ours_over_{other}_memory"] = ours["peak_bytes"] / ref["peak_bytes"]
        floor = table.get((model, batch, "eager", "frozen"))
        lora = table.get((model, batch, "eager", "peft_lora"))
        if mode == "eager" and floor and lora:
            entry["ops_above_floor_over_lora"] = (ours["ops"] - floor["ops"]) / (
                lora["ops"] - floor["ops"]
            )
        out.append(entry)
    return out


def print_table(rows: list[dict], summary: list[dict]) -> None:
    print(
        "\n| model | px | batch | mode | variant | median step (ms) | peak memory (MiB) "
        "| ops / step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "–"
        cells = [r["model"], 8 * r["latent"], r["batch"], r["mode"], r["variant"]]
        cells += [f"{1e3 * r['median_s']:.1f}", peak, r.get("ops", "–")]
        print("| " + " | ".join(map(str, cells)) + " |")
    labels = ("model", "batch", "mode")
    for entry in summary:
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k not in labels)
        print(f"{entry['model']} batch {entry['batch']} {entry['mode']}: {ratios}")


def build_parser() -> argparse.ArgumentParser:
    """The suite's options; the defaults are the GPU run."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--model",
        nargs="+",
        default=list(ARCHITECTURES),
        choices=[*ARCHITECTURES, *TINY_UNETS],
        help="UNets, in order (default: sd15 sdxl); tiny, tiny_sdxl: the CPU test sizes",
    )
    parser.add_argument(
        "--latent",
        type=int,
        default=None,
        help="latent side for every model (default: each one's own, sd15 64 = 512 px, "
        "sdxl 128 = 1024 px, tiny 8)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    parser.add_argument("--oft_block_size", type=int, default=32, help="PEFT OFT's block size")
    parser.add_argument(
        "--compile_backend", default="inductor", help="torch.compile backend (default inductor)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "train_step_cuda.json"
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(
            1, "error: no CUDA device here; run with --device cpu --model tiny tiny_sdxl.\n"
        )

    attachers = dict(VARIANTS)
    attachers["peft_oft"] = _attach_peft(
        OFTConfig(target_modules=TARGETS, oft_block_size=args.oft_block_size)
    )
    rows = []
    for model in args.model:
        unet = suite_unet(model, device, torch.bfloat16)
        latent = args.latent or NATIVE_LATENT[model]
        layers = len(adapted_layers(unet))
        for batch in args.batches:
            inputs = make_batch(unet, batch, latent, device, torch.bfloat16)
            for mode in args.modes:
                for name in args.variants:
                    result = run_variant(unet, attachers[name], inputs, mode, args)
                    row = {"model": model, "latent": latent, "adapted_layers": layers}
                    rows.append({**row, "batch": batch, "mode": mode, "variant": name, **result})
                    print(f"  {model} batch {batch} {mode:8s} {name:10s} {result['median_s']:.4f}s")
        del unet, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = summarise(rows)
    print_table(rows, summary)
    report = {
        "benchmark": "bench_gpu_suite",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "models": args.model,
        "dtype": "bf16 base, fp32 adapters, bf16 autocast",
        "rank": RANK,
        "targets": TARGETS,
        "compile_backend": args.compile_backend,
        "versions": versions(),
        "rows": rows,
        "summary": summary,
    }
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
