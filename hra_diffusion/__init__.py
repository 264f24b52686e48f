"""hra-diffusion: Householder Reflection Adaptation for Stable Diffusion at LoRA's cost."""

from hra_diffusion.config import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_FF_TARGETS,
    UNET_ATTENTION_TARGETS,
    HRAConfig,
)
from hra_diffusion.injection import (
    hra_layers,
    hra_parameters,
    hra_state_dict,
    inject_hra,
    merge_hra,
    orthogonality_loss,
    unload_hra,
    unmerge_hra,
)

__all__ = [
    "HRAConfig",
    "TEXT_ENCODER_ATTENTION_TARGETS",
    "UNET_ATTENTION_FF_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "hra_layers",
    "hra_parameters",
    "hra_state_dict",
    "inject_hra",
    "merge_hra",
    "orthogonality_loss",
    "unload_hra",
    "unmerge_hra",
]
