"""One DreamBooth-style training step of the SD-1.5 UNet: ours vs PEFT's HRA and LoRA.

A step is forward, MSE loss against random noise, backward and an AdamW step,
with adapters on the four attention projections of every transformer block
(128 linears). The UNet has SD-1.5's architecture with random weights (no download).

Variants, interleaved in the same process over several repeats:

- ``frozen``: no adapter; backward runs to the input latents only. The floor
  any adapter pays.
- ``peft_lora``: PEFT LoRA, r=8.
- ``peft_oft``: PEFT OFT, its defaults (block size 32, Cayley–Neumann), the fastest
  orthogonal method PEFT has.
- ``peft_hra``: PEFT HRA, r=8 (builds a dense d × d H every forward).
- ``ours``: hra_diffusion, r=8.

Reported: median (and fastest) step time, the memory the step saves for backward, the frozen
weights excluded (CPU, from autograd's saved-tensor hooks), or the peak allocated
memory (CUDA), and the
inference time of the base UNet vs ours after ``merge_hra``.

CPU: 16×16 latents (128 px), batch 1 and 2, fp32. CUDA: 64×64 latents (512 px),
batch 1 and 4, bf16 base weights with fp32 adapters under bf16 autocast.

    python benchmarks/bench_train_step.py               # CPU, or CUDA when present
    python benchmarks/bench_train_step.py --repeats 5 --out benchmarks/results/mine.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import HRAConfig as PeftHRAConfig
from peft import LoraConfig, OFTConfig, get_peft_model

import hra_diffusion
from hra_diffusion import HRAConfig, inject_hra, merge_hra, unload_hra

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 8


def sd15_unet(device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """SD-1.5's UNet architecture (cross-attention 768, 8 heads) with random weights."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    return unet.to(device=device, dtype=dtype).requires_grad_(False)


Attach = Callable[[UNet2DConditionModel], tuple[list[torch.nn.Parameter], Callable[[], None]]]


def attach_frozen(unet):
    return [], lambda: None


def attach_ours(unet):
    inject_hra(unet, HRAConfig(r=RANK, target_modules=tuple(TARGETS)))
    params = [p for n, p in unet.named_parameters() if p.requires_grad]
    return params, lambda: unload_hra(unet)


def _attach_peft(config):
    def attach(unet):
        model = get_peft_model(unet, config)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:  # keep adapters in fp32 over a half-precision base
            p.data = p.data.float()
        return params, model.unload

    return attach


VARIANTS: dict[str, Attach] = {
    "frozen": attach_frozen,
    "peft_lora": _attach_peft(
        LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=True)
    ),
    "peft_oft": _attach_peft(OFTConfig(target_modules=TARGETS)),
    "peft_hra": _attach_peft(PeftHRAConfig(r=RANK, target_modules=TARGETS)),
    "ours": attach_ours,
}


