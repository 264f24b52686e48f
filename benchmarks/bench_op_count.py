"""Aten ops dispatched per training step: the CPU-side proxy for GPU kernel launches.

On a GPU at batch 1–4 an adapter's training step is bound by kernel launches, not
FLOPs. This counts every aten op one step dispatches (forward, backward, AdamW step;
view ops excluded, as they launch nothing) for the SD-1.5 UNet architecture (random
weights from its config, no download; ``--arch sdxl``: SDXL-base's) with adapters on the
attention projections (SD-1.5: 128, SDXL: 560), r = 8, and reports the ops above the
frozen floor per adapted layer. AdamW runs with
``foreach=True``, the CUDA default, so the optimizer's count is the one a GPU sees.

The count runs on the ``meta`` device (``--device meta``, the default): the same ops are
dispatched without computing anything, so it takes seconds on any machine. The one
difference from a real device is attention, which meta runs as its math decomposition:
the frozen floor is larger than on CPU or CUDA, the ops above it are not affected.
``--device cpu`` counts on real tensors.

It also records, on CPU, the bytes autograd saves for backward (frozen weights excluded)
at two latent sizes: the part that grows with the tokens is the slope between them; and
the FLOPs of forward + backward (``torch.utils.flop_counter``, matrix products,
convolutions and attention; on ``--device``) at the count's 8×8 latents and at the
architecture's native size (SD-1.5: 64×64, SDXL: 128×128), where compute, not launches,
sets the step time. Ours multiplies each frozen W by its rank-r factor where the layer's
input needs no gradient (the text entering ``attn2.to_k``/``to_v``): 2·r·d_in·d_out per
layer and step, independent of the tokens, which is visible at 8×8 and small at the
native size.

Variants: ``frozen`` (no adapter), ``peft_lora``, ``peft_oft`` (PEFT's Cayley–Neumann
default), ``peft_hra`` (dense d × d H) and ``ours``.

``--arch sd3`` / ``--arch flux``: the transformer of SD3-medium / FLUX.1 [dev] (their real
configs, :data:`TRANSFORMERS`) with diffusers' DreamBooth-LoRA targets (``SD3_TARGETS``,
``FLUX_TARGETS``), variants ``frozen peft_lora peft_hra ours`` at the native 1024 px
(SD3: 128×128 latents in 2×2 patches, 4096 image + 333 text tokens; FLUX.1: 4096 packed
image + 512 text tokens). Everything runs on ``meta`` (no weights; the full models fit), the
bytes saved for backward included (counted per storage); ``--blocks N`` keeps N blocks of
each kind at the real widths (the test's quick run).

    python benchmarks/bench_op_count.py        # writes benchmarks/results/op_count_cpu.json
    python benchmarks/bench_op_count.py --arch flux   # op_count_cpu_flux.json
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import diffusers
import torch
from bench_train_step import (
    ARCHITECTURES,
    RANK,
    TARGETS,
    VARIANTS,
    adapted_layers,
    build_unet,
    forward,
    make_batch,
    train_step,
    versions,
    write_report,
)
from peft import HRAConfig as PeftHRAConfig
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from hra_diffusion import FLUX_TARGETS, SD3_TARGETS, HRAConfig, inject_hra, unload_hra
from hra_diffusion.injection import target_matches

NATIVE_LATENT = {"sd15": 64, "sdxl": 128}
"""Latent side of each architecture's native resolution (512 px, 1024 px)."""

META = torch.device("meta")
"""Where the counts run: no weights, no computation."""

TRANSFORMERS = {
    "sd3": (
        "SD3Transformer2DModel",
        {
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "out_channels": 16,
            "pos_embed_max_size": 192,
        },
    ),
    "flux": (
        "FluxTransformer2DModel",
        {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56],
        },
    ),
}
"""``transformer/config.json`` of stabilityai/stable-diffusion-3-medium-diffusers (2.03B
parameters) and black-forest-labs/FLUX.1-dev (11.9B), as written in their repositories."""

TRANSFORMER_TARGETS = {"sd3": list(SD3_TARGETS), "flux": list(FLUX_TARGETS)}
TEXT_TOKENS = {"sd3": 77 + 256, "flux": 512}
"""Text tokens of the native run: SD3's CLIP 77 + T5 256, FLUX.1's T5 512 (diffusers)."""


