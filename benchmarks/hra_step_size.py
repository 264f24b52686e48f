"""How far one optimiser step moves an adapted weight: LoRA vs HRA's two initialisations.

HRA trains U (d, r) but uses only its directions û_i = u_i / ‖u_i‖. Adam moves every
entry of u_i by about lr per step, so û_i turns by θ ≈ lr √d / ‖u_i‖ and, for an isotropic
W, ‖ΔW‖_F / ‖W‖_F ≈ 2√2 √r lr / ‖u_i‖. The paper's initialisation (``--hra_init paper``)
draws columns of norm ≈ √(2d / (3r)), so that ratio is ≈ 2√3 r lr / √d: wide layers move
slower than narrow ones at the same learning rate. ``--hra_init scaled`` keeps the
directions and sets ‖u_i‖ = √r: ≈ 2√2 lr whatever d and r. LoRA (B = 0 at the start)
moves ≈ lr √k with PEFT's default kaiming ``lora_A``.

This probe measures ‖ΔW‖_F / ‖W‖_F, ΔW = W_adapted − W, for every adapted layer after
the first AdamW step (weight decay 0, the same lr for every method) and after
``--steps`` steps, and reports the mean over layers, overall and per input width d
(in·kh·kw for a convolution), for:

- ``lora``: PEFT LoRA, alpha = rank (scale 1), PEFT's default init (kaiming-uniform A);
- ``lora_gaussian``: the same with ``init_lora_weights="gaussian"`` (A ~ N(0, 1/k²)),
  what the training scripts' ``--adapter lora`` uses;
- ``hra_paper`` and ``hra_scaled`` at r = 4, 8, 16.

Settings (seeds fixed, CPU, fp32):

1. ``single``: one square ``nn.Linear`` (frozen, its default kaiming-uniform W) at
   d = 64, 320, 1280; 256 random inputs, MSE to a fixed random target; LoRA rank 4
   (HRA r = 8's parameter count on a square layer).
2. ``world``: the bundled world UNet with the DreamBooth recipe's targets
   (``hra_diffusion/world/dreambooth.args``); epsilon loss on random latents, noise and
   text embeddings, batch 2, a new batch each step; LoRA rank matched to HRA r = 8's
   parameter count (``lora_rank_like_hra``).
3. ``sd15``: SD-1.5's UNet architecture with random weights (no download), the paper's
   targets to_q/to_k/to_v/to_out.0; latent 8×8, batch 1; LoRA rank as in 2.

    OMP_NUM_THREADS=1 python benchmarks/hra_step_size.py   # writes results/hra_step_size.json
    python benchmarks/hra_step_size.py --settings single --steps 3 --out /tmp/probe.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from bench_train_step import build_unet
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from hra_diffusion import HRAConfig, cli, hra_layers, hra_parameters, inject_hra, unload_hra
from hra_diffusion.functional import lora_factors
from hra_diffusion.injection import lora_rank_like_hra
from hra_diffusion.train import train_dreambooth_hra
from hra_diffusion.world.subjects import DREAMBOOTH_RECIPE
from hra_diffusion.world.tiny_sd import default_model_path

RESULTS = Path(__file__).resolve().parent / "results"
HRA_RANKS = (4, 8, 16)
SD15_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SEED = 0


@dataclass(frozen=True)
class Variant:
    """One adapter: ``method`` (``lora``, ``lora_gaussian``, ``hra_paper``, ``hra_scaled``)
    and its rank (LoRA k, HRA r)."""

    method: str
    rank: int

    @property
    def label(self) -> str:
        if self.method.startswith("lora"):
            init = " gaussian A" if self.method == "lora_gaussian" else ""
            return f"LoRA k={self.rank}{init}"
        return f"HRA {self.method.removeprefix('hra_')} r={self.rank}"


def variants(lora_rank: int, hra_ranks: tuple[int, ...] = HRA_RANKS) -> list[Variant]:
    """LoRA (both inits) at ``lora_rank``, then HRA paper and scaled at each of ``hra_ranks``."""
    loras = [Variant("lora", lora_rank), Variant("lora_gaussian", lora_rank)]
    hras = [Variant(f"hra_{init}", r) for init in ("paper", "scaled") for r in hra_ranks]
    return loras + hras


# (d, W (d_out, d), ΔW (d_out, d)) of every adapted layer, in fp64
Deltas = Callable[[], list[tuple[int, torch.Tensor, torch.Tensor]]]


def attach(
    model: nn.Module, variant: Variant, targets: tuple[str, ...]
) -> tuple[list[nn.Parameter], Deltas, Callable[[], None]]:
    """Put ``variant`` on ``model``'s ``targets`` (seeded with :data:`SEED`): its trainable
    tensors, a function returning each layer's (d, W, ΔW) and one that removes it again."""
    torch.manual_seed(SEED)
    if variant.method.startswith("hra_"):
        init = variant.method.removeprefix("hra_")
        inject_hra(model, HRAConfig(r=variant.rank, target_modules=targets, init=init))

        def hra_deltas():
            found = []
            for _, layer in hra_layers(model):
                w = layer.weight.detach().double().flatten(1)  # (d_out, d)
                a, b = lora_factors(w, layer.hra_u.detach().double())  # (r, d), (d_out, r)
                found.append((w.shape[1], w, b @ a))  # ΔW = W H − W = B A
            return found

        return hra_parameters(model), hra_deltas, lambda: unload_hra(model)
    init = "gaussian" if variant.method == "lora_gaussian" else True
    config = peft.LoraConfig(
        r=variant.rank,
        lora_alpha=variant.rank,
        init_lora_weights=init,
        target_modules=list(targets),
    )
    wrapped = peft.get_peft_model(model, config)

    def lora_deltas():
        found = []
        for module in wrapped.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                w = module.base_layer.weight.detach().double().flatten(1)  # (d_out, d)
                delta = module.get_delta_weight("default").detach().double().flatten(1)
                found.append((w.shape[1], w, delta))
        return found

    params = [p for p in wrapped.parameters() if p.requires_grad]
    return params, lora_deltas, wrapped.unload


