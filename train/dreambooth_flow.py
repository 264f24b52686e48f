"""DreamBooth-HRA on the transformer bases, Stable Diffusion 3/3.5 and FLUX.1.

``train_dreambooth_hra_sd3.py`` and ``train_dreambooth_hra_flux.py`` differ only in a
:class:`FlowFamily`: the pipeline class, how prompts are encoded, how the transformer is
called and what validation passes to the pipeline. Everything else is here and in the code
every DreamBooth script shares (:mod:`hra_diffusion.train.dreambooth`: class images, data,
the training loop with exact resume, the final files and exports). :func:`train` reads:

1. check everything that needs no model (:func:`check_flow_args`);
2. generate missing class images with the base pipeline;
3. load the pipeline, encode every prompt once (instance, class, validation, the empty
   negative) and drop the text encoders: T5 is the largest part of these bases;
4. inject HRA into the transformer (fp32 adapters on frozen weights in the training dtype,
   the VAE in fp32);
5. train with the flow-matching loss (:mod:`hra_diffusion.train.flow_matching`);
6. save the weights, the model card and the asked-for LoRA export.

The dataset's ``input_ids`` are prompt indices into the encoded table, not token ids: the
three (SD3) or two (FLUX.1) tokenizers have different lengths, and the embeddings are
computed once anyway.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from hra_diffusion import HRAConfig, hra_parameters, inject_hra, orthogonality_loss
from hra_diffusion.errors import fail
from hra_diffusion.families import FAMILY_NAMES
from hra_diffusion.injection import hra_magnitudes
from hra_diffusion.train.arg_checks import check_cache_args, single_file_of
from hra_diffusion.train.cache import InputCache, latent_cache
from hra_diffusion.train.checkpoints import register_trainable_state_hooks, remove_stale_temp_dirs
from hra_diffusion.train.dreambooth import (
    Models,
    RunInfo,
    finish_run,
    generate_class_images,
    make_dataloader,
    resume_training,
    training_loop,
)
from hra_diffusion.train.dreambooth_args import Inputs, check_dreambooth_args
from hra_diffusion.train.ema import EMA
from hra_diffusion.train.flow_matching import (
    FlowSample,
    chunk_sample,
    flow_latents,
    flow_matching_loss,
    noise_latents,
)
from hra_diffusion.train.reporting import save_validation_images, tracker_config
from hra_diffusion.train.setup import (
    count_parameters,
    hra_options,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    weight_dtype,
)

Encode = Callable[[diffusers.DiffusionPipeline, list[str], argparse.Namespace], tuple]
"""(pipeline, prompts, args) -> (prompt embeddings (P, L, D), pooled embeddings (P, Dp))."""

Predict = Callable[[FlowSample, torch.Tensor, torch.Tensor, "Models", argparse.Namespace], Any]
"""(noised sample, prompt embeddings, pooled, models, args) -> velocity (B, C, h, w)."""


@dataclass(frozen=True)
class FlowFamily:
    """What one transformer family plugs into :func:`train`.

    ``encode`` and ``predict`` are the family's prompt encoding and transformer call;
    ``negative_prompt``: validation samples with classifier-free guidance against the empty
    prompt's embeddings (SD3), or without (FLUX.1, guidance-distilled); ``default_model``
    builds the tiny base used without ``--pretrained_model_name_or_path``.
    """

    family: str
    pipeline_class: type[diffusers.DiffusionPipeline]
    encode: Encode
    predict: Predict
    negative_prompt: bool
    default_model: Callable[[], Path]

    @property
    def name(self) -> str:
        return FAMILY_NAMES[self.family]


SIDE_MULTIPLE = 16
"""Image sides must be multiples of 16: 8× VAE downsampling, then 2×2 patches (SD3's
patch embedding, FLUX.1's packing)."""


def check_flow_args(args: argparse.Namespace, family: FlowFamily) -> Inputs:
    """Every check that needs no model; a base of another family is refused by name."""
    if single_file_of(args) is not None:
        fail(
            f"single-file checkpoints are not supported for {family.name} yet; pass the "
            "base's diffusers folder (with model_index.json) to --pretrained_model_name_or_path."
        )
    if args.output_kohya_format and family.family != "flux":
        fail(
            f"--output_kohya_format is not available for {family.name} (kohya has no settled "
            "names for its LoRAs); use --export_lora, whose file diffusers and ComfyUI read."
        )
    if args.resolution % SIDE_MULTIPLE:
        fail(
            f"--resolution {args.resolution} is not a multiple of {SIDE_MULTIPLE} ({family.name} "
            "turns 2x2 latent patches into one token); use a multiple of 16."
        )
    check_cache_args(args)
    return check_dreambooth_args(args, family.family, family.default_model)


def load_base_pipeline(
    args: argparse.Namespace, model_path: str, family: FlowFamily
) -> diffusers.DiffusionPipeline:
    """The base pipeline (class images, prompt encoding, validation, the LoRA export)."""
    return family.pipeline_class.from_pretrained(model_path, revision=args.revision)


def prompt_list(args: argparse.Namespace, inputs: Inputs) -> list[str]:
    """Every distinct prompt the run needs, in a fixed order: the instance prompts, the
    class prompt, the validation prompts and the empty (negative) prompt."""
    prompts = [*inputs.instance_prompts, args.class_prompt or "", *(args.validation_prompt or [])]
    return list(dict.fromkeys([*prompts, ""]))


def encode_prompts_once(
    pipe: diffusers.DiffusionPipeline,
    prompts: list[str],
    family: FlowFamily,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> InputCache:
    """Encode ``prompts`` with the pipeline's text encoders (in ``dtype`` on ``device``),
    then drop the encoders from the pipeline. Returns the table as an :class:`InputCache`
    of prompt indices: ``cache(indices (B,))`` -> (embeddings (B, L, D), pooled (B, Dp))."""
    encoders = [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    for name in encoders:
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False).to(device, dtype)
    table = InputCache(lambda indices: family.encode(pipe, [prompts[i] for i in indices], args))
    table(torch.arange(len(prompts)))  # every prompt, once
    pipe.register_modules(**{name: None for name in encoders if hasattr(pipe, name)})
    table.encode = None  # nothing is left to encode with
    return table


def flow_dreambooth_loss(
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    models: Models,
    args: argparse.Namespace,
    predict: Predict,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DreamBooth loss of one batch: instance loss + prior loss + λ · orthogonality loss,
    each a :func:`~hra_diffusion.train.flow_matching.flow_matching_loss`; every random draw
    (VAE sample, noise, times) from ``generator``."""
    latents = flow_latents(batch["pixel_values"], models.vae, generator, models.latents)
    dtype = next(p.dtype for p in models.adapted["transformer"].parameters() if not p.requires_grad)
    sample, noise = noise_latents(latents.to(dtype), models.noise_scheduler, args, generator)
    embeds, pooled = models.text(batch["input_ids"])  # (B, L, D), (B, Dp)
    prediction = predict(sample, embeds, pooled, models, args)  # (B, C, h, w)
    parts: dict[str, torch.Tensor] = {}
    if args.with_prior_preservation:
        (sample, noise), (prior_sample, prior_noise) = chunk_sample(sample, noise)
        prediction, prior_prediction = prediction.chunk(2)
        parts["prior_loss"] = flow_matching_loss(prior_prediction, prior_sample, prior_noise, args)
    parts["instance_loss"] = flow_matching_loss(prediction, sample, noise, args, batch.get("masks"))
    loss = parts["instance_loss"]
    if args.with_prior_preservation:
        loss = loss + args.prior_loss_weight * parts["prior_loss"]
    if args.hra_lambda > 0:
        parts["orth_loss"] = orthogonality_loss(models.adapted["transformer"])
        loss = loss + args.hra_lambda * parts["orth_loss"]
    return loss, {name: value.detach().item() for name, value in parts.items()}


def run_validation(
    args: argparse.Namespace,
    accelerator: Accelerator,
    models: Models,
    pipe: diffusers.DiffusionPipeline,
    family: FlowFamily,
    prompts: list[str],
    dtype: torch.dtype,
    global_step: int,
) -> Path:
    """Sample ``--num_validation_images`` per ``--validation_prompt`` (seed ``--seed``) with
    the base pipeline holding the transformer being trained, from the encoded prompts;
    main process only. Returns the grid's path."""
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32)
    images = []
    for prompt in args.validation_prompt:
        embeds, pooled = models.text(torch.tensor([prompts.index(prompt)]))
        kwargs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if family.negative_prompt:
            negative, negative_pooled = models.text(torch.tensor([prompts.index("")]))
            kwargs |= {"negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": (
                negative_pooled
            )}  # fmt: skip
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        with torch.no_grad(), autocast, models.validation_weights():
            images += pipe(
                **kwargs,
                num_images_per_prompt=args.num_validation_images,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.num_validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                generator=generator,
            ).images
    folder = Path(args.output_dir) / "validation" / f"step-{global_step:06d}"
    return save_validation_images(
        accelerator, images, folder, global_step, captions=args.validation_prompt
    )


def train(args: argparse.Namespace, family: FlowFamily) -> dict[str, Any]:
    """Train DreamBooth-HRA on a ``family`` base; returns the run's summary (as the SD 1.x
    and SDXL scripts' ``main``)."""
    inputs = check_flow_args(args, family)
    model_path = inputs.model_path
    started = time.perf_counter()
    accelerator = make_accelerator(args)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    def load_base() -> diffusers.DiffusionPipeline:
        return load_base_pipeline(args, model_path, family)

    class_images = None
    if args.with_prior_preservation:
        class_images = generate_class_images(args, accelerator, inputs, load_base)

    # Models: every prompt encoded once, then the text encoders dropped; the transformer
    # frozen in the training dtype, the VAE in fp32, then fp32 HRA adapters.
    dtype = weight_dtype(accelerator)
    pipe = load_base()
    prompts = prompt_list(args, inputs)
    text = encode_prompts_once(pipe, prompts, family, args, accelerator.device, dtype)
    transformer, vae = pipe.transformer, pipe.vae
    noise_scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    args.prediction_type = "flow matching (velocity)"
    vae.requires_grad_(False).to(accelerator.device)  # loaded in fp32, kept in fp32
    transformer.requires_grad_(False).to(accelerator.device)
    if dtype != torch.float32:
        transformer.to(dtype=dtype)
    set_seed(args.seed)  # identical adapter initialisation on every rank and every run
    config = HRAConfig(target_modules=tuple(args.hra_target_modules), **hra_options(args))
    try:
        inject_hra(transformer, config)
    except (ValueError, TypeError) as error:
        fail(f"cannot adapt the model: {error}")
    params = hra_parameters(transformer)
    trainable = count_parameters(params)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.torch_compile:
        transformer.compile(fullgraph=True)  # in place: module names and weights files unchanged

    # Data: each item's "input_ids" is its prompt's index in the encoded table.
    index = {prompt: i for i, prompt in enumerate(prompts)}
    dataloader, updates_per_epoch = make_dataloader(
        args,
        accelerator,
        inputs,
        torch.tensor([index[p] for p in inputs.instance_prompts]),  # (N,)
        class_images,
        torch.tensor(index[args.class_prompt]) if class_images else None,
    )

    optimizer = make_optimizer(params, args, no_decay=hra_magnitudes(transformer))
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator.num_processes)
    wrapped, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    register_trainable_state_hooks(accelerator)
    adapted: dict[str, nn.Module] = {"transformer": accelerator.unwrap_model(wrapped)}
    ema = EMA.of(adapted, args.ema_decay) if args.use_ema else None
    models = Models(wrapped, [], vae, noise_scheduler, adapted, ema, text=text)
    if args.cache_latents:
        models.latents = latent_cache(vae)
    if accelerator.is_main_process:
        accelerator.init_trackers(f"dreambooth-hra-{family.family}", config=tracker_config(args))

    def validate(step: int) -> Path:
        return run_validation(args, accelerator, models, pipe, family, prompts, dtype, step)

    # Train, from the checkpoint given to --resume_from_checkpoint if any.
    global_step = resume_training(accelerator, inputs.resume, ema, args.seed)
    result = training_loop(
        accelerator,
        args,
        models,
        [wrapped],
        params,
        optimizer,
        lr_scheduler,
        dataloader,
        updates_per_epoch,
        global_step,
        functools.partial(flow_dreambooth_loss, predict=family.predict),
        validate,
    )

    run = RunInfo(
        model_path,
        load_base,
        trainable,
        started,
        family.pipeline_class.__name__,
        "transformer",
        f"DreamBooth HRA {family.name} training finished",
    )
    return finish_run(accelerator, args, models, result, validate, run)
