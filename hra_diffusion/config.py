"""HRA configuration and the common target-module lists."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

UNET_ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""Query, key, value and output projections of every UNet attention (the default)."""

UNET_ATTENTION_FF_TARGETS: tuple[str, ...] = UNET_ATTENTION_TARGETS + ("ff.net.0.proj",)
"""UNet attention plus the GEGLU input projection: the paper's controllable setting."""

TEXT_ENCODER_ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
"""Attention projections of the CLIP text encoder."""

SD3_TARGETS: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
"""Every joint-attention projection of an SD3/SD3.5 transformer, image and text streams:
the default of diffusers' ``train_dreambooth_lora_sd3.py``."""

FLUX_TARGETS: tuple[str, ...] = SD3_TARGETS + (
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
"""diffusers' ``train_dreambooth_lora_flux.py`` default: the attention projections of every
block (the single blocks' ``attn.to_q/k/v`` included) and both feed-forwards of the double
blocks. The single blocks' ``proj_mlp`` and ``proj_out`` are not in it; add them with
``--hra_target_modules``."""

INITS: tuple[str, ...] = ("paper", "scaled")
"""Values of :attr:`HRAConfig.init`; see :func:`hra_diffusion.functional.initial_u`."""


@dataclass
class HRAConfig:
    """What to adapt and how.

    Args:
        r: number of Householder reflections per layer. Even r starts exactly at the
            base model (paired columns cancel); odd r cannot, and warns.
        target_modules: module-name suffixes (``"to_out.0"`` matches
            ``"...attn1.to_out.0"``) or regular expressions matched against the
            whole qualified name.
        apply_gs: orthonormalise the reflection vectors with Gram–Schmidt,
            ``H = I - 2 Q Qᵀ`` (the paper's λ = ∞). This does NOT start at the
            identity: the adapted model differs from the base at step 0.
        lambda_orth: weight of the orthogonality regulariser
            ``λ Σ ||I - ÛᵀÛ||²_F``. The library does not add it for you: add
            ``cfg.lambda_orth * orthogonality_loss(model)`` to your loss.
        init: how U starts (:func:`~hra_diffusion.functional.initial_u`). ``"paper"``
            (default): the paper's kaiming-uniform columns, of norm ≈ √(2d/(3r)), so with
            Adam a step moves a layer of input width d by ∝ r/√d. ``"scaled"``: the same
            directions with every column rescaled to norm √r, so the first step moves
            W by about the same relative amount whatever d and r. Both start at H = I
            for even r. Used only when layers are created: loading weights ignores it.
        magnitude: also train a magnitude m (d_out,) per layer, ``hra_m``, initialised to
            ones: the layer computes diag(m) W H (the bias unscaled), so it can change the
            norms of W's rows, which W H alone keeps. Off (default): W H exactly as before.
            Exports: the LoRA export writes it as DoRA; kohya, GLoRA and PEFT HRA refuse it.
    """

    r: int = 8
    target_modules: tuple[str, ...] = field(default=UNET_ATTENTION_TARGETS)
    apply_gs: bool = False
    lambda_orth: float = 0.0
    init: str = "paper"
    magnitude: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"HRAConfig.r must be a positive integer, got {self.r!r}.")
        if not self.target_modules:
            raise ValueError("HRAConfig.target_modules is empty: name at least one module.")
        if self.lambda_orth < 0:
            raise ValueError(f"HRAConfig.lambda_orth must be >= 0, got {self.lambda_orth}.")
        if self.init not in INITS:
            raise ValueError(f"HRAConfig.init must be one of {INITS}, got {self.init!r}.")
        if not isinstance(self.magnitude, bool):
            raise ValueError(f"HRAConfig.magnitude must be True or False, got {self.magnitude!r}.")

    def to_json(self) -> str:
        """Serialise to a JSON string (used in safetensors metadata)."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HRAConfig:
        """Inverse of :meth:`to_json`; unknown fields raise ``ValueError``. JSON written
        before ``init`` existed loads with ``init="paper"``, the only init there was; JSON
        without ``magnitude`` loads with ``magnitude=False``, the only choice there was."""
        data = json.loads(text)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown HRAConfig fields {sorted(unknown)} in {text!r}.")
        return cls(**data)
