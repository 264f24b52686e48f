"""One DreamBooth-style training step of the SD-1.5 or SDXL UNet: ours vs PEFT's HRA and LoRA.

A step is forward, MSE loss against random noise, backward and an AdamW step,
with adapters on the four attention projections of every transformer block
(SD-1.5: 128 linears; SDXL: 560). The UNet has SD-1.5's architecture (``--arch sd15``)
or SDXL-base's (``--arch sdxl``: its published config, with the pooled text embedding
and time ids as added conditions) with random weights (no download).

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
batch 1 and 4, bf16 base weights with fp32 adapters under bf16 autocast. ``--latent``
and ``--batches`` change them. A variant whose memory cannot fit is skipped and recorded
as such: PEFT HRA keeps r dense d × d products per layer for backward
(:func:`dense_h_bytes`; 36 GiB in fp32 on SDXL), more than a 24 GiB CPU machine has.

    python benchmarks/bench_train_step.py               # CPU, or CUDA when present
    python benchmarks/bench_train_step.py --repeats 5 --out benchmarks/results/mine.json
    python benchmarks/bench_train_step.py --arch sdxl --latent 8 --batches 1
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


SD15_UNET_CONFIG = {"cross_attention_dim": 768, "attention_head_dim": 8}
"""SD-1.5's UNet: diffusers' defaults with cross-attention 768 and 8 heads."""

SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
"""The UNet of stabilityai/stable-diffusion-xl-base-1.0 (its ``unet/config.json``, the
entries that differ from diffusers' defaults): 2,567,463,684 parameters."""

ARCHITECTURES = {"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}


def build_unet(arch: str, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """The ``arch`` UNet (:data:`ARCHITECTURES`) with random weights (seed 0), frozen.
    On the ``meta`` device no weights are drawn."""
    torch.manual_seed(0)
    with torch.device(device) if device.type == "meta" else contextlib.nullcontext():
        unet = UNet2DConditionModel.from_config(ARCHITECTURES[arch])
    return unet.to(device=device, dtype=dtype).requires_grad_(False)


def adapted_layers(unet: UNet2DConditionModel) -> list[torch.nn.Linear]:
    """The linears the variants adapt (:data:`TARGETS`)."""
    return [
        module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS)
    ]


def dense_h_bytes(unet: UNet2DConditionModel) -> int:
    """A lower bound of what PEFT HRA saves for backward beyond the other variants: its
    forward multiplies r dense d × d fp32 matrices per adapted layer and keeps each."""
    return sum(RANK * layer.in_features**2 * 4 for layer in adapted_layers(unet))


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


def make_batch(
    unet: UNet2DConditionModel,
    batch: int,
    latent: int,
    device: torch.device,
    text_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """Random UNet inputs: latents (B, 4, latent, latent), timesteps (B,), text (B, 77, D)
    in ``text_dtype`` and, for an SDXL UNet, ``added_cond_kwargs`` with the pooled text
    embedding (B, P) and the six time ids (B, 6) of a ``8·latent`` px square."""
    g = torch.Generator().manual_seed(0)
    config = unet.config
    inputs = {
        "sample": torch.randn(batch, config.in_channels, latent, latent, generator=g).to(device),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=g).to(
            device, text_dtype
        ),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        size = 8 * latent
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device, text_dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch).to(device),
        }
    return inputs


def forward(unet: UNet2DConditionModel, sample: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The UNet's prediction for ``sample`` with the other inputs of :func:`make_batch`."""
    return unet(
        sample,
        inputs["timestep"],
        inputs["encoder_hidden_states"],
        added_cond_kwargs=inputs.get("added_cond_kwargs"),
    ).sample


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
            pred = forward(unet, sample, inputs)
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
    times, cpu_times, saved = [], [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):  # the first step warms up and is not timed
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        saved = train_step(unet, params, optimizer, inputs, dtype)
        sync(device)
        if i > 0:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    n_params = sum(p.numel() for p in params)
    del optimizer, params
    detach()
    return {
        "times": times,
        "cpu_times": cpu_times,  # the process's CPU time: steadier than wall time on a busy host
        "saved_bytes": saved,
        "peak_bytes": peak,
        "params": n_params,
    }


@torch.no_grad()
def inference_times(unet, inputs, dtype, steps: int) -> dict[str, float]:
    """Median forward time of the base UNet, and of ours after merge_hra."""

    def timed() -> float:
        out = []
        for _ in range(steps + 1):
            sync(inputs["sample"].device)
            start = time.perf_counter()
            with autocast(inputs["sample"].device, dtype):
                forward(unet, inputs["sample"], inputs)
            sync(inputs["sample"].device)
            out.append(time.perf_counter() - start)
        return statistics.median(out[1:])

    base = timed()
    inject_hra(unet, HRAConfig(r=RANK, target_modules=tuple(TARGETS)))
    merge_hra(unet)
    merged = timed()
    unload_hra(unet)
    return {"base_s": base, "ours_merged_s": merged, "ratio": merged / base}


def run_shape(unet, batch, latent, dtype, repeats, steps, names: list[str]) -> dict:
    """Every variant of ``names`` at one (batch, latent), interleaved over ``repeats``."""
    device = next(unet.parameters()).device
    inputs = make_batch(unet, batch, latent, device, dtype)
    collected = {name: {"times": [], "cpu_times": []} for name in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate to interleave
        for name in order:
            result = measure(unet, VARIANTS[name], inputs, dtype, steps)
            print(
                f"  batch {batch} repeat {rep} {name:10s} {statistics.median(result['times']):.3f}s"
            )
            collected[name]["times"] += result["times"]
            collected[name]["cpu_times"] += result["cpu_times"]
            collected[name].update(
                {k: v for k, v in result.items() if k not in ("times", "cpu_times")}
            )
    for stats in collected.values():
        stats["median_s"] = statistics.median(stats["times"])
        stats["min_s"] = min(stats["times"])
        stats["median_cpu_s"] = statistics.median(stats["cpu_times"])
    ours, lora = (collected[k]["median_s"] for k in ("ours", "peft_lora"))
    fastest_ours, fastest_lora = (collected[k]["min_s"] for k in ("ours", "peft_lora"))
    summary = {
        "ours_over_peft_lora_time": ours / lora,
        "ours_over_peft_lora_time_min": fastest_ours / fastest_lora,
        "ours_over_peft_lora_cpu_time": (
            collected["ours"]["median_cpu_s"] / collected["peft_lora"]["median_cpu_s"]
        ),
    }
    if "peft_hra" in collected:
        summary["peft_hra_over_ours_time"] = collected["peft_hra"]["median_s"] / ours
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


def write_report(path: Path, report: dict) -> None:
    """Write a benchmark's JSON atomically (a temporary sibling renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    print(f"\nwrote {path}")


def print_table(results: list[dict], memory_key: str) -> None:
    print(
        f"\n| batch | variant | median step (s) | median CPU time (s) | {memory_key} (MiB) "
        "| trainable params |"
    )
    print("|---|---|---|---|---|---|")
    for shape in results:
        for name, stats in shape["variants"].items():
            mem = stats[memory_key] / 2**20 if stats[memory_key] is not None else float("nan")
            cells = [shape["batch"], name, f"{stats['median_s']:.3f}"]
            cells += [f"{stats['median_cpu_s']:.3f}", f"{mem:.0f}"]
            print("| " + " | ".join(map(str, cells)) + f" | {stats['params']:,} |")
        s = shape["summary"]
        peft_hra = s.get("peft_hra_over_ours_time")
        print(
            f"batch {shape['batch']}: ours/LoRA time {s['ours_over_peft_lora_time']:.3f} "
            f"(fastest steps: {s['ours_over_peft_lora_time_min']:.3f}; "
            f"CPU time {s['ours_over_peft_lora_cpu_time']:.3f}), "
            f"PEFT-HRA/ours time {'skipped' if peft_hra is None else f'{peft_hra:.2f}'}, "
            f"ours/LoRA memory {s['ours_over_peft_lora_memory']:.3f}, "
            f"merged inference / base {s['inference']['ratio']:.3f}"
        )


def available_bytes(device: torch.device) -> int:
    """Memory free for the benchmark: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**63


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="sd15", choices=list(ARCHITECTURES), help="UNet")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per variant")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per repeat (after 1 warm-up)"
    )
    parser.add_argument("--latent", type=int, default=None, help="latent side (CPU 16, CUDA 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="(CPU 1 2, CUDA 1 4)")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: benchmarks/results/train_step_<device>[_sdxl].json)",
    )
    args = parser.parse_args(argv)
    if not {"ours", "peft_lora"} <= set(args.variants):
        parser.error("--variants must include ours and peft_lora (the comparison)")

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    latent, batches = (64, [1, 4]) if on_gpu else (16, [1, 2])
    latent, batches = args.latent or latent, args.batches or batches
    unet = build_unet(args.arch, device, dtype)
    names, skipped = list(args.variants), {}
    if "peft_hra" in names and dense_h_bytes(unet) > available_bytes(device):
        names.remove("peft_hra")
        skipped["peft_hra"] = (
            f"its dense d x d products need at least {dense_h_bytes(unet) / 2**30:.1f} GiB "
            f"for backward; {available_bytes(device) / 2**30:.1f} GiB were free"
        )
        print(f"skipping peft_hra: {skipped['peft_hra']}")
    results = [run_shape(unet, b, latent, dtype, args.repeats, args.steps, names) for b in batches]

    memory_key = "peak_bytes" if on_gpu else "saved_bytes"
    print_table(results, memory_key)
    report = {
        "benchmark": "bench_train_step",
        "arch": args.arch,
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "resolution_px": latent * 8,
        "rank": RANK,
        "targets": TARGETS,
        "adapted_layers": len(adapted_layers(unet)),
        "repeats": args.repeats,
        "steps": args.steps,
        "skipped": skipped,
        "versions": versions(),
        "results": results,
    }
    suffix = "" if args.arch == "sd15" else f"_{args.arch}"
    default = Path(__file__).parent / "results" / f"train_step_{device.type}{suffix}.json"
    write_report(args.out or default, report)


if __name__ == "__main__":
    main()
