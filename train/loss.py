"""The diffusion training loss: noising, SNR weighting and the masked MSE.

For timesteps t with ᾱ_t from the noise schedule, :func:`noisy_latents` draws
x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε; the target is ε (epsilon) or v = √ᾱ_t ε − √(1 − ᾱ_t) x_0
(v_prediction). :func:`snr` is ᾱ_t / (1 − ᾱ_t); :func:`min_snr_weights` (Hang et al. 2023)
and :func:`debiased_weights` (kohya's ``--debiased_estimation_loss``) weight each sample;
:func:`diffusion_loss` is the (masked) weighted MSE.
"""

from __future__ import annotations

import diffusers
import torch
import torch.nn.functional as F

from hra_diffusion.errors import fail
from hra_diffusion.train.args import PREDICTION_TYPES
from hra_diffusion.train.cache import InputCache


def set_prediction_type(
    noise_scheduler: diffusers.DDPMScheduler, prediction_type: str | None
) -> str:
    """Train for ``prediction_type`` (``None``: keep the scheduler's own); returns the type.

    The base's scheduler may predict ``sample``, which these scripts do not train:
    :func:`fail` then asks for ``--prediction_type``.
    """
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    resolved = noise_scheduler.config.prediction_type
    if resolved not in PREDICTION_TYPES:
        fail(
            f"the base model's scheduler predicts {resolved!r}; pass --prediction_type "
            f"{' or '.join(PREDICTION_TYPES)}."
        )
    return resolved


def timestep_upper_bound(
    noise_scheduler: diffusers.DDPMScheduler, min_timestep: int, max_timestep: int | None
) -> int:
    """``--max_timestep`` resolved against the scheduler (``None``: its num_train_timesteps);
    :func:`fail` when the range ``min_timestep <= t < max`` leaves the schedule."""
    num_steps = noise_scheduler.config.num_train_timesteps
    upper = num_steps if max_timestep is None else max_timestep
    if upper > num_steps or min_timestep >= upper:
        fail(
            f"--min_timestep {min_timestep} / --max_timestep {upper} leave the base's "
            f"{num_steps}-step schedule; choose 0 <= min < max <= {num_steps}."
        )
    return upper


def scale_latents(vae: diffusers.AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents in the UNet's scale: ``(z − mean) · scaling_factor / std`` when the VAE
    config has ``latents_mean``/``latents_std`` (as diffusers' SDXL pipeline decodes), else
    ``z · scaling_factor``. (B, C, h, w) -> (B, C, h, w)."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return latents * vae.config.scaling_factor
    mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
    return (latents - mean) * vae.config.scaling_factor / std


def noisy_latents(
    pixels: torch.Tensor,
    vae: diffusers.AutoencoderKL,
    noise_scheduler: diffusers.DDPMScheduler,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    latents_from: InputCache | None = None,
    timestep_range: tuple[int, int | None] = (0, None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ``pixels`` (B, 3, H, W) and noise the latents at random timesteps, uniform
    over ``timestep_range`` = (low, high), low <= t < high (high ``None``: the schedule's
    ``num_train_timesteps``).

    With ``latents_from`` (a :func:`latent_cache`) the VAE's latent distribution comes from
    the cache, and the sample from it is drawn exactly as without.

    Every random draw (VAE sample, noise, timesteps, then the offset noise when
    ``noise_offset`` > 0, in that order) comes from ``generator``, so a resumed run repeats
    an uninterrupted one exactly. The noise offset adds ``noise_offset · N(0, 1)`` per image
    and channel to the noise (Guttenberg 2023, diffusers' ``--noise_offset``). Returns the
    noisy latents (B, 4, H/8, W/8), the timesteps (B,) and the training target: the noise,
    or the velocity ``√ᾱ_t ε − √(1−ᾱ_t) x_0`` for a ``v_prediction`` scheduler.
    """
    device = pixels.device
    with torch.no_grad():
        if latents_from is None:
            distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
        else:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            distribution = DiagonalGaussianDistribution(latents_from(pixels))  # (B, 8, h, w)
        latents = distribution.sample(generator=generator)
        latents = scale_latents(vae, latents)  # (B, 4, H/8, W/8)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    low, high = timestep_range
    high = noise_scheduler.config.num_train_timesteps if high is None else high
    timesteps = torch.randint(low, high, (latents.shape[0],), generator=generator).to(device)
    if noise_offset > 0:
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator)  # (B, 4, 1, 1)
        noise = noise + noise_offset * offset.to(device, latents.dtype)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, 4, H/8, W/8)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, timesteps, noise_scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, noise


def snr(noise_scheduler: diffusers.DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``SNR(t) = ᾱ_t / (1 − ᾱ_t)`` of each timestep: (B,) fp32."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv 2303.09556), as in diffusers' scripts.

    The MSE of an epsilon prediction weighs ``min(SNR, γ) / SNR``, of a v prediction
    ``min(SNR, γ) / (SNR + 1)``; this is the weight ``min(SNR, γ)`` on the x_0 error
    expressed in the predicted quantity. Written as ``min(1, γ / SNR)`` for epsilon, so
    that SNR = 0 (zero-terminal-SNR schedules) gives weight 1, not 0/0. (B,) -> (B,).
    """
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr_values, max=1.0)
    if prediction_type == "v_prediction":
        return torch.clamp(snr_values, max=gamma) / (snr_values + 1.0)
    raise ValueError(f"min-SNR weights need epsilon or v_prediction, got {prediction_type!r}")


def debiased_weights(snr_values: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """kohya's debiased-estimation loss weights (Yu et al. 2024, arXiv 2310.08442):
    ``1 / sqrt(SNR)`` for epsilon, ``1 / (SNR + 1)`` for v prediction, with SNR clipped at
    1000 (t = 0 has SNR near infinity). (B,) -> (B,)."""
    clipped = torch.clamp(snr_values, max=1000.0)
    if prediction_type == "epsilon":
        return 1.0 / clipped.sqrt()
    if prediction_type == "v_prediction":
        return 1.0 / (clipped + 1.0)
    raise ValueError(f"debiased weights need epsilon or v_prediction, got {prediction_type!r}")


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: diffusers.DDPMScheduler,
    snr_gamma: float | None = None,
    mask: torch.Tensor | None = None,
    debiased: bool = False,
) -> torch.Tensor:
    """The mean squared error of a batch, optionally masked, min-SNR and debiased weighted.

    ``prediction`` and ``target`` are (B, C, h, w); ``mask`` (B, 1, H, W) is a per-pixel
    weight in [0, 1] at any resolution, area-resized to (h, w) and multiplied into the
    squared error before the per-example mean (kohya's masked loss: a masked-out pixel
    contributes zero, the mean still runs over all pixels). With ``snr_gamma`` each
    example's mean is weighted by :func:`min_snr_weights`, with ``debiased`` by
    :func:`debiased_weights` (both: the product). Returns a scalar (fp32).
    """
    error = (prediction.float() - target.float()) ** 2  # (B, C, h, w)
    if mask is not None:
        error = error * F.interpolate(mask.float(), size=error.shape[-2:], mode="area")
    per_example = error.mean(dim=(1, 2, 3))  # (B,)
    prediction_type = noise_scheduler.config.prediction_type
    if snr_gamma is not None:
        per_example = per_example * min_snr_weights(
            snr(noise_scheduler, timesteps), snr_gamma, prediction_type
        )
    if debiased:
        per_example = per_example * debiased_weights(
            snr(noise_scheduler, timesteps), prediction_type
        )
    return per_example.mean()
