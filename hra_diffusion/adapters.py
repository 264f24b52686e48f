"""Named HRA adapters, diffusers-style: several per model, chosen, stacked and removed by name.

``load_hra_weights(pipe, path, adapter_name="dog")`` keeps every adapter loaded under a
name in a registry on each component (``model.hra_registry``) and puts HRA layers into
the model for the *active* ones only:

- one active adapter: its layers hold that adapter's own ``hra_u`` tensors;
- several active adapters ``[a, b, ...]``: each layer computes W H_a H_b ⋯ (in that
  order), exactly. A product of Householder products is one with the columns
  concatenated, [U_a | U_b | ...]; a Gram–Schmidt adapter (H = I − 2QQᵀ) enters as
  its orthonormal Q, whose r reflections multiply to the same H. Adapters with a
  magnitude (``HRAConfig.magnitude``, W ↦ diag(m) W H) compose the same way, applied
  one after the other: diag(m_a ⊙ m_b ⊙ ⋯) W H_a H_b ⋯, the product of the magnitudes of
  those that have one (diagonal factors on the left commute, so their order is moot);
- no active adapter (``disable_hra``): the original modules, untouched.

Switching rebuilds the layers around the original modules, whose weights are never
written to (unless you ``merge_hra``), so ``unload_hra`` gives back the base bit for
bit. Strength (W + s·ΔW) is not an HRA notion: use the LoRA export and diffusers'
``set_adapters(names, adapter_weights)`` for that.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from hra_diffusion.batched import sync_bank
from hra_diffusion.config import HRAConfig
from hra_diffusion.functional import gram_schmidt
from hra_diffusion.injection import hra_layers
from hra_diffusion.layer import wrap_layer

REGISTRY_ATTRIBUTE = "hra_registry"
"""Name of the attribute holding a model's :class:`AdapterRegistry`."""


@dataclass
class NamedAdapter:
    """One named adapter of one model: ``{module path: U (d, r)}``, its config and, for an
    adapter with a magnitude, ``{module path: m (d_out,)}``."""

    tensors: dict[str, nn.Parameter]
    config: HRAConfig
    magnitudes: dict[str, nn.Parameter] = field(default_factory=dict)