def ratios(deltas: Deltas) -> dict:
    """Mean over layers of ‖ΔW‖_F / ‖W‖_F, overall (``all``) and per input width d."""
    by_width: dict[int, list[float]] = {}
    for d, w, delta in deltas():
        by_width.setdefault(d, []).append((delta.norm() / w.norm()).item())
    every = [x for values in by_width.values() for x in values]
    return {
        "all": statistics.fmean(every),
        "by_width": {str(d): statistics.fmean(by_width[d]) for d in sorted(by_width)},
        "layers_by_width": {str(d): len(by_width[d]) for d in sorted(by_width)},
    }


def measure(
    model: nn.Module,
    variant: Variant,
    targets: tuple[str, ...],
    loss_at: Callable[[int], torch.Tensor],
    lr: float,
    steps: int,
) -> dict:
    """Train ``variant`` for ``steps`` AdamW steps on ``loss_at(step)``; the ratios after the
    first step and the last. ``model`` is given back without the adapter."""
    params, deltas, remove = attach(model, variant, targets)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    found = {"method": variant.method, "rank": variant.rank, "label": variant.label}
    try:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_at(step).backward()
            optimizer.step()
            if step == 0:
                found["first_step"] = ratios(deltas)
        found["last_step"] = ratios(deltas)
    finally:
        remove()
    return found


# --------------------------------------------------------------------------- settings


def single_layer(
    widths: tuple[int, ...], lr: float, steps: int, hra_ranks: tuple[int, ...] = HRA_RANKS
) -> dict:
    """Setting 1: a square ``nn.Linear`` of each width, LoRA rank 4."""
    rows = []
    for d in widths:
        torch.manual_seed(SEED)
        model = nn.Sequential(nn.Linear(d, d)).requires_grad_(False)
        generator = torch.Generator().manual_seed(SEED + 1)
        x = torch.randn(256, d, generator=generator)  # (N, d)
        target = torch.randn(256, d, generator=generator)  # (N, d)

        def loss_at(step: int, model=model, x=x, target=target) -> torch.Tensor:
            return F.mse_loss(model(x), target)

        for variant in variants(4, hra_ranks):
            rows.append({"d": d, **measure(model, variant, ("0",), loss_at, lr, steps)})
    return {"widths": list(widths), "lora_rank": 4, "rows": rows}


def unet_loss(
    unet: UNet2DConditionModel, scheduler: DDPMScheduler, batch: int, latent: int, tokens: int = 77
) -> Callable[[int], torch.Tensor]:
    """The epsilon loss on random latents, noise, timesteps and text embeddings; step s
    draws the same batch for every variant (generator seeded with s)."""
    config = unet.config

    def loss_at(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(SEED + 100 + step)
        shape = (batch, config.in_channels, latent, latent)
        latents = torch.randn(shape, generator=generator)  # (B, C, h, w)
        noise = torch.randn(shape, generator=generator)  # (B, C, h, w)
        steps = scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (batch,), generator=generator)  # (B,)
        text = torch.randn(batch, tokens, config.cross_attention_dim, generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)  # (B, C, h, w)
        return F.mse_loss(unet(noisy, t, encoder_hidden_states=text).sample, noise)

    return loss_at


