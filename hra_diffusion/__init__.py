"""hra-diffusion: Householder Reflection Adaptation for Stable Diffusion at LoRA's cost."""

from hra_diffusion import _quiet  # noqa: F401  (first: before peft and diffusers load)
from hra_diffusion.adapters import (
    delete_hra_adapters,
    disable_hra,
    enable_hra,
    get_active_hra_adapters,
    list_hra_adapters,
    set_hra_adapters,
)
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
from hra_diffusion.formats.glora import export_glora
from hra_diffusion.formats.hra import atomic_save_file, load_hra_weights, save_hra_weights
from hra_diffusion.formats.lora import export_lora
from hra_diffusion.formats.peft import save_peft_adapter
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

__version__ = "0.1.0"

__all__ = [
    "HRAConfig",
    "TEXT_ENCODER_ATTENTION_TARGETS",
    "UNET_ATTENTION_FF_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "atomic_save_file",
    "attach_condition_encoder",
    "build_condition_encoder",
    "delete_hra_adapters",
    "detach_condition_encoder",
    "disable_hra",
    "enable_hra",
    "export_glora",
    "export_lora",
    "get_active_hra_adapters",
    "hra_layers",
    "hra_parameters",
    "hra_state_dict",
    "inject_hra",
    "list_hra_adapters",
    "load_control_weights",
    "load_hra_weights",
    "merge_hra",
    "orthogonality_loss",
    "save_control_weights",
    "save_hra_weights",
    "save_peft_adapter",
    "set_hra_adapters",
    "unload_hra",
    "unmerge_hra",
]
