"""Diffusers pipelines built on the hra_diffusion library.

The pipeline class loads on first use, so the command lines in this package start fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StableDiffusionHRAControlPipeline"]


def __getattr__(name: str) -> Any:
    """Import the control pipeline the first time it is asked for."""
    if name != "StableDiffusionHRAControlPipeline":
        raise AttributeError(f"module 'hra_diffusion.pipelines' has no attribute {name!r}")
    from hra_diffusion.pipelines.pipeline_hra_control import StableDiffusionHRAControlPipeline

    return StableDiffusionHRAControlPipeline