def build_transformer(
    arch: str,
    blocks: int | None = None,
    device: torch.device = META,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """The ``arch`` transformer, frozen: on ``meta`` no weights, elsewhere random ones (seed 0)
    drawn directly in ``dtype``; ``blocks`` keeps that many blocks of each kind (real widths)."""
    name, config = TRANSFORMERS[arch]
    config = dict(config)
    if blocks is not None:
        for key in ("num_layers", "num_single_layers"):
            if key in config:
                config[key] = min(blocks, config[key])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # FLUX.1 in fp32 would not fit beside its bf16 copy
    try:
        with torch.device(device):
            model = getattr(diffusers, name)(**config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype=dtype).requires_grad_(False)


def transformer_inputs(
    model: torch.nn.Module,
    arch: str,
    batch: int,
    latent: int = 128,
    device: torch.device = META,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Random inputs of a ``latent``-sided square (128: the native 1024 px) for the ``arch``
    family's transformer; ``sample`` is what the model maps (the loss target)."""
    config = model.config
    tokens = TEXT_TOKENS[arch]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    text = randn(batch, tokens, config.joint_attention_dim)
    pooled = randn(batch, config.pooled_projection_dim)
    timestep = torch.ones(batch, device=device, dtype=dtype)
    if arch == "sd3":
        sample = randn(batch, config.in_channels, latent, latent)
        return {"sample": sample, "kwargs": {"encoder_hidden_states": text,
                "pooled_projections": pooled, "timestep": timestep}}  # fmt: skip
    image = (latent // 2) ** 2
    sample = randn(batch, image, config.in_channels)  # 2×2-packed tokens
    kwargs = {"encoder_hidden_states": text, "pooled_projections": pooled, "timestep": timestep,
              "img_ids": torch.zeros(image, 3, device=device, dtype=dtype),
              "txt_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
              "guidance": torch.ones(batch, device=device, dtype=dtype)}  # fmt: skip
    return {"sample": sample, "kwargs": kwargs}


def count_adapted(model: torch.nn.Module, targets: list[str]) -> int:
    """How many linears of ``model`` the ``targets`` adapt."""
    return sum(
        isinstance(module, torch.nn.Linear) and any(target_matches(name, t) for t in targets)
        for name, module in model.named_modules()
    )


def transformer_forward(model: torch.nn.Module, sample: torch.Tensor, inputs: dict):
    return model(hidden_states=sample, **inputs["kwargs"]).sample


def transformer_variants(arch: str) -> dict:
    """``frozen``, ``peft_lora``, ``peft_hra`` and ``ours`` on the family's targets."""
    targets = TRANSFORMER_TARGETS[arch]

    def peft(config):
        def attach(model):
            wrapped = get_peft_model(model, config)
            return [p for p in wrapped.parameters() if p.requires_grad], wrapped.unload

        return attach

    def ours(model):
        inject_hra(model, HRAConfig(r=RANK, target_modules=tuple(targets)))
        return [p for p in model.parameters() if p.requires_grad], lambda: unload_hra(model)

    return {
        "frozen": lambda model: ([], lambda: None),
        "peft_lora": peft(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets)),
        "peft_hra": peft(PeftHRAConfig(r=RANK, target_modules=targets)),
        "ours": ours,
    }


def meta_step(model, attach, inputs) -> tuple[int, int]:
    """(FLOPs, bytes saved for backward) of one forward + backward on ``meta``; saved
    tensors are counted once per storage, frozen weights excluded."""
    params, detach = attach(model)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    sample = inputs["sample"].clone().requires_grad_(not params)
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pred = transformer_forward(model, sample, inputs)
            loss = torch.nn.functional.mse_loss(pred, inputs["sample"])
        loss.backward()
    detach()
    return counter.get_total_flops(), sum(saved.values())


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched under it, by name, view ops excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def counted_step(unet, params, optimizer, inputs, run=forward) -> dict[str, Counter[str]]:
    """The ops of one training step, by phase (``run(model, sample, inputs)``: the forward)."""
    sample = inputs["sample"].clone().requires_grad_(not params)  # the floor needs a leaf
    with OpCounter() as forward_ops:
        pred = run(unet, sample, inputs)
        loss = torch.nn.functional.mse_loss(pred, inputs["sample"])
    with OpCounter() as backward:
        loss.backward()
    with OpCounter() as step:
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"forward": forward_ops.counts, "backward": backward.counts, "optimizer": step.counts}


def count_ops(unet, attach, inputs, run=forward) -> dict:
    """Ops of one step after a warm-up step (which creates the optimizer state)."""
    params, detach = attach(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True) if params else None
    counted_step(unet, params, optimizer, inputs, run)
    phases = counted_step(unet, params, optimizer, inputs, run)
    total = sum(phases.values(), Counter())
    del optimizer, params
    detach()
    return {
        "ops": sum(total.values()),
        "ops_by_phase": {name: sum(c.values()) for name, c in phases.items()},
        "top_ops": dict(total.most_common(12)),
        "_counts": total,
    }


def saved_bytes(unet, attach, batch: int) -> dict[str, int]:
    """Bytes saved for backward (frozen weights excluded) at latents 8 and 16, on CPU."""
    params, detach = attach(unet)
    saved = {}
    for latent in (8, 16):
        inputs = make_batch(unet, batch, latent, torch.device("cpu"))
        saved[f"latent_{latent}"] = train_step(unet, params, None, inputs, torch.float32)
    del params
    detach()
    return saved


def step_flops(unet, attach, batches: list[dict]) -> dict[str, int]:
    """FLOPs of one forward + backward (matrix products, convolutions, attention) on each
    batch, keyed by its latent side."""
    params, detach = attach(unet)
    flops = {}
    for inputs in batches:
        with FlopCounterMode(display=False) as counter:
            train_step(unet, params, None, inputs, torch.float32)
        flops[f"latent_{inputs['sample'].shape[-1]}"] = counter.get_total_flops()
    del params
    detach()
    return flops


def summarise(results: dict[str, dict], layers: int) -> dict:
    """Ops above the floor (in all and per each of the ``layers`` adapted layers) and the
    saved-bytes growth of every variant, and their ratios to PEFT LoRA's."""
    floor = results["frozen"]
    floor_counts = floor.pop("_counts")
    floor_growth = _growth(floor)
    for stats in results.values():
        counts = stats.pop("_counts", floor_counts)
        stats["ops_above_floor"] = stats["ops"] - floor["ops"]
        stats["ops_per_layer"] = stats["ops_above_floor"] / layers
        extra = counts.copy()
        extra.subtract(floor_counts)
        stats["top_ops_above_floor"] = dict(
            sorted(((k, v) for k, v in extra.items() if v > 0), key=lambda kv: -kv[1])[:12]
        )
        if "saved_bytes" in stats and floor_growth is not None:
            stats["saved_bytes_growth_above_floor"] = _growth(stats) - floor_growth
        stats["flops_above_floor"] = {
            size: flops - floor["flops"][size] for size, flops in stats["flops"].items()
        }
    lora = results["peft_lora"]
    summary = {}
    for name, s in results.items():
        if name == "frozen":
            continue
        summary[name] = {
            "ops_above_floor_over_lora": s["ops_above_floor"] / lora["ops_above_floor"],
            "flops_over_lora": {
                size: flops / lora["flops"][size] for size, flops in s["flops"].items()
            },
        }
        if "saved_bytes_growth_above_floor" in s and "saved_bytes_growth_above_floor" in lora:
            summary[name]["saved_growth_over_lora"] = (
                s["saved_bytes_growth_above_floor"] / lora["saved_bytes_growth_above_floor"]
            )
    return summary


def _growth(stats: dict) -> int | None:
    saved = stats.get("saved_bytes")
    return None if saved is None else saved["latent_16"] - saved["latent_8"]


def print_table(results: dict[str, dict], summary: dict) -> None:
    sizes = list(results["frozen"]["flops"])
    flop_columns = "".join(f" GFLOP {size} (vs LoRA) |" for size in sizes)
    print(
        "\n| variant | ops / step | fwd | bwd | optim | above floor | per layer | vs LoRA |"
        + flop_columns
    )
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(sizes))
    for name, s in results.items():
        p = s["ops_by_phase"]
        ratio = f"{summary[name]['ops_above_floor_over_lora']:.2f}×" if name in summary else "–"
        cells = [name, s["ops"], p["forward"], p["backward"], p["optimizer"]]
        cells += [s["ops_above_floor"], f"{s['ops_per_layer']:.1f}", ratio]
        for size, flops in s["flops"].items():
            vs = f" ({summary[name]['flops_over_lora'][size]:.3f}×)" if name in summary else ""
            cells.append(f"{flops / 1e9:.1f}{vs}")
        print("| " + " | ".join(map(str, cells)) + " |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--arch",
        default="sd15",
        choices=[*ARCHITECTURES, *TRANSFORMERS],
        help="UNet (sd15, sdxl) or transformer (sd3: SD3-medium, flux: FLUX.1 [dev])",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        help="sd3/flux: keep this many blocks of each kind, at the real widths (default: all)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="meta", choices=["meta", "cpu"], help="for the count")
    parser.add_argument(
        "--saved_bytes",
        nargs="*",
        default=["frozen", "peft_lora", "ours"],
        metavar="NAME",
        help="variants whose saved-for-backward bytes are measured on CPU (default: frozen "
        "peft_lora ours; the option without names skips it)",
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: benchmarks/results/op_count_cpu[_ARCH].json)",
    )
    args = parser.parse_args(argv)
    if args.arch in TRANSFORMERS:
        return run_transformer(args, argv)
    if "frozen" not in args.variants or "peft_lora" not in args.variants:
        parser.error("--variants must include frozen and peft_lora (the references)")

    device = torch.device(args.device)
    unet = build_unet(args.arch, device, torch.float32)  # on meta no weights are drawn
    layers = len(adapted_layers(unet))
    inputs = make_batch(unet, args.batch, 8, device)
    native = make_batch(unet, args.batch, NATIVE_LATENT[args.arch], device)
    results = {}
    for name in args.variants:
        results[name] = count_ops(unet, VARIANTS[name], inputs)
        results[name]["flops"] = step_flops(unet, VARIANTS[name], [inputs, native])
        print(f"  {name:10s} {results[name]['ops']} ops, FLOPs {results[name]['flops']}")
    if args.saved_bytes:
        unet = build_unet(args.arch, torch.device("cpu"), torch.float32)
        for name in args.saved_bytes:
            results[name]["saved_bytes"] = saved_bytes(unet, VARIANTS[name], args.batch)
            print(f"  {name:10s} saved {results[name]['saved_bytes']}")
    summary = summarise(results, layers)
    print_table(results, summary)
    report = {
        "benchmark": "bench_op_count",
        "batch": args.batch,
        "rank": RANK,
        "targets": TARGETS,
        "arch": args.arch,
        "adapted_layers": layers,
        "optimizer": "AdamW(foreach=True)",
        "count_device": args.device,
        "versions": versions(),
        "results": results,
        "summary": summary,
    }
    suffix = "" if args.arch == "sd15" else f"_{args.arch}"
    out = args.out or Path(__file__).parent / "results" / f"op_count_cpu{suffix}.json"
    write_report(out, report)
    return report


