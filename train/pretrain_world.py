"""Pretrain the bundled default model: a tiny Stable Diffusion 1.x on the procedural world.

Three stages, in order (:mod:`hra_diffusion.world` describes the world):

1. ``vae``: an ``AutoencoderKL`` (:func:`~hra_diffusion.world.tiny_sd.world_vae`, 4× down to
   16×16×4 latents) on world scenes, free-form canvases and (``--vae_broad_share``) the
   broad pictures of :mod:`hra_diffusion.world.broad`, loss ``L1 + MSE + kl_weight · KL``,
   AdamW with cosine decay. Its scaling factor is set to 1 / std of the latents, as Stable
   Diffusion's 0.18215 was. ``--vae_channels``, ``--vae_layers_per_block`` and
   ``--vae_latent_channels`` widen it.
2. ``unet``: a ``UNet2DConditionModel`` (:func:`~hra_diffusion.world.tiny_sd.world_unet`)
   with the CLIP text encoder trained jointly (``--freeze_text_encoder`` keeps it at its
   random init), epsilon loss on Stable Diffusion 1.5's noise schedule, captions dropped
   for classifier-free guidance, AdamW with warmup and cosine decay to 10 %, and an
   exponential moving average of the weights, which is what gets saved.
3. ``decoder``: the VAE's encoder stays frozen (the UNet's latents keep their meaning)
   while ``post_quant_conv`` and the decoder fine-tune on the same images, sharpening
   what the pipeline draws; it refines the pipeline in ``--output_dir`` in place.

The result is a ``StableDiffusionPipeline`` folder (DPM-Solver++ scheduler) that
``StableDiffusionPipeline.from_pretrained(output_dir)`` loads, stored in fp16 except the
VAE, with ``pretraining/`` beside the weights: the recipe and wall times
(``recipe.json``), per-step losses (``*_loss.json``) and loss curves (``*_loss.png``).
Every random draw comes from ``--seed``::

    python train/pretrain_world.py --output_dir hra_diffusion/assets/tiny-sd-world

The bundled model was made by the three stages run one by one (``--stage vae``, then
``--stage unet``, then ``--stage decoder``, which is what the default ``--stage all``
does in one go); ``recipe.json`` records each stage's arguments and its wall time on a
2-core CPU. The VAE is kept in ``<output_dir>.work/vae`` between stages, and
``--unet_checkpoint_steps`` saves the UNet stage's whole training state to
``<output_dir>.work/unet_checkpoint``, from which the stage, run again with the same
options, resumes exactly; ``--snapshot_steps`` writes the current EMA pipeline to
``<output_dir>.work/snapshot`` while the UNet trains.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hra_diffusion import cli, world
from hra_diffusion.errors import fail
from hra_diffusion.plots import line_chart
from hra_diffusion.train.reporting import format_duration
from hra_diffusion.train.setup import tokenize
from hra_diffusion.world import broad
from hra_diffusion.world.tiny_sd import (
    SD15_SCHEDULER,
    clip_tokenizer,
    latent_signal_to_noise,
    narrow_vae_latents,
    normalize_vae_latents,
    sampled_latent_statistics,
    widen_vae_latents,
    world_text_encoder,
    world_unet,
    world_vae,
)

STAGES = ("all", "vae", "unet", "decoder")
RECORD_DIR = "pretraining"
"""Subfolder of the output pipeline holding the recipe, losses and curves."""


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description="Pretrain the tiny Stable Diffusion of the procedural world (VAE, then UNet)."
    )
    parser.add_argument(
        "--output_dir", type=cli.output_dir, required=True, help="Pipeline folder to write."
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace a finished pipeline in --output_dir (it is kept until the new one is "
        "complete).",
    )
    parser.add_argument("--stage", choices=STAGES, default="all", help="Default: all.")
    parser.add_argument("--seed", type=cli.seed, default=0, help="Seeds every draw. Default: 0.")
    parser.add_argument(
        "--num_threads", type=cli.positive_int, default=None, help="torch CPU threads (torch's)."
    )
    group = parser.add_argument_group("VAE")
    group.add_argument(
        "--vae_steps",
        type=cli.non_negative_int,
        default=1200,
        help="Training steps; 0 with --vae_init takes that VAE as it is (evaluated and its "
        "latents normalised by --vae_latent_norm). Default: 1200.",
    )
    group.add_argument("--vae_batch_size", type=cli.positive_int, default=16, help="Default: 16.")
    group.add_argument(
        "--vae_learning_rate", type=cli.positive_float, default=1e-3, help="Default: 1e-3."
    )
    group.add_argument(
        "--vae_kl_weight", type=cli.positive_float, default=1e-6, help="Default: 1e-6."
    )
    group.add_argument(
        "--vae_canvas_share",
        type=cli.below_one,
        default=0.5,
        help="Share of free-form canvases among VAE images. Default: 0.5.",
    )
    group.add_argument(
        "--vae_broad_share",
        type=cli.probability,
        default=0.0,
        help="Share of broad pictures (hra_diffusion.world.broad: any colour, every scale, "
        "gradients, stripes, checkers) among VAE images; with --vae_canvas_share at most 1, "
        "world scenes take the rest. Default: 0.0.",
    )
    group.add_argument(
        "--vae_channels",
        type=cli.positive_int,
        nargs=3,
        default=[16, 32, 64],
        help="The VAE's channels per level, multiples of 4. Default: 16 32 64.",
    )
    group.add_argument(
        "--vae_layers_per_block", type=cli.positive_int, default=1, help="Default: 1."
    )
    group.add_argument(
        "--vae_latent_channels",
        type=cli.positive_int,
        default=None,
        help="Latent channels (the UNet's input). With --vae_init of fewer channels, its "
        "latents are widened exactly (widen_vae_latents) and the rest trained; of more, "
        "only its channels of highest signal-to-noise ratio on held-out scenes are kept "
        "(narrow_vae_latents). Default: 4, or --vae_init's.",
    )
    group.add_argument(
        "--vae_init",
        type=cli.existing_dir,
        default=None,
        help="Start from this VAE folder's weights and architecture (--vae_channels and "
        "--vae_layers_per_block are then ignored). Default: a fresh world_vae.",
    )
    group.add_argument(
        "--vae_latent_norm",
        choices=("channel", "global"),
        default="channel",
        help="channel: fold each latent channel's mean and std (of posterior samples of "
        "held-out scenes and canvases) into the VAE (normalize_vae_latents), so the UNet "
        "sees unit latents per channel, scaling factor 1; global: one scaling factor, 1 / "
        "the std over all channels of the latent means (the bundled 4-channel model's "
        "recipe). Default: channel.",
    )
    group.add_argument(
        "--vae_eval_count",
        type=cli.positive_int,
        default=256,
        help="Held-out world scenes the recorded PSNR is measured on after the VAE and decoder "
        "stages (a quarter as many canvases and broad pictures). Default: 256.",
    )
    group.add_argument(
        "--decoder_steps",
        type=cli.positive_int,
        default=1500,
        help="Steps of the decoder fine-tuning stage (encoder frozen). Default: 1500.",
    )
    group.add_argument(
        "--decoder_learning_rate", type=cli.positive_float, default=5e-4, help="Default: 5e-4."
    )
    group = parser.add_argument_group("UNet and text encoder")
    group.add_argument("--unet_steps", type=cli.positive_int, default=3500, help="Default: 3500.")
    group.add_argument("--unet_batch_size", type=cli.positive_int, default=32, help="Default: 32.")
    group.add_argument(
        "--unet_learning_rate", type=cli.positive_float, default=8e-4, help="Default: 8e-4."
    )
    group.add_argument(
        "--unet_warmup_steps", type=cli.non_negative_int, default=100, help="Default: 100."
    )
    group.add_argument("--ema_decay", type=cli.open_unit, default=0.995, help="Default: 0.995.")
    group.add_argument(
        "--freeze_text_encoder",
        action="store_true",
        help="Keep the text encoder at its random initialisation instead of training it.",
    )
    group.add_argument(
        "--empty_caption_share",
        type=cli.below_one,
        default=0.1,
        help="Share of world scenes trained with the empty caption (for classifier-free "
        "guidance). Default: 0.1.",
    )
    group.add_argument(
        "--canvas_share",
        type=cli.below_one,
        default=0.1,
        help="Share of free-form canvases (always with the empty caption). Default: 0.1.",
    )
    group.add_argument(
        "--unet_checkpoint_steps",
        type=cli.non_negative_int,
        default=250,
        help="Every N UNet steps, save the whole training state (weights, EMA, optimizer, "
        "random generators) to <output_dir>.work/unet_checkpoint; a later run of the stage "
        "with the same options resumes from it exactly (0: never). Default: 250.",
    )
    group.add_argument(
        "--snapshot_steps",
        type=cli.non_negative_int,
        default=0,
        help="Every N UNet steps, write the EMA pipeline to <output_dir>.work/snapshot "
        "(0: never). Default: 0.",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse a finished output without --overwrite_output_dir, and a UNet stage with no VAE."""
    out = Path(args.output_dir)
    finished = (out / "model_index.json").exists()
    if args.stage == "decoder" and not finished:
        fail(f"--stage decoder refines the pipeline in --output_dir {out}; run --stage unet first.")
    if finished and args.stage != "decoder" and not args.overwrite_output_dir:
        fail(
            f"--output_dir {out} already holds a finished pipeline. Choose another "
            "--output_dir or pass --overwrite_output_dir to replace it."
        )
    if args.stage == "unet" and not (work_dir(args) / "vae" / "config.json").exists():
        fail(f"--stage unet needs the VAE of --stage vae in {work_dir(args)}/vae; run that first.")
    if args.vae_steps == 0 and not args.vae_init:
        fail("--vae_steps 0 takes the VAE of --vae_init as it is; pass --vae_init DIR too.")
    if args.vae_init and not (Path(args.vae_init) / "config.json").is_file():
        fail(f"--vae_init {args.vae_init} is not a VAE folder (no config.json in it).")
    if args.vae_broad_share + args.vae_canvas_share > 1:
        fail("--vae_broad_share plus --vae_canvas_share must be at most 1.")
    if any(c % 4 for c in args.vae_channels):
        fail(f"--vae_channels must be multiples of 4 (4 norm groups), got {args.vae_channels}.")


