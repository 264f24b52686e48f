"""The rectified-flow (flow-matching) training loss of SD3 and FLUX.1, as diffusers' scripts.

Latents are the VAE's, shifted and scaled, x_0 = (z − shift) · scale. For a time σ ∈ (0, 1]
drawn by :func:`sample_times`, the input is the straight line between data and noise ε,

    x_σ = (1 − σ) x_0 + σ ε,

and the transformer predicts the velocity v = ε − x_0 (:func:`flow_matching_loss`).
``--precondition_outputs`` (SD3) compares x_σ − σ v̂ with x_0 instead, the same minimiser
weighted by σ². ``--weighting_scheme`` chooses the time density and the per-example weight
(:func:`~diffusers.training_utils.compute_density_for_timestep_sampling`,
:func:`~diffusers.training_utils.compute_loss_weighting_for_sd3`). Every random draw comes
from the step's generator, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import diffusers
import torch
import torch.nn.functional as F
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from hra_diffusion.train.cache import InputCache


@dataclass
class FlowSample:
    """One noised batch: the latents x_0 and x_σ (B, C, h, w), the times σ (B, 1, 1, 1) and
    the scheduler's timesteps 1000 σ (B,)."""

    latents: torch.Tensor
    noisy: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor


def flow_latents(
    pixels: torch.Tensor,
    vae: diffusers.AutoencoderKL,
    generator: torch.Generator,
    latents_from: InputCache | None = None,
) -> torch.Tensor:
    """Sample the VAE's latents of ``pixels`` (B, 3, H, W) and shift and scale them:
    (z − shift_factor) · scaling_factor, (B, C, H/8, W/8). With ``latents_from`` (a
    :func:`~hra_diffusion.train.cache.latent_cache`) the distribution comes from the cache."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    with torch.no_grad():
        if latents_from is None:
            distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
        else:
            distribution = DiagonalGaussianDistribution(latents_from(pixels))
        latents = distribution.sample(generator=generator)
    shift = vae.config.shift_factor or 0.0
    return (latents - shift) * vae.config.scaling_factor


def sample_times(
    noise_scheduler: diffusers.FlowMatchEulerDiscreteScheduler,
    batch_size: int,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw u ∈ [0, 1) per example by ``--weighting_scheme`` and take the training schedule's
    timestep and σ at index ⌊1000 u⌋: (B,) and (B,), as diffusers' scripts do."""
    u = compute_density_for_timestep_sampling(
        args.weighting_scheme,
        batch_size,
        args.logit_mean,
        args.logit_std,
        args.mode_scale,
        generator=generator,
    )
    indices = (u * noise_scheduler.config.num_train_timesteps).long()
    return noise_scheduler.timesteps[indices], noise_scheduler.sigmas[indices]


def noise_latents(
    latents: torch.Tensor,
    noise_scheduler: diffusers.FlowMatchEulerDiscreteScheduler,
    args: argparse.Namespace,
    generator: torch.Generator,
) -> tuple[FlowSample, torch.Tensor]:
    """x_σ = (1 − σ) x_0 + σ ε for ε ~ N(0, I) and σ from :func:`sample_times` (the noise
    first, then the times, from ``generator``); returns the sample and ε."""
    device, dtype = latents.device, latents.dtype
    noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
    timesteps, sigmas = sample_times(noise_scheduler, latents.shape[0], args, generator)
    sigmas = sigmas.to(device, dtype).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    return FlowSample(latents, noisy, sigmas, timesteps.to(device)), noise


def flow_matching_loss(
    prediction: torch.Tensor,
    sample: FlowSample,
    noise: torch.Tensor,
    args: argparse.Namespace,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted (masked) squared error of a velocity prediction v̂ (B, C, h, w):
    mean over examples of w(σ) · mean((v̂ − (ε − x_0))²), or with ``--precondition_outputs``
    of w(σ) · mean((x_σ − σ v̂ − x_0)²). ``mask`` (B, 1, H, W) weights pixels as in
    :func:`~hra_diffusion.train.loss.diffusion_loss`. Returns an fp32 scalar."""
    target = noise - sample.latents
    if getattr(args, "precondition_outputs", False):
        prediction = sample.noisy - sample.sigmas * prediction
        target = sample.latents
    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sample.sigmas.float())
    error = weighting * (prediction.float() - target.float()) ** 2  # (B, C, h, w)
    if mask is not None:
        error = error * F.interpolate(mask.float(), size=error.shape[-2:], mode="area")
    return error.mean(dim=(1, 2, 3)).mean()


def chunk_sample(sample: FlowSample, noise: torch.Tensor) -> list[tuple[FlowSample, torch.Tensor]]:
    """Split a batch of instance then class examples into its two halves (prior
    preservation): [(instance sample, noise), (class sample, noise)]."""
    halves = zip(
        sample.latents.chunk(2),
        sample.noisy.chunk(2),
        sample.sigmas.chunk(2),
        sample.timesteps.chunk(2),
        noise.chunk(2),
        strict=True,
    )
    return [(FlowSample(*parts[:4]), parts[4]) for parts in halves]
