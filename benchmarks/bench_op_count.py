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

    python benchmarks/bench_op_count.py        # writes benchmarks/results/op_count_cpu.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

NATIVE_LATENT = {"sd15": 64, "sdxl": 128}
"""Latent side of each architecture's native resolution (512 px, 1024 px)."""


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched under it, by name, view ops excluded."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def counted_step(unet, params, optimizer, inputs) -> dict[str, Counter[str]]:
    """The ops of one training step, by phase."""
    sample = inputs["sample"].clone().requires_grad_(not params)  # the floor needs a leaf
    with OpCounter() as forward_ops:
        pred = forward(unet, sample, inputs)
        loss = torch.nn.functional.mse_loss(pred, inputs["sample"])
    with OpCounter() as backward:
        loss.backward()
    with OpCounter() as step:
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"forward": forward_ops.counts, "backward": backward.counts, "optimizer": step.counts}


def count_ops(unet, attach, inputs) -> dict:
    """Ops of one step after a warm-up step (which creates the optimizer state)."""
    params, detach = attach(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True) if params else None
    counted_step(unet, params, optimizer, inputs)
    phases = counted_step(unet, params, optimizer, inputs)
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
    parser.add_argument("--arch", default="sd15", choices=list(ARCHITECTURES), help="UNet")
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
        help="JSON path (default: benchmarks/results/op_count_cpu[_sdxl].json)",
    )
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    main()