@dataclass
class AdapterRegistry:
    """A model's named adapters (in load order), the active names and the on/off switch."""

    adapters: dict[str, NamedAdapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    enabled: bool = True


def registry(model: nn.Module) -> AdapterRegistry | None:
    """The model's registry of named adapters, or None if it holds none."""
    return getattr(model, REGISTRY_ATTRIBUTE, None)


def _components(target: object) -> dict[str, nn.Module]:
    """``{component name: model}`` of a pipeline (``{"": model}`` for a single model)."""
    if isinstance(target, nn.Module):
        return {"": target}
    components = getattr(target, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"Expected an nn.Module or a diffusers pipeline, got {type(target).__name__}."
        )
    return {name: m for name, m in components.items() if isinstance(m, nn.Module)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adopt_unnamed(target: object, name: str = "default") -> None:
    """Register HRA layers put in without a name (``inject_hra``, a plain load) as ``name``,
    in every component of ``target`` that has some and no registry yet."""
    for model in _components(target).values():
        layers = list(hra_layers(model))
        if not layers or registry(model) is not None:
            continue
        first = layers[0][1]
        config = getattr(model, "hra_config", None) or HRAConfig(
            first.r, tuple(n for n, _ in layers), first.apply_gs, magnitude=first.hra_m is not None
        )
        magnitudes = {n: layer.hra_m for n, layer in layers if layer.hra_m is not None}
        adapter = NamedAdapter({n: layer.hra_u for n, layer in layers}, config, magnitudes)
        setattr(model, REGISTRY_ATTRIBUTE, AdapterRegistry({name: adapter}, [name]))


def add_adapter(
    model: nn.Module,
    name: str,
    tensors: dict[str, torch.Tensor],
    config: HRAConfig,
    magnitudes: dict[str, torch.Tensor] | None = None,
) -> None:
    """Register ``{module path: U}`` (paths already checked against ``model``) as ``name``,
    with ``{module path: m}`` for an adapter with a magnitude.

    The model's layers change on the next :func:`set_hra_adapters` (or :func:`rebuild`).
    """
    reg = registry(model) or AdapterRegistry()
    if name in reg.adapters:
        raise ValueError(
            f"An HRA adapter named {name!r} is already loaded; pick another adapter_name or "
            f"delete_hra_adapters(target, {name!r}) first."
        )
    params = {
        path: nn.Parameter(u.detach().to(torch.float32).clone()) for path, u in tensors.items()
    }
    mags = {
        path: nn.Parameter(m.detach().to(torch.float32).clone())
        for path, m in (magnitudes or {}).items()
    }
    reg.adapters[name] = NamedAdapter(params, config, mags)
    setattr(model, REGISTRY_ATTRIBUTE, reg)


def _plain_columns(adapter: NamedAdapter, path: str) -> torch.Tensor:
    """U (d, r) whose r reflections multiply to the adapter's H (Gram–Schmidt: its Q)."""
    u = adapter.tensors[path].detach()
    return gram_schmidt(u.to(torch.float32)) if adapter.config.apply_gs else u  # (d, r)


def _composite_magnitude(holders: list[NamedAdapter], path: str) -> nn.Parameter | None:
    """The product of the magnitudes (d_out,) that ``holders`` have at ``path`` (None if
    none has one), frozen: diag(m_a) ⋯ diag(m_b) W H_a ⋯ H_b = diag(m_a ⊙ ⋯ ⊙ m_b) W H_a ⋯ H_b."""
    mags = [a.magnitudes[path].detach() for a in holders if path in a.magnitudes]
    if not mags:
        return None
    m = nn.Parameter(torch.stack(mags).prod(dim=0))  # (d_out,)
    m.requires_grad_(False)  # a composite of several adapters: for inference
    return m


def _check_unmerged(models: Iterable[nn.Module]) -> None:
    for model in models:
        for name, layer in hra_layers(model):
            if layer.merged:
                raise ValueError(
                    f"{name} is merged: call unmerge_hra before switching, enabling, disabling "
                    "or deleting adapters."
                )


def _restore_base(model: nn.Module) -> None:
    _check_unmerged([model])
    for name, layer in list(hra_layers(model)):
        _set_submodule(model, name, layer.base_layer)


def rebuild(model: nn.Module) -> None:
    """Put HRA layers for the registry's active adapters around the original modules."""
    reg = registry(model)
    _restore_base(model)
    active = [reg.adapters[n] for n in reg.active] if reg.enabled else []
    paths = list(dict.fromkeys(path for adapter in active for path in adapter.tensors))
    for path in paths:
        module = model.get_submodule(path)
        holders = [adapter for adapter in active if path in adapter.tensors]
        if len(holders) == 1:
            u, apply_gs = holders[0].tensors[path], holders[0].config.apply_gs
            m = holders[0].magnitudes.get(path)
        else:
            u = nn.Parameter(torch.cat([_plain_columns(a, path) for a in holders], dim=1))
            u.requires_grad_(False)  # a composite of several adapters: for inference
            apply_gs = False
            m = _composite_magnitude(holders, path)
        with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the RNG
            layer = wrap_layer(path, module, u.shape[1], apply_gs, magnitude=m is not None)
        u.data = u.data.to(module.weight.device)
        layer.hra_u = u
        if m is not None:
            m.data = m.data.to(module.weight.device)
            layer.hra_m = m
        _set_submodule(model, path, layer)
    if len(active) == 1:
        model.hra_config = active[0].config
    elif hasattr(model, "hra_config"):
        del model.hra_config
    sync_bank(model)  # batched factors for the layers just put in


def _registries(target: object) -> dict[str, AdapterRegistry]:
    regs = {n: registry(m) for n, m in _components(target).items()}
    return {n: r for n, r in regs.items() if r is not None}


def _names(names: str | Iterable[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def list_hra_adapters(target: object) -> dict[str, list[str]]:
    """``{component: [adapter names]}`` in load order (component ``""`` for a single model).

    Example:
        >>> list_hra_adapters(pipe)  # doctest: +SKIP
        {'unet': ['dog', 'cat'], 'text_encoder': ['dog']}
    """
    return {n: list(r.adapters) for n, r in _registries(target).items()}


def get_active_hra_adapters(target: object) -> list[str]:
    """The active adapter names, in stacking order (empty while disabled).

    Example:
        >>> get_active_hra_adapters(pipe)  # doctest: +SKIP
        ['dog']
    """
    names: list[str] = []
    for reg in _registries(target).values():
        names += [n for n in reg.active if reg.enabled and n not in names]
    return names


def set_hra_adapters(target: object, names: str | Iterable[str]) -> None:
    """Make ``names`` the active adapters; several stack as W H_{names[0]} H_{names[1]} ⋯.

    Each component activates the names it holds (an adapter without text-encoder
    weights leaves the text encoder at its base). Raises ``ValueError`` naming an
    adapter no component holds, before anything changes.

    Example:
        >>> set_hra_adapters(pipe, ["dog", "style"])  # doctest: +SKIP
    """
    names = _names(names)
    regs = _registries(target)
    known = {n for reg in regs.values() for n in reg.adapters}
    for name in names:
        if name not in known:
            raise ValueError(
                f"No HRA adapter named {name!r} is loaded; loaded: {sorted(known) or 'none'}."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"set_hra_adapters: {names} names an adapter twice.")
    models = _components(target)
    _check_unmerged(models[component] for component in regs)
    for component, reg in regs.items():
        reg.active = [n for n in names if n in reg.adapters]
        reg.enabled = True
        rebuild(models[component])


def _switch(target: object, enabled: bool) -> None:
    models = _components(target)
    regs = _registries(target)
    if not regs:
        raise ValueError("No named HRA adapters are loaded (load_hra_weights(..., adapter_name=)).")
    _check_unmerged(models[component] for component in regs)
    for component, reg in regs.items():
        reg.enabled = enabled
        rebuild(models[component])


def disable_hra(target: object) -> None:
    """Run the base model (original modules) while keeping every adapter loaded.

    Example:
        >>> disable_hra(pipe); enable_hra(pipe)  # doctest: +SKIP
    """
    _switch(target, False)


def enable_hra(target: object) -> None:
    """Undo :func:`disable_hra`: the active adapters apply again."""
    _switch(target, True)


def delete_hra_adapters(target: object, names: str | Iterable[str]) -> None:
    """Remove adapters from memory; the remaining active ones stay active.

    Example:
        >>> delete_hra_adapters(pipe, "cat")  # doctest: +SKIP
    """
    names = _names(names)
    regs = _registries(target)
    known = {n for reg in regs.values() for n in reg.adapters}
    for name in names:
        if name not in known:
            raise ValueError(
                f"No HRA adapter named {name!r} is loaded; loaded: {sorted(known) or 'none'}."
            )
    models = _components(target)
    _check_unmerged(models[component] for component in regs)
    for component, reg in regs.items():
        for name in names:
            reg.adapters.pop(name, None)
        reg.active = [n for n in reg.active if n in reg.adapters]
        rebuild(models[component])
        if not reg.adapters:
            delattr(models[component], REGISTRY_ATTRIBUTE)