def unet_setting(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    targets: tuple[str, ...],
    batch: int,
    latent: int,
    lr: float,
    steps: int,
    hra_ranks: tuple[int, ...] = HRA_RANKS,
) -> dict:
    """Settings 2 and 3: every variant on ``unet``'s ``targets``, LoRA rank matched to
    HRA r = 8's parameter count."""
    unet.requires_grad_(False).eval()
    lora_rank, hra_count, lora_count = lora_rank_like_hra(unet, targets, 8)
    loss_at = unet_loss(unet, scheduler, batch, latent)
    rows = [measure(unet, v, targets, loss_at, lr, steps) for v in variants(lora_rank, hra_ranks)]
    return {
        "targets": list(targets),
        "batch": batch,
        "latent": latent,
        "lora_rank": lora_rank,
        "parameters": {"hra_r8": hra_count, "lora": lora_count},
        "rows": rows,
    }


def world_targets() -> tuple[str, ...]:
    """The DreamBooth recipe's ``--hra_target_modules`` (the bundled model's settings)."""
    placeholders = ["--instance_data_dir", ".", "--instance_prompt", "."]
    parser = train_dreambooth_hra.build_parser()
    return tuple(parser.parse_args([f"@{DREAMBOOTH_RECIPE}", *placeholders]).hra_target_modules)


def world_setting(lr: float, steps: int) -> dict:
    """Setting 2: the bundled world UNet, batch 2 at its native latent size."""
    path = default_model_path()
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    latent = unet.config.sample_size
    return unet_setting(unet, scheduler, world_targets(), 2, latent, lr, steps)


def sd15_setting(lr: float, steps: int) -> dict:
    """Setting 3: SD-1.5's UNet with random weights, latent 8×8, batch 1."""
    unet = build_unet("sd15", torch.device("cpu"), torch.float32)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return unet_setting(unet, scheduler, SD15_TARGETS, 1, 8, lr, steps)


# --------------------------------------------------------------------------- report


def table(rows: list[dict], columns: list[tuple[str, Callable[[dict], float]]]) -> str:
    """A markdown table: one row per variant label, ``columns`` read from its rows."""
    lines = ["| adapter | " + " | ".join(name for name, _ in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    labels = list(dict.fromkeys(row["label"] for row in rows))
    for label in labels:
        mine = [row for row in rows if row["label"] == label]
        cells = [f"{read(mine):.3g}" for _, read in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def single_table(result: dict, when: str) -> str:
    """Setting 1 as a table: one column per width."""
    columns = [
        (f"d={d}", lambda mine, d=d: next(r for r in mine if r["d"] == d)[when]["all"])
        for d in result["widths"]
    ]
    return table(result["rows"], columns)


def unet_table(result: dict, when: str) -> str:
    """Settings 2 and 3 as a table: all layers, then one column per input width."""
    widths = list(result["rows"][0][when]["by_width"])
    columns = [("all", lambda mine: mine[0][when]["all"])] + [
        (f"d={d}", lambda mine, d=d: mine[0][when]["by_width"][d]) for d in widths
    ]
    return table(result["rows"], columns)


def report(results: dict) -> str:
    """The markdown tables of every setting measured."""
    parts = []
    steps = results["settings"]["steps"]
    names = {"single": "single nn.Linear", "world": "world UNet", "sd15": "SD-1.5 UNet"}
    for key, title in names.items():
        if key not in results:
            continue
        render = single_table if key == "single" else unet_table
        for when, name in (
            ("first_step", "after the first step"),
            ("last_step", f"after {steps} steps"),
        ):
            parts.append(f"### {title}: ‖ΔW‖_F / ‖W‖_F {name}\n\n{render(results[key], when)}")
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=("single", "world", "sd15"),
        default=["single", "world", "sd15"],
        help="Which settings to measure (default: all three).",
    )
    parser.add_argument(
        "--lr", type=cli.positive_float, default=1e-4, help="AdamW lr (default 1e-4)."
    )
    parser.add_argument(
        "--steps", type=cli.positive_int, default=10, help="Steps of the second measure."
    )
    parser.add_argument(
        "--widths",
        type=cli.positive_int,
        nargs="+",
        default=[64, 320, 1280],
        help="Widths of the single layer (default: 64 320 1280).",
    )
    parser.add_argument(
        "--out",
        type=cli.output_file,
        default=str(RESULTS / "hra_step_size.json"),
        help="JSON output (default: benchmarks/results/hra_step_size.json).",
    )
    return parser


@cli.cli_main("--settings (sd15 is the largest)")
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    results: dict = {
        "settings": {
            "lr": args.lr,
            "steps": args.steps,
            "optimizer": "AdamW, weight_decay 0",
            "seed": SEED,
            "torch": torch.__version__,
            "peft": peft.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        }
    }
    settings = {
        "single": lambda: single_layer(tuple(args.widths), args.lr, args.steps),
        "world": lambda: world_setting(args.lr, args.steps),
        "sd15": lambda: sd15_setting(args.lr, args.steps),
    }
    for name in args.settings:
        start = time.perf_counter()
        results[name] = settings[name]()
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {results[name]['seconds']} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(report(results))
    return results


if __name__ == "__main__":
    main()
