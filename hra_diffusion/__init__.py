"""hra-diffusion: Householder Reflection Adaptation for Stable Diffusion at LoRA's cost.

The public names below load their module on first use, so ``import hra_diffusion`` (and
every command line's ``--help``) stays as fast as importing torch: the control encoder's
diffusers modules and peft load only when a function that needs them is called.
"""

from __future__ import annotations

import importlib
from typing import Any

from hra_diffusion import _quiet  # noqa: F401  (first: before peft and diffusers load)

__version__ = "0.1.0"

_HOMES = {
    "hra_diffusion.adapters": (
        "delete_hra_adapters",
        "disable_hra",
        "enable_hra",
        "get_active_hra_adapters",
        "list_hra_adapters",
        "set_hra_adapters",
    ),
    "hra_diffusion.config": (
        "FLUX_TARGETS",
        "HRAConfig",
        "SD3_TARGETS",
        "TEXT_ENCODER_ATTENTION_TARGETS",
        "UNET_ATTENTION_FF_TARGETS",
        "UNET_ATTENTION_TARGETS",
    ),
    "hra_diffusion.control": (
        "attach_condition_encoder",
        "build_condition_encoder",
        "detach_condition_encoder",
        "load_control_weights",
        "save_control_weights",
    ),
    "hra_diffusion.formats.glora": ("export_glora",),
    "hra_diffusion.formats.hra": ("atomic_save_file", "load_hra_weights", "save_hra_weights"),
    "hra_diffusion.formats.lora": ("export_lora",),
    "hra_diffusion.formats.peft": ("save_peft_adapter",),
    "hra_diffusion.injection": (
        "hra_layers",
        "hra_parameters",
        "hra_state_dict",
        "inject_hra",
        "merge_hra",
        "orthogonality_loss",
        "unload_hra",
        "unmerge_hra",
    ),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the module holding a public name the first time it is asked for."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'hra_diffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