def work_dir(args: argparse.Namespace) -> Path:
    """``<output_dir>.work``: the trained VAE, snapshots and per-stage records."""
    out = Path(args.output_dir)
    return out.with_name(out.name + ".work")


# --------------------------------------------------------------------------- data


def vae_picture(rng: np.random.Generator, canvas_share: float, broad_share: float):
    """A broad picture, a free-form canvas or a world scene, with the given shares."""
    draw = rng.random()
    if draw < broad_share:
        return broad.render_broad(rng)
    if draw < broad_share + canvas_share:
        return world.render_canvas(rng)
    return world.render_scene(world.sample_scene(rng, "train"))


def vae_batch(
    rng: np.random.Generator, size: int, canvas_share: float, broad_share: float = 0.0
) -> torch.Tensor:
    """VAE training pictures (:func:`vae_picture`) as (B, 3, 64, 64) in [-1, 1]."""
    images = [vae_picture(rng, canvas_share, broad_share) for _ in range(size)]
    return torch.from_numpy(np.stack([world.image_to_array(im) for im in images]))


def unet_batch(
    rng: np.random.Generator, size: int, canvas_share: float, empty_share: float
) -> tuple[torch.Tensor, list[str]]:
    """Training pixels (B, 3, 64, 64) and captions; canvases and dropped captions are ``""``."""
    images, captions = [], []
    for _ in range(size):
        if rng.random() < canvas_share:
            images.append(world.render_canvas(rng))
            captions.append("")
            continue
        scene = world.sample_scene(rng, "train")
        images.append(world.render_scene(scene))
        text = world.sample_caption(scene, rng)
        captions.append("" if rng.random() < empty_share else text)
    pixels = torch.from_numpy(np.stack([world.image_to_array(im) for im in images]))
    return pixels, captions