def run_transformer(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The sd3/flux run: ops, FLOPs and saved bytes of one step at 1024 px, all on meta."""
    model = build_transformer(args.arch, args.blocks)
    targets = TRANSFORMER_TARGETS[args.arch]
    layers = count_adapted(model, targets)
    inputs = transformer_inputs(model, args.arch, args.batch)
    results = {}
    for name, attach in transformer_variants(args.arch).items():
        results[name] = count_ops(model, attach, inputs, transformer_forward)
        flops, saved = meta_step(model, attach, inputs)
        results[name]["flops"] = {"native_1024px": flops}
        results[name]["saved_bytes_native"] = saved
        print(f"  {name:10s} {results[name]['ops']} ops, {flops / 1e12:.2f} TFLOP, saved {saved}")
    summary = summarise(results, layers)
    floor = results["frozen"]["saved_bytes_native"]
    lora = results["peft_lora"]["saved_bytes_native"] - floor
    for name in summary:
        above = results[name]["saved_bytes_native"] - floor
        results[name]["saved_bytes_above_floor"] = above
        summary[name]["saved_above_floor_over_lora"] = above / lora
    print_table(results, summary)
    report = {
        "benchmark": "bench_op_count",
        "command": " ".join(["python benchmarks/bench_op_count.py", *(argv or sys.argv[1:])]),
        "batch": args.batch,
        "rank": RANK,
        "targets": targets,
        "arch": args.arch,
        "config": TRANSFORMERS[args.arch][1],
        "blocks": args.blocks or "all (the real model)",
        "tokens": {"image": 4096, "text": TEXT_TOKENS[args.arch]},
        "adapted_layers": layers,
        "optimizer": "AdamW(foreach=True)",
        "count_device": "meta",
        "versions": versions(),
        "results": results,
        "summary": summary,
    }
    out = args.out or Path(__file__).parent / "results" / f"op_count_cpu_{args.arch}.json"
    write_report(out, report)
    return report


if __name__ == "__main__":
    main()
