"""What the DreamBooth scripts share: Stable Diffusion 1.x (``train_dreambooth_hra.py``)
and SDXL (``train_dreambooth_hra_sdxl.py``).

Import it as ``hra_diffusion.train.dreambooth``. It sits on top of the shared training
modules (:mod:`~hra_diffusion.train.args`, :mod:`~hra_diffusion.train.setup`,
:mod:`~hra_diffusion.train.checkpoints`, :mod:`~hra_diffusion.train.loss`, …) and
:mod:`hra_diffusion.train.data`. A DreamBooth script reads:

1. parse and check: :mod:`hra_diffusion.train.dreambooth_args` (the subject, prior
   preservation, masked loss and ``--repeats`` options, and the checks made before any
   model loads);
2. build: :func:`generate_class_images`, the script's own models in a :class:`Models`,
   :func:`make_dataloader`;
3. train: :func:`resume_training` then :func:`training_loop` with the script's loss;
4. save: :func:`save_final_files` and :func:`write_model_card`.

The adapter is HRA, or (SD 1.x script, ``--adapter lora``) diffusers-style PEFT LoRA
(:func:`~hra_diffusion.train.setup.add_lora`, :data:`LORA_FILES`), for comparisons of the
two methods.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn
from tqdm.auto import tqdm

from hra_diffusion import export_lora, save_hra_weights
from hra_diffusion.families import pipeline_class_family
from hra_diffusion.formats.hra import WEIGHTS_NAME
from hra_diffusion.formats.lora import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, save_lora_weights
from hra_diffusion.train.cache import InputCache
from hra_diffusion.train.checkpoints import (
    EMA_STATE_NAME,
    load_checkpoint,
    mix_seed,
    save_checkpoint,
    shape_settings,
    step_generator,
)
from hra_diffusion.train.data import (
    DreamBoothDataset,
    class_bucket_quota,
    collate_dreambooth,
    epoch_sampler,
    image_size,
    select_class_images,
)
from hra_diffusion.train.dreambooth_args import Inputs, existing_class_images
from hra_diffusion.train.ema import EMA, ema_weights_name
from hra_diffusion.train.reporting import (
    TrainingCurves,
    format_args_table,
    format_duration,
    format_training_features,
    print_summary,
    progress_bar,
)
from hra_diffusion.train.setup import weight_dtype

logger = get_logger(__name__)

# --------------------------------------------------------------------------- class images


def generate_class_images(
    args: argparse.Namespace,
    accelerator: Accelerator,
    inputs: Inputs,
    load_pipeline: Callable[[], diffusers.DiffusionPipeline],
) -> list[Path]:
    """Fill ``--class_data_dir`` up to ``--num_class_images`` with base-model samples.

    Class images follow the instance images' buckets (:func:`class_bucket_quota`); the
    ones a bucket lacks are generated at its size by ``load_pipeline()`` (the base
    pipeline, SD 1.x or SDXL). The main process generates (batched, seeded per image, each
    file written atomically); the others wait. Returns the class images to train on.
    """
    folder = Path(args.class_data_dir)
    buckets = inputs.buckets
    quota = class_bucket_quota(
        [buckets.nearest(image_size(p)) for p in inputs.instance_images], args.num_class_images
    )
    _, missing = select_class_images(existing_class_images(folder), buckets, quota)
    if missing and accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        on_gpu = accelerator.device.type == "cuda"
        pipe = load_pipeline()
        pipe.to(accelerator.device, weight_dtype(accelerator) if on_gpu else torch.float32)
        if not isinstance(pipe.scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
                pipe.scheduler.config
            )  # SD3 and FLUX.1 keep their flow-matching sampler
        pipe.set_progress_bar_config(disable=True)
        free = (i for i in itertools.count() if not (folder / f"generated-{i:05d}.png").exists())
        total = sum(missing.values())
        accelerator.print(f"Generating {total} class images into {folder}")
        with tqdm(total=total, desc="Class images") as bar:
            for (width, height), count in missing.items():
                numbers = list(itertools.islice(free, count))
                for start in range(0, count, args.sample_batch_size):
                    batch = numbers[start : start + args.sample_batch_size]
                    seeds = [mix_seed(args.seed, i) for i in batch]
                    images = pipe(
                        [args.class_prompt] * len(batch),
                        height=height,
                        width=width,
                        num_inference_steps=args.class_inference_steps,
                        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                    ).images
                    for i, image in zip(batch, images, strict=True):
                        tmp = folder / f".generated-{i:05d}.tmp.png"
                        image.save(tmp)
                        os.replace(tmp, folder / f"generated-{i:05d}.png")
                    bar.update(len(batch))
        del pipe
        if on_gpu:
            torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    return select_class_images(existing_class_images(folder), buckets, quota)[0]


# --------------------------------------------------------------------------- models and data


@dataclass(frozen=True)
class AdapterFiles:
    """How a run's adapter is named and written: ``method`` (``"HRA"`` or ``"LoRA"``), the
    weights file's name, and ``save(folder, **components)``, which writes it and returns it."""

    method: str
    weights_name: str
    save: Callable[..., Path]


