"""DreamBooth in the procedural world: the prompts, samples and colour scores of a subject.

Shared by ``benchmarks/dreambooth_world.py`` (does HRA learn a subject?) and
``benchmarks/method_world.py`` (HRA against LoRA). A subject of
:mod:`hra_diffusion.world.subjects` is trained as ``"a qwe <noun>"`` and asked for again
on :data:`~hra_diffusion.world.subjects.RECONTEXT_BACKGROUND`, a background its views
never show; :mod:`hra_diffusion.world.scorer` compares colour histograms.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from hra_diffusion.world import scorer
from hra_diffusion.world.subjects import RECONTEXT_BACKGROUND, Subject

IDENTIFIER = "qwe"
"""The subject's identifier token in every prompt."""

GUIDANCE_SCALE = 7.5
STEPS = 25
"""Sampling: guidance and steps of the pipeline's own scheduler."""


def prompts(subject: Subject) -> dict[str, str]:
    """The instance prompt and the recontextualisation prompt of a subject."""
    instance = f"a {IDENTIFIER} {subject.noun}"
    return {"instance": instance, "recontext": f"{instance} on a {RECONTEXT_BACKGROUND} background"}


def generate(pipe, prompt: str, count: int) -> list[Image.Image]:
    """``count`` images of one prompt, image i from seed i."""
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    return pipe(
        [prompt] * count,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE_SCALE,
        generator=generators,
    ).images


def distances(images: list[Image.Image], views: list[Image.Image]) -> dict[str, float]:
    """Object-region and whole-image colour-histogram distances of images to the views
    (total variation: 0 = same colours, 1 = disjoint)."""
    return {
        "object": scorer.histogram_distance(
            scorer.mean_histogram(images, objects_only=True),
            scorer.mean_histogram(views, objects_only=True),
        ),
        "image": scorer.histogram_distance(
            scorer.mean_histogram(images), scorer.mean_histogram(views)
        ),
    }


@torch.no_grad()
def vae_round_trip(pipe, images: list[Image.Image]) -> list[Image.Image]:
    """``images`` encoded and decoded by the pipeline's VAE (latent means).

    Every sample is decoded by this VAE, so the round trip of the subject's own views is
    about as close as any generation can come to them: their distance to the views is the
    floor under a tuned model's.
    """
    processor = pipe.image_processor
    pixels = processor.preprocess(images).to(pipe.vae.device, pipe.vae.dtype)  # (N, 3, H, W)
    latents = pipe.vae.encode(pixels).latent_dist.mean  # (N, 4, H/8, W/8)
    decoded = pipe.vae.decode(latents).sample  # (N, 3, H, W) in [-1, 1]
    return processor.postprocess(decoded, output_type="pil")


def recontext_rate(images: list[Image.Image]) -> float:
    """Share of images whose background reads as :data:`RECONTEXT_BACKGROUND`."""
    backgrounds = [scorer.read_scene(im).background for im in images]
    return float(np.mean([b == RECONTEXT_BACKGROUND for b in backgrounds]))