# --------------------------------------------------------------------------- helpers


def warmup_cosine(warmup: int, total: int, floor: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def sd15_ddpm() -> diffusers.DDPMScheduler:
    """Stable Diffusion 1.5's training noise schedule."""
    return diffusers.DDPMScheduler.from_config(diffusers.DDIMScheduler(**SD15_SCHEDULER).config)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 − decay) · model, over the trainable parameters."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        if p.requires_grad:
            e.lerp_(p, 1 - decay)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1]."""
    mse = F.mse_loss(a.clamp(-1, 1), b).item()
    return 10 * math.log10(4.0 / mse)


def save_losses(folder: Path, name: str, losses: list[float], title: str) -> None:
    """``<name>_loss.json`` and a loss curve PNG (mean over windows of 25 steps)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_loss.json").write_text(json.dumps([round(x, 6) for x in losses]))
    window = 25
    points = [
        (i + window, float(np.mean(losses[i : i + window])))
        for i in range(0, len(losses) - window + 1, window)
    ]
    line_chart({"loss": points}, folder / f"{name}_loss.png", title, log_y=True)


def atomic_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Write a folder beside ``target`` and swap it in only once complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        old = target.with_name(f".{target.name}-old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- stages


def train_vae(args: argparse.Namespace) -> dict[str, object]:
    """Stage 1: train the VAE, set its scaling factor, save it to the work folder."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 1])
    if args.vae_init:
        vae = diffusers.AutoencoderKL.from_pretrained(args.vae_init, torch_dtype=torch.float32)
        channels = args.vae_latent_channels or vae.config.latent_channels
        if channels > vae.config.latent_channels:
            vae = widen_vae_latents(vae, channels)
        elif channels < vae.config.latent_channels:
            vae = keep_informative_channels(vae, channels, args)
        vae.train()
    else:
        vae = world_vae(
            tuple(args.vae_channels), args.vae_layers_per_block, args.vae_latent_channels or 4
        )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(50, args.vae_steps, floor=0.05)
    )
    losses: list[float] = []
    start, cpu_start = time.time(), time.process_time()
    bar = tqdm(range(args.vae_steps), desc="VAE steps", mininterval=30)
    for step in bar:
        pixels = vae_batch(
            rng, args.vae_batch_size, args.vae_canvas_share, args.vae_broad_share
        )  # (B, 3, 64, 64)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample  # (B, 3, 64, 64)
        kl = posterior.kl().mean()
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + args.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 25 == 24:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}", refresh=False)
    seconds = time.time() - start
    vae.eval()
    record = {
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "steps": args.vae_steps,
        **evaluate_vae(vae, args.vae_eval_count),
        "command_args": vars(args),
    }
    if args.vae_latent_norm == "channel":
        vae = normalize_latent_channels(vae, args, record)
    else:
        vae.register_to_config(scaling_factor=record["scaling_factor"])
    out = work_dir(args)
    atomic_folder(out / "vae", vae.save_pretrained)
    save_losses(out / RECORD_DIR, "vae", losses, "VAE loss (L1 + MSE + KL)")
    (out / RECORD_DIR / "vae.json").write_text(json.dumps(record, indent=2))
    print(f"VAE: {format_duration(seconds)}, {record}", flush=True)
    return record


@torch.no_grad()
def evaluate_vae(vae: diffusers.AutoencoderKL, count: int = 256) -> dict[str, float]:
    """Held-out PSNR on world scenes (all pairs), canvases and broad pictures (the first
    quarter of :func:`~hra_diffusion.world.broad.evaluation_set`), and 1 / std of the
    latents of scenes and canvases."""
    rng = np.random.default_rng(12345)
    scenes = [world.render_scene(world.sample_scene(rng, "all")) for _ in range(count)]
    canvases = [world.render_canvas(rng) for _ in range(count // 4)]
    broad_set = broad.evaluation_set(count // 4)
    result: dict[str, float] = {}
    latents = []
    for name, images in (("world", scenes), ("canvas", canvases), ("broad", broad_set)):
        pixels = torch.from_numpy(np.stack([world.image_to_array(im) for im in images]))
        posterior = vae.encode(pixels).latent_dist
        result[f"psnr_{name}_db"] = round(psnr(vae.decode(posterior.mode()).sample, pixels), 2)
        if name != "broad":
            latents.append(posterior.mode())
    result["scaling_factor"] = round(1.0 / torch.cat(latents).std().item(), 4)
    return result


def held_out_pixels(args: argparse.Namespace) -> torch.Tensor:
    """``--vae_eval_count`` held-out world scenes and a quarter as many canvases, (N, 3, 64,
    64): the pictures latent statistics are measured on."""
    rng = np.random.default_rng([args.seed, 4])
    count = args.vae_eval_count
    images = [world.render_scene(world.sample_scene(rng, "all")) for _ in range(count)]
    images += [world.render_canvas(rng) for _ in range(count // 4)]
    return torch.from_numpy(np.stack([world.image_to_array(im) for im in images]))


@torch.no_grad()
def keep_informative_channels(
    vae: diffusers.AutoencoderKL, channels: int, args: argparse.Namespace
) -> diffusers.AutoencoderKL:
    """``vae`` narrowed (:func:`narrow_vae_latents`) to its ``channels`` latent channels of
    highest signal-to-noise ratio on :func:`held_out_pixels`, the others decoded at their
    mean; prints the ratios."""
    pixels = held_out_pixels(args)
    ratio = latent_signal_to_noise(vae.eval(), pixels)  # (L,)
    keep = sorted(ratio.argsort(descending=True)[:channels].tolist())
    fill = vae.encode(pixels).latent_dist.mean.mean(dim=(0, 2, 3))  # (L,)
    print(f"latent signal/noise {[round(v, 2) for v in ratio.tolist()]}: keeping {keep}")
    return narrow_vae_latents(vae, keep, fill)


def normalize_latent_channels(
    vae: diffusers.AutoencoderKL, args: argparse.Namespace, record: dict[str, object]
) -> diffusers.AutoencoderKL:
    """``vae`` with unit latents per channel (:func:`normalize_vae_latents`), measured on
    posterior samples of ``--vae_eval_count`` held-out scenes and a quarter as many
    canvases; the shift and scale go into ``record`` and the scaling factor becomes 1."""
    generator = torch.Generator().manual_seed(args.seed + 4)
    shift, scale = sampled_latent_statistics(vae, held_out_pixels(args), generator)  # (L,)
    record["latent_shift"] = [round(v, 4) for v in shift.tolist()]
    record["latent_scale"] = [round(v, 4) for v in scale.tolist()]
    record["scaling_factor"] = 1.0
    return normalize_vae_latents(vae, shift, scale).eval()


UNET_CHECKPOINT = "unet_checkpoint"
"""Subfolder of the work folder holding the UNet stage's last training state."""

UNET_OPTIONS = (
    "seed",
    "unet_steps",
    "unet_batch_size",
    "unet_learning_rate",
    "unet_warmup_steps",
    "ema_decay",
    "freeze_text_encoder",
    "empty_caption_share",
    "canvas_share",
)
"""The options a resumed UNet stage must share with the run that saved the checkpoint."""


def unet_options(args: argparse.Namespace) -> dict[str, object]:
    """:data:`UNET_OPTIONS` of this run, as JSON values."""
    return {name: getattr(args, name) for name in UNET_OPTIONS}


@dataclass
class TrainingState:
    """Everything the UNet stage's next step depends on, saved and restored together:
    weights and EMA weights (safetensors), optimizer and schedule, and the random
    generators (numpy's for the data, torch's for latents, noise and timesteps)."""

    unet: nn.Module
    text_encoder: nn.Module
    ema_unet: nn.Module
    ema_text: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    rng: np.random.Generator
    generator: torch.Generator

    def modules(self) -> dict[str, nn.Module]:
        return {
            "unet": self.unet,
            "text_encoder": self.text_encoder,
            "ema_unet": self.ema_unet,
            "ema_text_encoder": self.ema_text,
        }

    def save(self, folder: Path, options: dict, step: int, losses: list[float]) -> None:
        """Write the state after ``step`` atomically (the previous one stays until done)."""

        def write(tmp: Path) -> None:
            for name, module in self.modules().items():
                safetensors.torch.save_file(module.state_dict(), tmp / f"{name}.safetensors")
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "generator": self.generator.get_state(),
                },
                tmp / "optimizer.pt",
            )
            record = {
                "step": step,
                "options": options,
                "rng": self.rng.bit_generator.state,
                "losses": losses,
            }
            (tmp / "state.json").write_text(json.dumps(record))

        atomic_folder(folder, write)

    def load(self, folder: Path, options: dict) -> tuple[list[float], int]:
        """Restore the state saved in ``folder``; returns (losses so far, next step).
        :func:`fail` if it was saved with other :data:`UNET_OPTIONS`."""
        record = json.loads((folder / "state.json").read_text())
        for name, value in options.items():
            if record["options"][name] != value:
                fail(
                    f"{folder} was saved with --{name} {record['options'][name]}, this run has "
                    f"{value}; pass the same value to resume, or delete {folder} to start over."
                )
        for name, module in self.modules().items():
            module.load_state_dict(safetensors.torch.load_file(folder / f"{name}.safetensors"))
        saved = torch.load(folder / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.generator.set_state(saved["generator"])
        self.rng.bit_generator.state = record["rng"]
        print(f"resuming the UNet stage after step {record['step']} from {folder}", flush=True)
        return record["losses"], record["step"] + 1


def train_unet(args: argparse.Namespace) -> dict[str, object]:
    """Stage 2: train UNet (+ text encoder) on VAE latents; keep the EMA weights."""
    torch.manual_seed(args.seed + 1)
    rng = np.random.default_rng([args.seed, 2])
    generator = torch.Generator().manual_seed(args.seed + 2)
    vae = (
        diffusers.AutoencoderKL.from_pretrained(work_dir(args) / "vae").eval().requires_grad_(False)
    )
    tokenizer = clip_tokenizer()
    unet, text_encoder = world_unet(vae.config.latent_channels), world_text_encoder()
    text_encoder.requires_grad_(not args.freeze_text_encoder)
    noise_scheduler = sd15_ddpm()
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.unet_learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(args.unet_warmup_steps, args.unet_steps, floor=0.1)
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    scale = vae.config.scaling_factor
    state = TrainingState(
        unet, text_encoder, ema_unet, ema_text, optimizer, schedule, rng, generator
    )
    checkpoint = work_dir(args) / UNET_CHECKPOINT
    losses, first = state.load(checkpoint, unet_options(args)) if checkpoint.is_dir() else ([], 1)
    start, cpu_start = time.time(), time.process_time()
    for step in tqdm(range(first, args.unet_steps + 1), desc="UNet steps", initial=first - 1):
        pixels, captions = unet_batch(
            rng, args.unet_batch_size, args.canvas_share, args.empty_caption_share
        )
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=generator) * scale
        noise = torch.randn(latents.shape, generator=generator)  # (B, L, 16, 16)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)  # (B,)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(tokenize(tokenizer, captions))[0]  # (B, 77, 64)
        loss = F.mse_loss(unet(noisy, timesteps, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_update(ema_unet, unet, args.ema_decay)
        ema_update(ema_text, text_encoder, args.ema_decay)
        losses.append(loss.item())
        if args.unet_checkpoint_steps and step % args.unet_checkpoint_steps == 0:
            state.save(checkpoint, unet_options(args), step, losses)
        if args.snapshot_steps and step % args.snapshot_steps == 0:
            snapshot = build_pipeline(vae, ema_text, tokenizer, ema_unet)
            atomic_folder(work_dir(args) / "snapshot", snapshot.save_pretrained)
    seconds = time.time() - start
    record = {
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "steps": args.unet_steps,
        "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 5),
        "text_encoder": "frozen (random init)" if args.freeze_text_encoder else "trained jointly",
    }
    out = work_dir(args)
    save_losses(out / RECORD_DIR, "unet", losses, "UNet epsilon loss")
    (out / RECORD_DIR / "unet.json").write_text(json.dumps(record, indent=2))
    print(f"UNet: {format_duration(seconds)}, {record}", flush=True)
    return {"pipeline": build_pipeline(vae, ema_text, tokenizer, ema_unet), **record}


def build_pipeline(vae, text_encoder, tokenizer, unet) -> diffusers.StableDiffusionPipeline:
    """The deliverable: the trained parts with a DPM-Solver++ scheduler on SD 1.5's schedule."""
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(sd15_ddpm().config)
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: diffusers.StableDiffusionPipeline, folder: Path) -> None:
    """Save in fp16 (the VAE in fp32), with every component's config saying float32.

    fp16 halves the file size; the configs make every loader (diffusers and transformers
    5's ``dtype="auto"`` alike) compute in fp32, which CPUs need.
    """
    pipe.unet.to(torch.float16)
    pipe.text_encoder.to(torch.float16)
    pipe.save_pretrained(folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    pipe.unet.to(torch.float32)
    pipe.text_encoder.to(torch.float32)


def train_decoder(args: argparse.Namespace, vae: diffusers.AutoencoderKL) -> dict[str, object]:
    """Stage 3: fine-tune the VAE decoder with the encoder frozen, so the latents (and the
    UNet trained on them) stay valid while pictures get sharper, as Stable Diffusion's
    ft-MSE decoder did. Trains on sampled latents, as the UNet's outputs look."""
    torch.manual_seed(args.seed + 3)
    rng = np.random.default_rng([args.seed, 3])
    vae.requires_grad_(False)
    decoder = [vae.post_quant_conv, vae.decoder]
    params = [p for m in decoder for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.decoder_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(50, args.decoder_steps, floor=0.05)
    )
    losses: list[float] = []
    start, cpu_start = time.time(), time.process_time()
    for _ in tqdm(range(args.decoder_steps), desc="decoder steps"):
        pixels = vae_batch(
            rng, args.vae_batch_size, args.vae_canvas_share, args.vae_broad_share
        )  # (B, 3, 64, 64)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()  # (B, L, 16, 16)
        recon = vae.decode(latents).sample
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.time() - start
    vae.requires_grad_(False).eval()
    record = {
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "steps": args.decoder_steps,
        **evaluate_vae(vae, args.vae_eval_count),
    }
    record["scaling_factor"] = vae.config.scaling_factor  # unchanged: the encoder is frozen
    save_losses(work_dir(args) / RECORD_DIR, "decoder", losses, "VAE decoder loss (L1 + MSE)")
    print(f"decoder: {format_duration(seconds)}, {record}", flush=True)
    return record


def write_pipeline(
    args: argparse.Namespace, pipe: diffusers.StableDiffusionPipeline, records: dict
) -> None:
    """Save the pipeline with ``pretraining/`` (records, curves, recipe) into --output_dir."""
    recipe_path = Path(args.output_dir) / RECORD_DIR / "recipe.json"
    stages = json.loads(recipe_path.read_text())["stages"] if recipe_path.exists() else {}
    recipe = {"stages": stages}
    for stage, record in records.items():  # a stage run earlier keeps its own command_args
        recipe["stages"][stage] = {"command_args": vars(args), **record}

    def write(folder: Path) -> None:
        save_pipeline(pipe, folder)
        shutil.copytree(work_dir(args) / RECORD_DIR, folder / RECORD_DIR)
        (folder / RECORD_DIR / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")

    atomic_folder(Path(args.output_dir), write)
    print(f"wrote {args.output_dir}", flush=True)


@cli.cli_main("--vae_batch_size and --unet_batch_size")
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.stage in ("all", "vae"):
        train_vae(args)
    if args.stage in ("all", "unet"):
        record = train_unet(args)
        pipe = record.pop("pipeline")
        vae_record = json.loads((work_dir(args) / RECORD_DIR / "vae.json").read_text())
        write_pipeline(args, pipe, {"vae": vae_record, "unet": record})
    if args.stage in ("all", "decoder"):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            args.output_dir, dtype=torch.float32
        )
        write_pipeline(args, pipe, {"decoder": train_decoder(args, pipe.vae)})


if __name__ == "__main__":
    main()
