"""The GPU training-step suite: ours vs PEFT LoRA, OFT and HRA, eager and compiled.

One training step (forward, MSE loss, backward, AdamW step) of the SD-1.5 UNet
architecture (random weights from its config, no download) at 512 px, with adapters on
the 128 attention projections, r = 8 (OFT: PEFT's defaults), bf16 base weights with fp32
adapters under bf16 autocast, batch 1 and 4, eager and ``torch.compile``-d. Reported per
(batch, mode, variant): median and fastest step time, ``torch.cuda.max_memory_allocated``,
and the aten ops one eager step dispatches (views excluded; see ``bench_op_count.py``).
Written to ``benchmarks/results/train_step_cuda.json``; run it with
``benchmarks/gpu_suite.sh``.

On a machine without a GPU the same code runs small (``--device cpu --model tiny``), which
is how the test suite keeps it working.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_op_count import OpCounter
from bench_train_step import RANK, TARGETS, VARIANTS, _attach_peft, sd15_unet, versions
from peft import OFTConfig

from hra_diffusion.tiny_sd import tiny_unet

MODES = ("eager", "compiled")


def build_unet(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if name == "sd15":
        return sd15_unet(device, dtype)
    torch.manual_seed(0)
    return tiny_unet(width=32).to(device=device, dtype=dtype).requires_grad_(False)


def make_inputs(unet, batch: int, latent: int, device, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text_dim = unet.config.cross_attention_dim
    return {
        "sample": torch.randn(batch, unet.config.in_channels, latent, latent, generator=g).to(
            device
        ),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(batch, 77, text_dim, generator=g).to(device, dtype),
    }


def step(unet, optimizer, inputs, frozen: bool) -> None:
    sample = inputs["sample"].clone().requires_grad_(frozen)  # the floor needs a leaf
    device = sample.device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        pred = unet(sample, inputs["timestep"], inputs["encoder_hidden_states"]).sample
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
    """Ratios against ours for each (batch, mode): time, memory, ops above the floor."""
    table = {(r["batch"], r["mode"], r["variant"]): r for r in rows}
    out = []
    for batch, mode in sorted({(r["batch"], r["mode"]) for r in rows}):
        ours = table.get((batch, mode, "ours"))
        if ours is None:
            continue
        entry = {"batch": batch, "mode": mode}
        for other in ("peft_lora", "peft_oft", "peft_hra"):
            ref = table.get((batch, mode, other))
            if ref is None:
                continue
            entry[f"ours_over_{other}_time"] = ours["median_s"] / ref["median_s"]
            if ours["peak_bytes"] and ref["peak_bytes"]:
                entry[f"ours_over_{other}_memory"] = ours["peak_bytes"] / ref["peak_bytes"]
        floor = table.get((batch, "eager", "frozen"))
        lora = table.get((batch, "eager", "peft_lora"))
        if mode == "eager" and floor and lora:
            entry["ops_above_floor_over_lora"] = (ours["ops"] - floor["ops"]) / (
                lora["ops"] - floor["ops"]
            )
        out.append(entry)
    return out


def print_table(rows: list[dict], summary: list[dict]) -> None:
    print("\n| batch | mode | variant | median step (ms) | peak memory (MiB) | ops / step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "–"
        cells = [r["batch"], r["mode"], r["variant"], f"{1e3 * r['median_s']:.1f}", peak]
        print("| " + " | ".join(map(str, cells + [r.get("ops", "–")])) + " |")
    for entry in summary:
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in entry.items() if k not in ("batch", "mode"))
        print(f"batch {entry['batch']} {entry['mode']}: {ratios}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--model", default="sd15", choices=["sd15", "tiny"], help="tiny: the CPU test size"
    )
    parser.add_argument("--latent", type=int, default=64, help="latent side; 64 = 512 px")
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
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(1, "error: no CUDA device here; run with --device cpu --model tiny.\n")

    unet = build_unet(args.model, device, torch.bfloat16)
    attachers = dict(VARIANTS)
    attachers["peft_oft"] = _attach_peft(
        OFTConfig(target_modules=TARGETS, oft_block_size=args.oft_block_size)
    )
    rows = []
    for batch in args.batches:
        inputs = make_inputs(unet, batch, args.latent, device, torch.bfloat16)
        for mode in args.modes:
            for name in args.variants:
                result = run_variant(unet, attachers[name], inputs, mode, args)
                rows.append({"batch": batch, "mode": mode, "variant": name, **result})
                print(f"  batch {batch} {mode:8s} {name:10s} {result['median_s']:.4f}s")
    summary = summarise(rows)
    print_table(rows, summary)
    report = {
        "benchmark": "bench_gpu_suite",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "model": args.model,
        "resolution_px": args.latent * 8,
        "dtype": "bf16 base, fp32 adapters, bf16 autocast",
        "rank": RANK,
        "targets": TARGETS,
        "compile_backend": args.compile_backend,
        "versions": versions(),
        "rows": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
