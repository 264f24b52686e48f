"""Put HRA layers into a model, and take them out again.

Works on any ``nn.Module`` (a diffusers UNet, a transformers text encoder, …).
``merge_hra``, ``unmerge_hra`` and ``unload_hra`` also accept a diffusers
pipeline and act on every component that holds HRA layers.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from hra_diffusion.batched import sync_bank
from hra_diffusion.config import HRAConfig
from hra_diffusion.functional import orthogonality_penalty
from hra_diffusion.layer import HRALayer, wrap_layer

ADAPTER_SUFFIX = "hra_u"
"""Every HRA layer's reflections are named ``<module path>.hra_u``."""

MAGNITUDE_SUFFIX = "hra_m"
"""A layer's magnitude (``HRAConfig.magnitude``) is named ``<module path>.hra_m``."""

PARAMETER_SUFFIXES: tuple[str, ...] = (ADAPTER_SUFFIX, MAGNITUDE_SUFFIX)
"""The names of every trainable HRA tensor; :func:`hra_parameters` selects by them."""


def target_matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` is a suffix of ``name`` (at a dot) or a regex matching all of it."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _find_targets(model: nn.Module, patterns: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and any(target_matches(name, p) for p in patterns)
    ]


def _no_match_error(model: nn.Module, patterns: tuple[str, ...]) -> ValueError:
    leaves = [name for name, m in model.named_modules() if name and not list(m.children())]
    examples = ", ".join(leaves[:8]) or "(the model has no submodules)"
    return ValueError(
        f"No module matches target_modules={list(patterns)}. "
        f"Some module names in this model: {examples}."
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _record_config(model: nn.Module, config: HRAConfig) -> None:
    previous = getattr(model, "hra_config", None)
    if previous is None:
        model.hra_config = config
        return
    shape = ("r", "apply_gs", "init", "magnitude")
    if any(getattr(previous, f) != getattr(config, f) for f in shape):
        raise ValueError(
            f"This model already holds HRA layers with r={previous.r}, "
            f"apply_gs={previous.apply_gs}, init={previous.init!r}, "
            f"magnitude={previous.magnitude}; a model holds one HRA configuration. Call "
            "unload_hra(model) first, or inject with the same r, apply_gs, init and magnitude."
        )
    targets = previous.target_modules + tuple(
        t for t in config.target_modules if t not in previous.target_modules
    )
    model.hra_config = HRAConfig(
        config.r, targets, config.apply_gs, previous.lambda_orth, config.init, config.magnitude
    )


def inject_hra(model: nn.Module, config: HRAConfig) -> list[str]:
    """Replace every module matched by ``config.target_modules`` with an HRA layer.

    Freezes all parameters of ``model``; only the new ``hra_u`` tensors (and ``hra_m``
    with ``config.magnitude``) train.
    The model is left untouched if any check fails.

    Returns:
        The qualified names of the adapted layers.

    Raises:
        ValueError: nothing matches, or a matched layer already has HRA.
        TypeError: a matched layer is not an ``nn.Linear`` or groups=1 ``nn.Conv2d``.

    Example:
        >>> names = inject_hra(unet, HRAConfig(r=8))  # doctest: +SKIP
    """
    targets = _find_targets(model, config.target_modules)
    if not targets:
        raise _no_match_error(model, config.target_modules)
    for name, module in targets:
        if isinstance(module, HRALayer):
            raise ValueError(
                f"{name} already has an HRA adapter. Call unload_hra(model) before injecting again."
            )
    wrapped = [
        (name, wrap_layer(name, module, config.r, config.apply_gs, config.init, config.magnitude))
        for name, module in targets
    ]
    if config.r % 2 == 1 and not config.apply_gs:
        warnings.warn(
            f"HRA with odd r={config.r} cannot start at the identity: the adapted model differs "
            "from the base model at step 0. Use an even r to start exactly at the base model.",
            stacklevel=2,
        )
    model.requires_grad_(False)
    for name, layer in wrapped:
        _set_submodule(model, name, layer)
    for param in hra_parameters(model):  # adapters injected earlier keep training too
        param.requires_grad_(True)
    _record_config(model, config)
    sync_bank(model)
    return [name for name, _ in wrapped]


def lora_rank_like_hra(
    model: nn.Module, target_modules: Sequence[str], r: int, magnitude: bool = False
) -> tuple[int, int, int]:
    """The LoRA rank whose parameter count on ``target_modules`` is nearest HRA r's, with
    the HRA count and that LoRA's count: the fair partner of HRA r in a comparison.

    HRA has r·d_in parameters per layer (r·d_in + d_out with a ``magnitude``), LoRA
    k·(d_in + d_out) (d_in = in·kh·kw for a conv: its down factor is a kh×kw conv, its up
    factor 1×1). ``model`` is not changed.
    """
    targets = _find_targets(model, tuple(target_modules))
    if not targets:
        raise _no_match_error(model, tuple(target_modules))
    weights = [module.weight for _, module in targets]  # (out, in[, kh, kw])
    hra = sum(w[0].numel() * r + (w.shape[0] if magnitude else 0) for w in weights)
    per_rank = sum(w[0].numel() + w.shape[0] for w in weights)
    rank = max(1, round(hra / per_rank))
    return rank, hra, rank * per_rank


def hra_layers(model: nn.Module) -> Iterator[tuple[str, HRALayer]]:
    """Yield ``(qualified name, layer)`` for every HRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, HRALayer):
            yield name, module


def hra_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable HRA tensors of ``model``, selected by their names ``hra_u`` and
    ``hra_m`` (:data:`PARAMETER_SUFFIXES`)."""
    return [
        p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in PARAMETER_SUFFIXES
    ]


def hra_magnitudes(*models: nn.Module) -> list[nn.Parameter]:
    """The ``hra_m`` tensors of every HRA layer with a magnitude in ``models``."""
    return [
        layer.hra_m for model in models for _, layer in hra_layers(model) if layer.hra_m is not None
    ]


def hra_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module path>.hra_u": Tensor(d_in, r)}`` (PEFT's key suffix and shape), plus
    ``"<module path>.hra_m": Tensor(d_out)`` for layers with a magnitude."""
    state = {}
    for name, layer in hra_layers(model):
        state[f"{name}.{ADAPTER_SUFFIX}"] = layer.hra_u.detach()  # (d_in, r)
        if layer.hra_m is not None:
            state[f"{name}.{MAGNITUDE_SUFFIX}"] = layer.hra_m.detach()  # (d_out,)
    return state


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """Σ over HRA layers of ||I − ÛᵀÛ||²_F (fp32 scalar); multiply by ``lambda_orth``."""
    penalties = [orthogonality_penalty(layer.hra_u) for _, layer in hra_layers(model)]
    if not penalties:
        raise ValueError("orthogonality_loss: the model has no HRA layers; call inject_hra first.")
    return torch.stack(penalties).sum()


def adapted_components(model_or_pipeline: object) -> list[nn.Module]:
    """The modules holding HRA layers (or named adapters, even when disabled): the model
    itself, or a pipeline's components."""
    if isinstance(model_or_pipeline, nn.Module):
        return [model_or_pipeline]
    components = getattr(model_or_pipeline, "components", None)
    if not isinstance(components, dict):
        kind = type(model_or_pipeline).__name__
        raise TypeError(f"Expected an nn.Module or a diffusers pipeline, got {kind}.")
    return [
        m
        for m in components.values()
        if isinstance(m, nn.Module) and (any(hra_layers(m)) or hasattr(m, "hra_registry"))
    ]


def _layers_of(model_or_pipeline: object) -> list[HRALayer]:
    layers = [layer for m in adapted_components(model_or_pipeline) for _, layer in hra_layers(m)]
    if not layers:
        raise ValueError("No HRA layers found; call inject_hra (or load_hra_weights) first.")
    return layers


def merge_hra(model_or_pipeline: object) -> None:
    """Fold every adapter into its base weight, W ← W H (exact, fp32 math).

    Afterwards inference costs exactly what the base model costs.
    """
    for layer in _layers_of(model_or_pipeline):
        if not layer.merged:
            layer.merge()


def unmerge_hra(model_or_pipeline: object) -> None:
    """Undo :func:`merge_hra`: W ← W Hᵀ for every merged layer."""
    for layer in _layers_of(model_or_pipeline):
        if layer.merged:
            layer.unmerge()


def unload_hra(model_or_pipeline: object, merge: bool = False) -> None:
    """Remove every HRA layer, putting the original modules back.

    With ``merge=False`` (default) the original base weights are restored
    (merged layers are unmerged first; layers never merged give back the base bit
    for bit), and named adapters are forgotten. With ``merge=True`` the adapters are
    folded in first, leaving a plain model that computes W H.
    """
    for model in adapted_components(model_or_pipeline):
        for name, layer in list(hra_layers(model)):
            if merge and not layer.merged:
                layer.merge()
            if not merge and layer.merged:
                layer.unmerge()
            _set_submodule(model, name, layer.base_layer)
        sync_bank(model)
        for attribute in ("hra_config", "hra_registry"):  # hra_registry: named adapters
            if hasattr(model, attribute):
                delattr(model, attribute)
