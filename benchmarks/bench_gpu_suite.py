"""The GPU training-step suite: ours vs PEFT LoRA, OFT and HRA, eager and compiled.

One training step (forward, MSE loss, backward, AdamW step) of the SD-1.5 UNet
architecture at 512 px (64×64 latents, 128 attention projections adapted), of the
SDXL-base UNet architecture at 1024 px (128×128 latents, 560 projections; pooled text
embedding and time ids as added conditions), and of the SD3-medium and FLUX.1 [dev]
transformer architectures at 1024 px (their configs and inputs: ``bench_op_count.py
--arch sd3|flux``; diffusers' DreamBooth-LoRA targets, ``SD3_TARGETS`` and
``FLUX_TARGETS``), random weights from their configs (no download), r = 8 (OFT: PEFT's
defaults), bf16 base weights with fp32 adapters under bf16 autocast, batch 1 and 4, eager
and ``torch.compile``-d. Reported per (model, batch, mode, variant): median and fastest
step time, ``torch.cuda.max_memory_allocated``, and the aten ops one eager step dispatches
(views excluded; see ``bench_op_count.py``).
Written to ``benchmarks/results/train_step_cuda.json``; run it with
``benchmarks/gpu_suite.sh``. The SD3 and FLUX.1 rows run when a GPU is lent; none has been,
so they have no numbers yet.

On a machine without a GPU the same code runs small (``--device cpu --model tiny
tiny_sdxl tiny_sd3 tiny_flux``: the tiny SD and SDXL UNets and the tiny SD3 and FLUX.1
transformers), which is how the test suite keeps it working.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_op_count import (
    TRANSFORMER_TARGETS,
    TRANSFORMERS,
    OpCounter,
    build_transformer,
    count_adapted,
    transformer_forward,
    transformer_inputs,
)
from bench_train_step import (
    ARCHITECTURES,
    RANK,
    TARGETS,
    VARIANTS,
    Attach,
    _attach_peft,
    attach_frozen,
    build_unet,
    forward,
    make_batch,
    versions,
    write_report,
)
from peft import HRAConfig as PeftHRAConfig
from peft import LoraConfig, OFTConfig

from hra_diffusion import HRAConfig, inject_hra, unload_hra
from hra_diffusion.world.tiny_sd import tiny_unet
from hra_diffusion.world.tiny_sdxl import tiny_sdxl_unet
from hra_diffusion.world.tiny_transformers import tiny_flux_transformer, tiny_sd3_transformer

MODES = ("eager", "compiled")
TINY_UNETS = {"tiny": tiny_unet, "tiny_sdxl": tiny_sdxl_unet}
"""The CPU test sizes: the tiny SD and SDXL UNets (width 32)."""

TINY_TRANSFORMERS = {"tiny_sd3": tiny_sd3_transformer, "tiny_flux": tiny_flux_transformer}
"""The CPU test sizes of the transformers: one MMDiT block; one double and one single block."""

FAMILY = {"sd3": "sd3", "flux": "flux", "tiny_sd3": "sd3", "tiny_flux": "flux"}
"""The transformer family of each transformer model: its inputs and targets."""

MODELS = [*ARCHITECTURES, *TRANSFORMERS, *TINY_UNETS, *TINY_TRANSFORMERS]

NATIVE_LATENT = {"sd15": 64, "sdxl": 128, "sd3": 128, "flux": 128}
"""Each model's latent side without --latent: 512 px for SD-1.5, 1024 px for the others
(FLUX.1 packs 2×2 latents into one token: 4096 tokens); 8 for the tiny ones."""


def suite_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The named UNet or transformer or a tiny one, random weights (seed 0), frozen."""
    if name in ARCHITECTURES:
        return build_unet(name, device, dtype)
    if name in TRANSFORMERS:
        return build_transformer(name, device=device, dtype=dtype)
    torch.manual_seed(0)
    model = TINY_UNETS[name](width=32) if name in TINY_UNETS else TINY_TRANSFORMERS[name]()
    return model.to(device=device, dtype=dtype).requires_grad_(False)


def suite_inputs(model, name: str, batch: int, latent: int, device: torch.device) -> dict:
    """Random bf16 inputs (and the model's forward) for ``batch`` squares of side ``latent``."""
    if name in FAMILY:
        inputs = transformer_inputs(model, FAMILY[name], batch, latent, device, torch.bfloat16)
        return {**inputs, "run": transformer_forward}
    return {**make_batch(model, batch, latent, device, torch.bfloat16), "run": forward}


def attachers(targets: list[str], oft_block_size: int) -> dict[str, Attach]:
    """The variants on ``targets``: frozen, PEFT LoRA, OFT and HRA (fp32 adapters), ours."""

    def ours(model):
        inject_hra(model, HRAConfig(r=RANK, target_modules=tuple(targets)))
        return [p for p in model.parameters() if p.requires_grad], lambda: unload_hra(model)

    return {
        "frozen": attach_frozen,
        "peft_lora": _attach_peft(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets)),
        "peft_oft": _attach_peft(OFTConfig(target_modules=targets, oft_block_size=oft_block_size)),
        "peft_hra": _attach_peft(PeftHRAConfig(r=RANK, target_modules=targets)),
        "ours": ours,
    }


def step(unet, optimizer, inputs, frozen: bool) -> None:
    sample = inputs["sample"].clone().requires_grad_(frozen)  # the floor needs a leaf
    device = sample.device.type
    with torch.autocast(device, dtype=torch.bfloat16):
        pred = inputs["run"](unet, sample, inputs)
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
        default=[*ARCHITECTURES, *TRANSFORMERS],
        choices=MODELS,
        help="models, in order (default: sd15 sdxl sd3 flux); tiny, tiny_sdxl, tiny_sd3, "
        "tiny_flux: the CPU test sizes",
    )
    parser.add_argument(
        "--latent",
        type=int,
        default=None,
        help="latent side for every model (default: each one's own, sd15 64 = 512 px, "
        "sdxl, sd3 and flux 128 = 1024 px, the tiny ones 8)",
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
            1,
            "error: no CUDA device here; run with --device cpu --model tiny tiny_sdxl "
            "tiny_sd3 tiny_flux.\n",
        )

    rows = []
    for model in args.model:
        unet = suite_model(model, device, torch.bfloat16)
        latent = args.latent or NATIVE_LATENT.get(model, 8)
        targets = TRANSFORMER_TARGETS[FAMILY[model]] if model in FAMILY else TARGETS
        variants = attachers(targets, args.oft_block_size)
        layers = count_adapted(unet, targets)
        for batch in args.batches:
            inputs = suite_inputs(unet, model, batch, latent, device)
            for mode in args.modes:
                for name in args.variants:
                    result = run_variant(unet, variants[name], inputs, mode, args)
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