HRA_FILES = AdapterFiles("HRA", WEIGHTS_NAME, save_hra_weights)
LORA_FILES = AdapterFiles("LoRA", LORA_WEIGHTS_NAME, save_lora_weights)


@dataclass
class Models:
    """What a training step needs. ``unet`` is the denoiser (SD3 and FLUX.1: the
    transformer); it and ``text_encoders`` may be accelerate-wrapped;
    ``adapted`` maps pipeline component names (``unet``, ``text_encoder``,
    ``text_encoder_2``, ``transformer``) to the unwrapped modules holding the adapter layers;
    ``latents``/``text`` are the ``--cache_latents``/``--pre_compute_text_embeddings`` caches
    of scripts that offer them, if on (SD3, FLUX.1: ``text`` is always the encoded prompts);
    ``files`` says which adapter it is (HRA unless told)."""

    unet: nn.Module
    text_encoders: list[nn.Module]
    vae: nn.Module
    noise_scheduler: diffusers.DDPMScheduler
    adapted: dict[str, nn.Module]
    ema: EMA | None = None
    latents: InputCache | None = None
    text: InputCache | None = None
    files: AdapterFiles = HRA_FILES

    def save_weights(self, folder: Path) -> Path:
        """``<folder>/hra_weights.safetensors`` (LoRA: ``pytorch_lora_weights.safetensors``)
        with every adapted component and, with ``--use_ema``, their averages beside it
        (``hra_weights_ema.safetensors``)."""
        name = self.files.weights_name
        if self.ema is not None:
            with self.ema.applied():
                self.files.save(folder / ema_weights_name(name), **self.adapted)
        return self.files.save(folder / name, **self.adapted)

    def save_checkpoint_files(self, folder: Path) -> None:
        """What a checkpoint holds beyond accelerate's state: the loadable weights and,
        with ``--use_ema``, the averages to resume from."""
        self.save_weights(folder)
        if self.ema is not None:
            self.ema.save(folder / EMA_STATE_NAME)

    def validation_weights(self) -> contextlib.AbstractContextManager:
        """The block runs with the EMA weights under ``--use_ema``, else with the trained ones."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()


def make_dataloader(
    args: argparse.Namespace,
    accelerator: Accelerator,
    inputs: Inputs,
    instance_prompt_ids: torch.Tensor,
    class_images: list[Path] | None,
    class_prompt_ids: torch.Tensor | None,
) -> tuple[torch.utils.data.DataLoader, int]:
    """The prepared DreamBooth dataloader and its optimisation steps per epoch.

    ``instance_prompt_ids`` has a row per instance image, (N, 77) or, for k tokenizers,
    (N, k, 77); ``class_prompt_ids`` is the class prompt's, (77,) or (k, 77).
    ``--repeats`` repeats the instance images (with their prompts and masks). Sets
    ``args.max_train_steps`` (from ``--num_train_epochs`` when not given) and
    ``args.num_train_epochs`` to match. The order and augmentation of every epoch are fixed
    by (seed, epoch).
    """
    repeats = args.repeats
    dataset = DreamBoothDataset(
        inputs.instance_images * repeats,
        instance_prompt_ids.repeat(repeats, *[1] * (instance_prompt_ids.dim() - 1)),
        args.resolution,
        args.center_crop,
        args.random_flip,
        class_images,
        class_prompt_ids,
        inputs.buckets,
        None if inputs.masks is None else inputs.masks * repeats,
        args.alpha_mask,
    )
    sampler = epoch_sampler(
        dataset.item_buckets, args.train_batch_size, args.seed, args.aspect_ratio_buckets
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate_dreambooth,
        num_workers=args.dataloader_num_workers,
    )
    dataloader = accelerator.prepare(dataloader)
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    return dataloader, updates_per_epoch


# --------------------------------------------------------------------------- training


LossFn = Callable[
    [dict[str, torch.Tensor], torch.Generator, Models, argparse.Namespace],
    tuple[torch.Tensor, dict[str, float]],
]
"""A script's loss: (batch, generator, models, args) -> (loss, its parts as floats)."""


