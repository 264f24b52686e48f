"""hra-diffusion: Householder Reflection Adaptation for Stable Diffusion at LoRA's cost."""

from hra_diffusion.config import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_FF_TARGETS,
    UNET_ATTENTION_TARGETS,
    HRAConfig,
)
from hra_diffusion.control import (
    attach_condition_encoder,
    build_condition_encoder,
    detach_condition_encoder,
    load_control_weights,
    save_control_weights,
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
from hra_diffusion.lora_export import export_lora
from hra_diffusion.peft_interop import save_peft_adapter
from hra_diffusion.serialization import atomic_save_file, load_hra_weights, save_hra_weights

__version__ = "0.1.0"

__all__ = [
    "HRAConfig",
    "TEXT_ENCODER_ATTENTION_TARGETS",
    "UNET_ATTENTION_FF_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "atomic_save_file",
    "attach_condition_encoder",
    "build_condition_encoder",
    "detach_condition_encoder",
    "export_lora",
    "hra_layers",
    "hra_parameters",
    "hra_state_dict",
    "inject_hra",
    "load_control_weights",
    "load_hra_weights",
    "merge_hra",
    "orthogonality_loss",
    "save_control_weights",
    "save_hra_weights",
    "save_peft_adapter",
    "unload_hra",
    "unmerge_hra",
]
