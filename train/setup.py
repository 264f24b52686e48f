"""Model loading and training set-up: the accelerator, dtypes, optimiser and schedule.

Cast frozen weights to :func:`weight_dtype` *before* injecting HRA (so the adapters stay
fp32), then build :func:`make_optimizer` and :func:`make_lr_scheduler`.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch import nn

from hra_diffusion.errors import fail
from hra_diffusion.single_file import load_single_file


def add_lora(model: nn.Module, rank: int, targets: list[str]) -> list[nn.Parameter]:
    """Add a PEFT LoRA adapter to a frozen UNet or text encoder; return its fp32 tensors.

    diffusers' DreamBooth-LoRA recipe: ``lora_alpha`` = ``rank`` (scale 1), Gaussian
    ``lora_A`` and zero ``lora_B``, so training starts at the base model. ``targets`` are
    module-name suffixes, as for HRA (PEFT takes no regular expressions in a list).
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)
    )
    try:
        model.add_adapter(config)
    except ValueError as error:
        fail(f"cannot add LoRA to {type(model).__name__}: {error}")
    cast_training_params(model, torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator for ``args`` (mixed precision, accumulation, tracker, project dir).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) on a machine without CUDA GPUs the
    processes train on CPU over gloo; accelerate only does that when asked (``cpu=True``).
    """
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)
    )
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
        cpu=multi_cpu,
    )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights are stored in: fp16/bf16 under mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )


def count_parameters(params: Iterable[torch.Tensor]) -> int:
    """Total number of elements."""
    return sum(p.numel() for p in params)


def hra_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~hra_diffusion.HRAConfig` fields the ``--hra_*`` options set (all but the
    target modules, which differ per model)."""
    return {
        "r": args.hra_r,
        "apply_gs": args.hra_apply_gs,
        "lambda_orth": args.hra_lambda,
        "init": args.hra_init,
        "magnitude": args.hra_magnitude,
    }


def without_decay(
    params: list[nn.Parameter] | list[dict[str, Any]], exempt: Iterable[torch.Tensor]
) -> list[dict[str, Any]]:
    """``params`` as parameter groups, each split so that the ``exempt`` tensors sit in a
    group of their own with ``weight_decay`` 0 (HRA magnitudes start at 1: decay would pull
    them, and the layer's output, towards 0)."""
    groups = params if params and isinstance(params[0], dict) else [{"params": list(params)}]
    skip = {id(t) for t in exempt}
    split = []
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in skip]
        free = [p for p in group["params"] if id(p) in skip]
        split.append({**group, "params": kept})
        if free:
            split.append({**group, "params": free, "weight_decay": 0.0})
    return split


def make_optimizer(
    params: list[nn.Parameter] | list[dict[str, Any]],
    args: argparse.Namespace,
    no_decay: Iterable[torch.Tensor] = (),
) -> torch.optim.Optimizer:
    """The ``--optimizer`` (resolved by :func:`check_common_args`) with its options, over
    ``params``: tensors, or torch parameter groups (dicts with "params" and their own "lr");
    the ``no_decay`` tensors (HRA magnitudes) get no weight decay (:func:`without_decay`).

    adamw and adamw_8bit take ``--learning_rate`` and the ``--adam_*`` options; prodigy
    also its ``--prodigy_*`` ones (diffusers' SDXL DreamBooth script's names); adafactor
    runs with the given learning rate and schedule (``relative_step``, ``scale_parameter``
    and ``warmup_init`` off, kohya's usual setting for adapters) and ``--adam_weight_decay``.
    """
    params = without_decay(params, no_decay)
    adam = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.adam_weight_decay,
        "eps": args.adam_epsilon,
    }
    if args.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **adam)
    if args.optimizer == "prodigy":
        import prodigyopt

        if args.learning_rate < 0.1:
            warnings.warn(
                f"--optimizer prodigy with --learning_rate {args.learning_rate:g}: Prodigy "
                "estimates the step size itself and the learning rate scales it; 1.0 is usual.",
                stacklevel=2,
            )
        return prodigyopt.Prodigy(
            params,
            beta3=args.prodigy_beta3,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
            **adam,
        )
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=args.learning_rate,
            weight_decay=args.adam_weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(params, **adam)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``--lr_scheduler`` with ``--lr_warmup_steps`` over ``args.max_train_steps``.

    A prepared scheduler steps once per process per optimisation step, hence
    the ``num_processes`` factor (as in diffusers' scripts).
    """
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )


def load_models(
    model_path: str, revision: str | None, single_file: str | None = None
) -> tuple[
    transformers.CLIPTokenizer,
    transformers.CLIPTextModel,
    diffusers.AutoencoderKL,
    diffusers.UNet2DConditionModel,
    diffusers.DDPMScheduler,
]:
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler of a pipeline.

    With ``single_file`` (a checkpoint, see :mod:`hra_diffusion.single_file`) the weights
    come from that file and ``model_path`` is its ``--base_config`` folder.
    """
    kw: dict[str, Any] = {"revision": revision}
    if single_file is not None:
        pipe = load_single_file(single_file, model_path)
        scheduler = diffusers.DDPMScheduler.from_pretrained(model_path, subfolder="scheduler")
        return pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler
    return (
        transformers.CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer", **kw),
        transformers.CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", **kw),
        diffusers.AutoencoderKL.from_pretrained(model_path, subfolder="vae", **kw),
        diffusers.UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", **kw),
        diffusers.DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw),
    )


def tokenize(tokenizer: transformers.CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompt ids padded to the tokenizer's maximum length: (B, model_max_length)."""
    return tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