def make_batch(batch: int, latent: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(batch, 4, latent, latent, generator=g).to(device),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(batch, 77, 768, generator=g).to(device),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(unet, params, optimizer, inputs, dtype) -> int:
    """One training step; returns the bytes autograd saved for backward, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    sample = inputs["sample"].clone().requires_grad_(not params)  # the frozen floor needs a leaf
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast(sample.device, dtype):
            pred = unet(sample, inputs["timestep"], inputs["encoder_hidden_states"]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), inputs["sample"].float())
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(saved.values())


def measure(unet, attach: Attach, inputs, dtype, steps: int) -> dict[str, list[float]]:
    device = inputs["sample"].device
    params, detach = attach(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    times, saved = [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):  # the first step warms up and is not timed
        sync(device)
        start = time.perf_counter()
        saved = train_step(unet, params, optimizer, inputs, dtype)
        sync(device)
        if i > 0:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    n_params = sum(p.numel() for p in params)
    del optimizer, params
    detach()
    return {"times": times, "saved_bytes": saved, "peak_bytes": peak, "params": n_params}


@torch.no_grad()
def inference_times(unet, inputs, dtype, steps: int) -> dict[str, float]:
    """Median forward time of the base UNet, and of ours after merge_hra."""

    def timed() -> float:
        out = []
        for _ in range(steps + 1):
            sync(inputs["sample"].device)
            start = time.perf_counter()
            with autocast(inputs["sample"].device, dtype):
                unet(**inputs)
            sync(inputs["sample"].device)
            out.append(time.perf_counter() - start)
        return statistics.median(out[1:])

    base = timed()
    inject_hra(unet, HRAConfig(r=RANK, target_modules=tuple(TARGETS)))
    merge_hra(unet)
    merged = timed()
    unload_hra(unet)
    return {"base_s": base, "ours_merged_s": merged, "ratio": merged / base}


def run_shape(unet, batch, latent, dtype, repeats, steps) -> dict:
    device = next(unet.parameters()).device
    inputs = make_batch(batch, latent, device)
    if dtype != torch.float32:
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(dtype)
    collected = {name: {"times": []} for name in VARIANTS}
    names = list(VARIANTS)
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate to interleave
        for name in order:
            result = measure(unet, VARIANTS[name], inputs, dtype, steps)
            print(
                f"  batch {batch} repeat {rep} {name:10s} {statistics.median(result['times']):.3f}s"
            )
            collected[name]["times"] += result["times"]
            collected[name].update({k: v for k, v in result.items() if k != "times"})
    for stats in collected.values():
        stats["median_s"] = statistics.median(stats["times"])
        stats["min_s"] = min(stats["times"])
    ours, lora, peft_hra = (collected[k]["median_s"] for k in ("ours", "peft_lora", "peft_hra"))
    fastest_ours, fastest_lora = (collected[k]["min_s"] for k in ("ours", "peft_lora"))
    summary = {
        "ours_over_peft_lora_time": ours / lora,
        "ours_over_peft_lora_time_min": fastest_ours / fastest_lora,
        "peft_hra_over_ours_time": peft_hra / ours,
    }
    memory_key = "peak_bytes" if device.type == "cuda" else "saved_bytes"
    summary["ours_over_peft_lora_memory"] = (
        collected["ours"][memory_key] / collected["peft_lora"][memory_key]
    )
    summary["inference"] = inference_times(unet, inputs, dtype, steps)
    return {"batch": batch, "latent": latent, "variants": collected, "summary": summary}


def versions() -> dict[str, str]:
    """The versions a result depends on."""
    return {
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "diffusers": __import__("diffusers").__version__,
        "hra_diffusion": hra_diffusion.__version__,
    }


def print_table(results: list[dict], memory_key: str) -> None:
    print(f"\n| batch | variant | median step (s) | {memory_key} (MiB) | trainable params |")
    print("|---|---|---|---|---|")
    for shape in results:
        for name, stats in shape["variants"].items():
            mem = stats[memory_key] / 2**20 if stats[memory_key] is not None else float("nan")
            cells = [shape["batch"], name, f"{stats['median_s']:.3f}", f"{mem:.0f}"]
            print("| " + " | ".join(map(str, cells)) + f" | {stats['params']:,} |")
        s = shape["summary"]
        print(
            f"batch {shape['batch']}: ours/LoRA time {s['ours_over_peft_lora_time']:.3f} "
            f"(fastest steps: {s['ours_over_peft_lora_time_min']:.3f}), "
            f"PEFT-HRA/ours time {s['peft_hra_over_ours_time']:.2f}, "
            f"ours/LoRA memory {s['ours_over_peft_lora_memory']:.3f}, "
            f"merged inference / base {s['inference']['ratio']:.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per variant")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per repeat (after 1 warm-up)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: benchmarks/results/train_step_<device>.json)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    latent, batches = (64, (1, 4)) if on_gpu else (16, (1, 2))
    unet = sd15_unet(device, dtype)
    results = [run_shape(unet, b, latent, dtype, args.repeats, args.steps) for b in batches]

    memory_key = "peak_bytes" if on_gpu else "saved_bytes"
    print_table(results, memory_key)
    report = {
        "benchmark": "bench_train_step",
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "resolution_px": latent * 8,
        "rank": RANK,
        "targets": TARGETS,
        "versions": versions(),
        "results": results,
    }
    out = args.out or Path(__file__).parent / "results" / f"train_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
