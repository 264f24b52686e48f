"""What a training run shows and records: validation grids, loss curves, the summary."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from hra_diffusion.plots import line_chart


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Paste equally sized images into a grid (``cols`` defaults to ceil(sqrt(n)))."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def caption_image(image: Image.Image, text: str) -> Image.Image:
    """``image`` with ``text`` written in a white band under it (wrapped to its width)."""
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(image)
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > image.width - 8:
            lines.append(line)
            candidate = word
        line = candidate
    lines.append(line)
    band = 16 * len(lines) + 6
    captioned = Image.new("RGB", (image.width, image.height + band), "white")
    captioned.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(captioned)
    for i, text_line in enumerate(lines):
        draw.text((4, image.height + 3 + 16 * i), text_line, fill="black", font=font)
    return captioned


def save_validation_images(
    accelerator: Accelerator,
    images: Sequence[Image.Image],
    folder: str | os.PathLike,
    global_step: int,
    tag: str = "validation",
    cols: int | None = None,
    captions: Sequence[str] | None = None,
) -> Path:
    """Write ``images`` as PNGs plus ``grid.png`` (``cols`` wide, see :func:`image_grid`)
    into ``folder``; log them to the trackers.

    With ``captions`` (one per row, e.g. the prompts) each row of the grid has its
    caption and the step written under it. Call on the main process only. Returns the
    grid's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    grid_path = folder / "grid.png"
    if captions:
        per_row = len(images) // len(captions)
        rows = [
            caption_image(image_grid(images[i * per_row : (i + 1) * per_row], per_row), text)
            for i, text in enumerate(f"{c} (step {global_step})" for c in captions)
        ]
        grid = Image.new("RGB", (rows[0].width, sum(row.height for row in rows)), "white")
        for i, row in enumerate(rows):
            grid.paste(row, (0, sum(r.height for r in rows[:i])))
    else:
        grid = image_grid(images, cols)
    grid.save(grid_path)
    stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (N, H, W, 3)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, stacked, global_step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=global_step)
    return grid_path


TRAINING_LOG_NAME = "training_log.jsonl"
"""One ``{"step", "loss", "lr", "seconds"}`` line per optimisation step, in the output folder
(``seconds``: wall time since the previous line, or since the log was opened)."""


class TrainingCurves:
    """Loss and learning rate of every step, kept in ``<output_dir>/training_log.jsonl``
    and drawn as ``loss.png`` and ``learning_rate.png`` beside the checkpoints.

    A resumed run keeps the lines up to its checkpoint's step, so its pictures show
    the whole run. Main process only.

    Example:
        >>> curves = TrainingCurves("out/", resumed_step=0)  # doctest: +SKIP
        >>> curves.log(1, 0.12, 1e-4); curves.draw()  # doctest: +SKIP
    """

    def __init__(self, output_dir: str | os.PathLike, resumed_step: int) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / TRAINING_LOG_NAME
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] <= resumed_step:
                    kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self.last = time.perf_counter()

    def log(self, step: int, loss: float, lr: float) -> None:
        """Append a step's line, with the wall time since the previous one."""
        now = time.perf_counter()
        row = {"step": step, "loss": loss, "lr": lr, "seconds": round(now - self.last, 4)}
        self.last = now
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def draw(self) -> dict[str, Path]:
        """Write the two PNGs; returns ``{"loss curve": path, "learning-rate curve": path}``."""
        rows = [json.loads(line) for line in self.path.read_text().splitlines()]
        loss = [(row["step"], row["loss"]) for row in rows]
        lr = [(row["step"], row["lr"]) for row in rows]
        return {
            "loss curve": line_chart({"loss": loss}, self.folder / "loss.png", "training loss"),
            "learning-rate curve": line_chart(
                {"learning rate": lr}, self.folder / "learning_rate.png", "learning rate"
            ),
        }


def progress_bar(accelerator: Accelerator, total: int, initial: int = 0) -> tqdm:
    """A ``Steps`` tqdm bar shown on the main process only."""
    return tqdm(
        total=total, initial=initial, desc="Steps", disable=not accelerator.is_local_main_process
    )


def format_args_table(args: argparse.Namespace) -> str:
    """Every argument as a two-column Markdown table, for model cards."""
    rows = ["| argument | value |", "|---|---|"]
    for key, value in sorted(vars(args).items()):
        shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
        rows.append(f"| `--{key}` | `{shown}` |")
    return "\n".join(rows)


def format_training_features(args: argparse.Namespace) -> list[str]:
    """Markdown bullets of the training features a run used, for model cards.

    Reads the options of :func:`add_optimization_args`, :func:`add_loss_args`,
    :func:`add_ema_args` and :func:`add_bucket_args` (after :func:`check_common_args` and
    ``check_bucket_args`` resolved them), and the masked-loss options where a script has them.
    """
    lines = [f"- prediction type: `{args.prediction_type}`"]
    optimizer = f"- optimizer: `{args.optimizer}`, learning rate {args.learning_rate:g}"
    lines.append(optimizer + f", schedule `{args.lr_scheduler}`")
    if hasattr(args, "weighting_scheme"):  # flow matching (SD3, FLUX.1)
        lines.append(
            f"- flow matching, weighting scheme `{args.weighting_scheme}` (logit mean "
            f"{args.logit_mean:g}, std {args.logit_std:g}, mode scale {args.mode_scale:g})"
        )
    else:
        weights = [f"min-SNR, gamma {args.snr_gamma:g}"] if args.snr_gamma else []
        weights += ["debiased estimation"] if args.debiased_estimation_loss else []
        weighting = " and ".join(weights) or "plain MSE"
        lines.append(f"- loss weighting: {weighting}; noise offset {args.noise_offset:g}")
        lines.append(f"- timesteps: {args.min_timestep} <= t < {args.max_timestep}")
    if args.use_ema:
        lines.append(f"- EMA of the trained weights, decay {args.ema_decay:g}")
    if args.aspect_ratio_buckets:
        lines.append(
            f"- aspect-ratio buckets: sides {args.min_bucket_reso}-{args.max_bucket_reso} px "
            f"in steps of {args.bucket_reso_steps}, about {args.resolution}² pixels"
        )
    if getattr(args, "masked_loss", False):
        source = "alpha channel" if args.alpha_mask else f"masks in `{args.mask_data_dir}`"
        lines.append(f"- masked loss: {source}")
    return lines


def print_summary(accelerator: Accelerator, title: str, items: dict[str, Any]) -> None:
    """Print an aligned ``key: value`` block on the main process."""
    if not accelerator.is_main_process:
        return
    width = max(map(len, items))
    lines = [title, "-" * len(title)] + [f"{k.ljust(width)} : {v}" for k, v in items.items()]
    print("\n".join(lines), flush=True)


def format_duration(seconds: float) -> str:
    """``1h 02m 03s`` / ``2m 03s`` / ``4.2s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` with values tensorboard's hparams accept (lists and None as strings)."""
    return {
        k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in vars(args).items()
    }