def resume_training(
    accelerator: Accelerator, resume: Path | None, ema: EMA | None, seed: int
) -> int:
    """Restore the checkpoint ``resume`` (if any) and return its global step (0 without)."""
    if resume is None:
        return 0
    state = load_checkpoint(accelerator, resume)
    if ema is not None:
        ema.load(Path(resume) / EMA_STATE_NAME)
    if state["seed"] != seed:
        logger.warning(
            f"{resume} was trained with --seed {state['seed']}, this run uses {seed}: "
            "the continuation will not repeat the interrupted run exactly."
        )
    accelerator.print(f"Resumed from {resume} at step {state['global_step']}.")
    return state["global_step"]


@dataclass
class LoopResult:
    """Where :func:`training_loop` stopped: the step, the last loss and its parts, the
    last validation grid (with the step it was drawn at, -1 if none) and, on the main
    process, the loss and learning-rate log."""

    global_step: int
    curves: TrainingCurves | None = None
    loss: float = float("nan")
    parts: dict[str, float] = field(default_factory=dict)
    last_grid: Path | None = None
    validated_at: int = -1


def training_loop(
    accelerator: Accelerator,
    args: argparse.Namespace,
    models: Models,
    trained: list[nn.Module],
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    dataloader: torch.utils.data.DataLoader,
    updates_per_epoch: int,
    global_step: int,
    loss_fn: LossFn,
    validate: Callable[[int], Path],
) -> LoopResult:
    """Train from ``global_step`` to ``args.max_train_steps``; every process calls it.

    A resumed run skips the batches already seen in its epoch and draws each step's noise
    from :func:`~hra_diffusion.train.checkpoints.step_generator` (seed, epoch, batch, rank), so
    it repeats an uninterrupted run exactly. Checkpoints every ``--checkpointing_steps``;
    the main process runs ``validate(step)`` (returning the grid) every
    ``--validation_steps`` when ``--validation_prompt`` is given.
    """
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    out = Path(args.output_dir)
    curves = TrainingCurves(out, global_step) if accelerator.is_main_process else None
    result = LoopResult(global_step, curves)
    bar = progress_bar(accelerator, args.max_train_steps, global_step)
    for epoch in range(first_epoch, args.num_train_epochs):
        if result.global_step >= args.max_train_steps:
            break
        for model in trained:
            model.train()
        offset = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(dataloader, offset) if offset else dataloader
        loader.set_epoch(epoch)
        for index, batch in enumerate(loader, start=offset):
            with accelerator.accumulate(*trained):
                generator = step_generator(args.seed, epoch, index, accelerator.process_index)
                loss, parts = loss_fn(batch, generator, models, args)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            result.global_step += 1
            step = result.global_step
            if models.ema is not None:
                models.ema.update()
            result.loss, result.parts = loss.item(), parts
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": result.loss, "lr": lr, **parts}, step=step)
            if curves is not None:
                curves.log(step, result.loss, lr)
            if step % args.checkpointing_steps == 0:
                save_checkpoint(
                    accelerator,
                    out,
                    step,
                    args.seed,
                    args.checkpoints_total_limit,
                    models.save_checkpoint_files,
                    settings=shape_settings(args),
                )
            if args.validation_prompt and step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    result.last_grid = validate(step)
                    result.validated_at = step
                accelerator.wait_for_everyone()
            if step >= args.max_train_steps:
                break
    bar.close()
    return result


# --------------------------------------------------------------------------- output


def save_final_files(
    args: argparse.Namespace,
    models: Models,
    result: LoopResult,
    validate: Callable[[int], Path],
    export_loras: Callable[[], dict[str, Path]],
) -> dict[str, Path]:
    """The main process's final files: the weights (and EMA), a last validation grid when
    the last step was not validated, the loss and learning-rate curves, and with
    ``--export_lora`` / ``--output_kohya_format`` the files ``export_loras()`` writes
    (``{description: path}``, e.g. ``{"LoRA export": ...}``). Returns
    ``{description: path}`` for the model card; write the card last."""
    out = Path(args.output_dir)
    method = models.files.method
    files = {f"{method} weights": models.save_weights(out)}
    if args.use_ema:
        files[f"EMA of the {method} weights"] = out / ema_weights_name(models.files.weights_name)
    files.update(result.curves.draw())
    last_grid = result.last_grid
    if args.validation_prompt and result.validated_at != result.global_step:
        last_grid = validate(result.global_step)
    if last_grid is not None:
        files["validation grid"] = out / "validation_grid.png"
        shutil.copyfile(last_grid, files["validation grid"])
    if args.export_lora or args.output_kohya_format:
        files.update(export_loras())
    return files


