"""Diffusers pipelines built on the hra_diffusion library."""

from hra_diffusion.pipelines.pipeline_hra_control import StableDiffusionHRAControlPipeline

__all__ = ["StableDiffusionHRAControlPipeline"]
