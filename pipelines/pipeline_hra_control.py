"""Stable Diffusion with an HRA-adapted UNet and a condition encoder: controllable sampling.

:class:`StableDiffusionHRAControlPipeline` is a ``StableDiffusionPipeline`` whose
``__call__`` also takes the control image ``image=``. The image is turned into a
(B, 3, H, W) tensor in [0, 1] and handed to the UNet for the whole denoising loop
(see :mod:`hra_diffusion.control`), so every scheduler and every option of the base
pipeline works unchanged. Defaults follow the paper: DDIM, 50 steps, guidance 9.0.
Controllable generation is Stable Diffusion 1.x/2.x only for now: an SDXL base is refused
before anything loads.
"""

from __future__ import annotations

import os
from typing import Any

import diffusers
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from hra_diffusion.control import condition_encoder_of, control_condition, load_control_weights
from hra_diffusion.errors import InputError
from hra_diffusion.families import FAMILY_NAMES, base_family

ControlImage = PIL.Image.Image | torch.Tensor | list[PIL.Image.Image] | list[torch.Tensor]


class StableDiffusionHRAControlPipeline(diffusers.StableDiffusionPipeline):
    """Text-to-image generation steered by a control image (edges, segmentation, …).

    Example:
        >>> pipe = StableDiffusionHRAControlPipeline.from_base(  # doctest: +SKIP
        ...     "runwayml/stable-diffusion-v1-5", "out/hra_control_weights.safetensors"
        ... )
        >>> edges = canny_edges(Image.open("photo.png"))  # doctest: +SKIP
        >>> image = pipe("a house by a lake", image=edges,  # doctest: +SKIP
        ...              generator=torch.Generator().manual_seed(0)).images[0]
    """

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> StableDiffusionHRAControlPipeline:
        """``StableDiffusionPipeline.from_pretrained`` for a Stable Diffusion 1.x/2.x base.

        Raises:
            ValueError: the base is a Stable Diffusion XL pipeline (one line; nothing loaded).
        """
        path = str(pretrained_model_name_or_path)
        family = base_family(path, kwargs.get("revision"))
        if family != "sd":
            raise InputError(
                f"{path} is a {FAMILY_NAMES[family]} pipeline, but controllable generation "
                f"supports {FAMILY_NAMES['sd']} bases only for now; pass such a base."
            )
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def from_base(
        cls,
        base_path: str | os.PathLike,
        weights_path: str | os.PathLike,
        use_ddim: bool = True,
        **kwargs: Any,
    ) -> StableDiffusionHRAControlPipeline:
        """Load a Stable Diffusion folder and add the control weights file to its UNet.

        ``use_ddim`` swaps in DDIM (the paper's sampler) built from the base scheduler's
        config; assign ``pipe.scheduler`` afterwards for any other scheduler. ``kwargs``
        go to ``from_pretrained`` (e.g. ``torch_dtype=torch.float16``).
        """
        pipe = cls.from_pretrained(base_path, **kwargs)
        load_control_weights(pipe.unet, weights_path)
        if use_ddim:
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe

    def prepare_control_image(
        self, image: ControlImage, height: int | None, width: int | None, batch_size: int
    ) -> torch.Tensor:
        """(batch_size, 3, H, W) in [0, 1]: one image for all, or one per prompt row.

        Images are resized nearest-neighbour to (height, width) when those are given, so
        segmentation colours and edge pixels stay as they are; otherwise the size of the
        image (rounded down to a multiple of the VAE factor) is kept.
        """
        processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_convert_rgb=True,
            do_normalize=False,
            resample="nearest",
        )
        cond = processor.preprocess(image, height=height, width=width)  # (n, 3, H, W)
        if cond.shape[0] not in (1, batch_size):
            raise ValueError(
                f"Got {cond.shape[0]} control images for {batch_size} prompts; pass one image, "
                "or one per prompt."
            )
        return cond.expand(batch_size, -1, -1, -1).contiguous()  # (batch_size, 3, H, W)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ControlImage | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 9.0,
        num_images_per_prompt: int = 1,
        **kwargs: Any,
    ):
        """Generate with control ``image``; every other argument is the base pipeline's.

        ``height`` and ``width`` default to the control image's size.
        """
        if image is None:
            raise ValueError("Pass the control image: pipe(prompt, image=control_image).")
        if condition_encoder_of(self.unet) is None:
            raise ValueError(
                "The UNet has no condition encoder: build the pipeline with from_base(), or "
                "call load_control_weights(pipe.unet, path)."
            )
        if prompt is None:
            prompt_embeds = kwargs.get("prompt_embeds")
            if prompt_embeds is None:
                raise ValueError("Pass prompt= or prompt_embeds=.")
            batch_size = prompt_embeds.shape[0]
        else:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        cond = self.prepare_control_image(image, height, width, batch_size)  # (B, 3, H, W)
        cond = cond.repeat_interleave(num_images_per_prompt, dim=0)  # (B·n, 3, H, W)
        with control_condition(self.unet, cond.to(self._execution_device)):
            return super().__call__(
                prompt=prompt,
                height=cond.shape[-2],
                width=cond.shape[-1],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                **kwargs,
            )