@dataclass
class RunInfo:
    """What :func:`finish_run` needs to know about a script's run: the base and how to
    load it (for the LoRA exports), the trained parameter count, when the run started
    (``time.perf_counter()``), and the model card's and summary's wording."""

    model_path: str
    load_base: Callable[[], diffusers.DiffusionPipeline]
    trainable: int
    started: float
    pipeline_class: str
    components: str
    title: str


def finish_run(
    accelerator: Accelerator,
    args: argparse.Namespace,
    models: Models,
    result: LoopResult,
    validate: Callable[[int], Path],
    run: RunInfo,
) -> dict[str, Any]:
    """After the loop: the final files and model card (main process), the end of
    tracking, the printed summary; returns the run's summary dict (steps, loss, files)."""
    accelerator.wait_for_everyone()
    files: dict[str, Path] = {}
    if accelerator.is_main_process:
        files = save_final_files(
            args, models, result, validate, lambda: export_lora_files(args, models, run.load_base)
        )
        files["model card"] = write_model_card(
            args,
            run.model_path,
            run.trainable,
            files,
            run.pipeline_class,
            run.components,
            models.files.method,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    elapsed = time.perf_counter() - run.started
    out = Path(args.output_dir)
    checkpoints = sorted(out.glob("checkpoint-*"))
    print_summary(
        accelerator,
        run.title,
        {
            "steps": f"{result.global_step} / {args.max_train_steps}",
            "time": format_duration(elapsed),
            "trainable parameters": f"{run.trainable:,}",
            "final loss": f"{result.loss:.4f}",
            **{name: str(path) for name, path in files.items()},
            "checkpoints": ", ".join(p.name for p in checkpoints) or "none",
            "logs": str(out / args.logging_dir) if args.report_to != "none" else "off",
        },
    )
    return {
        "global_step": result.global_step,
        "loss": result.loss,
        "losses": result.parts,
        "trainable_parameters": run.trainable,
        "elapsed_s": elapsed,
        "files": files,
    }


def export_lora_files(
    args: argparse.Namespace, models: Models, load_base: Callable[[], diffusers.DiffusionPipeline]
) -> dict[str, Path]:
    """Write the LoRA files asked for next to the weights; main process.

    HRA: the exact LoRA of the adapter (``--export_lora``: diffusers' keys,
    ``--output_kohya_format``: kohya's) for the base pipeline ``load_base()`` (SD 1.x,
    SDXL, SD3 or FLUX.1; kohya's keys for the UNet bases and FLUX.1). LoRA: its copy in
    kohya's keys (``--output_kohya_format``). Returns ``{description: path}``."""
    if models.files is LORA_FILES:
        kohya = save_lora_weights(args.output_dir, kohya=True, **models.adapted)
        return {"kohya LoRA export": kohya}
    base = load_base()
    files = {}
    if args.export_lora:
        files["LoRA export"] = export_lora(args.output_dir, base, args.output_dir)
    if args.output_kohya_format:
        files["kohya LoRA export"] = export_lora(args.output_dir, base, args.output_dir, kohya=True)
    return files


def write_model_card(
    args: argparse.Namespace,
    model_path: str,
    trainable: int,
    files: dict[str, Path],
    pipeline_class: str,
    components: str,
    method: str = "HRA",
) -> Path:
    """``<output_dir>/README.md``: base model, prompts, how to load, every argument.

    ``pipeline_class`` is the diffusers pipeline that loads the base (e.g.
    ``"StableDiffusionXLPipeline"``); ``components`` names what was adapted, in words;
    ``method`` is the adapter, ``"HRA"`` or ``"LoRA"`` (``--adapter lora``).
    """
    out = Path(args.output_dir)
    base = args.pretrained_model_name_or_path or f"the bundled tiny model ({model_path})"
    targets = " ".join(args.hra_target_modules)
    if method == "LoRA":
        adapter = [
            f"LoRA (PEFT, diffusers' DreamBooth-LoRA recipe) of **{base}** on the {components}, "
            f"trained with DreamBooth on `{args.instance_data_dir}`.",
            f"- LoRA: rank={args.lora_rank}, alpha={args.lora_rank} (scale 1), targets `{targets}`",
        ]
        ema = ema_weights_name(LORA_WEIGHTS_NAME)
        use = [
            f'pipe.load_lora_weights("{out}")'
            + (f'  # or weight_name="{ema}": the EMA' if args.use_ema else ""),
            "pipe.fuse_lora()  # optional: no extra cost per step afterwards",
        ]
    else:
        adapter = [
            f"Householder Reflection Adaptation (HRA) of **{base}** on the {components}, trained "
            f"with DreamBooth on `{args.instance_data_dir}`.",
            f"- HRA: r={args.hra_r}, init={args.hra_init}, magnitude={args.hra_magnitude}, "
            f"apply_gs={args.hra_apply_gs}, lambda={args.hra_lambda:g}, "
            f"targets `{targets}`",
        ]
        use = [
            "from hra_diffusion import load_hra_weights, merge_hra",
            f'load_hra_weights(pipe, "{out}")'
            + (f'  # or "{out}/{ema_weights_name(WEIGHTS_NAME)}": the EMA' if args.use_ema else ""),
            "merge_hra(pipe)  # optional: no extra cost per step afterwards",
        ]
    lines = [
        f"# {method} DreamBooth adapter",
        "",
        adapter[0],
        "",
        f"- instance prompt: `{args.instance_prompt}`"
        + (f" (per picture: `*{args.caption_extension}` files)" if args.caption_extension else ""),
        f"- class prompt: `{args.class_prompt}` (prior preservation: "
        f"{'on' if args.with_prior_preservation else 'off'})",
        adapter[1],
        f"- trainable parameters: {trainable:,}",
        f"- steps: {args.max_train_steps}, resolution {args.resolution}, "
        f"learning rate {args.learning_rate:g}",
        "",
        "## Training features",
        "",
        *format_training_features(args),
        "",
        "## Use it",
        "",
        "```python",
        f"from diffusers import {pipeline_class}",
        "",
        f'pipe = {pipeline_class}.from_single_file("{args.pretrained_model_name_or_path}", '
        f'config="{model_path}")'
        if getattr(args, "base_config", None)
        else f'pipe = {pipeline_class}.from_pretrained("{model_path}")',
        *(
            ['pipe.scheduler.register_to_config(prediction_type="v_prediction")']
            if args.prediction_type == "v_prediction"
            else []
        ),
        *use,
        f'image = pipe("{args.instance_prompt}").images[0]',
        "```",
    ]
    if "LoRA export" in files:
        lines += [
            "",
            f'Plain diffusers, without hra-diffusion: `pipe.load_lora_weights("{out}")` '
            f"loads `{LORA_WEIGHTS_NAME}`, the exactly equivalent LoRA.",
        ]
    if "kohya LoRA export" in files and method == "LoRA":
        lines += [
            "",
            f"ComfyUI, AUTOMATIC1111, Forge: `{KOHYA_WEIGHTS_NAME}` is the same LoRA in kohya's "
            "keys.",
        ]
    elif "kohya LoRA export" in files and pipeline_class_family(pipeline_class) == "flux":
        lines += [
            "",
            f"ComfyUI, kohya sd-scripts: `{KOHYA_WEIGHTS_NAME}` is the same LoRA in kohya's FLUX.1 "
            "keys (exact on this base only).",
        ]
    elif "kohya LoRA export" in files:
        lines += [
            "",
            f"ComfyUI, AUTOMATIC1111, Forge: `{KOHYA_WEIGHTS_NAME}` is the same LoRA in kohya's "
            "keys (exact on this base only; for HRA on any base export GLoRA with "
            f"`python -m hra_diffusion.pipelines.export --format glora --weights {out} "
            f"--output {out}/hra_glora.safetensors`).",
        ]
    lines += ["", "## Training curves", ""]
    lines += [f"![{name}]({files[name].name})" for name in ("loss curve", "learning-rate curve")]
    if "validation grid" in files:
        lines += ["", "## Last validation", "", f"![validation]({files['validation grid'].name})"]
    lines += ["", "## Files", ""] + [f"- `{p.name}`: {k}" for k, p in files.items()]
    lines += ["", "## Training arguments", "", format_args_table(args), ""]
    card = out / "README.md"
    tmp = out / ".README.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, card)
    return card
