"""The reflection factors of all HRA layers of a model, computed once per forward, batched.

Each HRA layer needs V and −V C (see :mod:`hra_diffusion.functional`) before it can run
its two rank-r products. Computed layer by layer, that small algebra (norms, ÛᵀÛ, the
WY factor, and their gradients) is a chain of tiny kernels repeated for every adapted
layer, in forward and backward: on a GPU at small batch it costs more launches than the
adapter's real work. :class:`FactorBank` instead groups a model's layers by
(d, r, Gram–Schmidt, dtypes, device), stacks each group's ``hra_u`` and computes all of
the group's factors with :func:`~hra_diffusion.functional.batched_reflection_factors`,
once, in a forward pre-hook of the model. Each layer then reads its slice. A layer's
magnitude ``hra_m``, if it has one, is not part of the factors: the layer applies it to
its own output, after the product (:func:`~hra_diffusion.functional.scale_outputs`).

A layer uses its slice only while it is current: same ``hra_u`` version (no optimizer
step or load since), same grad mode, same matmul dtype. Otherwise (a submodule called on
its own, weights changed in between) it falls back to the per-layer pure functions, which
give the same numbers. Slices stay valid after the forward so that gradient
checkpointing recomputes blocks with the very same factors. Under ``torch.compile`` the
pre-hook and the layers are traced together (compile the model, not a submodule).

:func:`~hra_diffusion.injection.inject_hra`, :func:`~hra_diffusion.load_hra_weights` and
:func:`~hra_diffusion.injection.unload_hra` keep the bank in step with the layers; there is
nothing to call by hand.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from hra_diffusion.functional import batched_reflection_factors, matmul_dtype
from hra_diffusion.layer import HRALayer

BANK_ATTRIBUTE = "_hra_factor_bank"
"""Where a model keeps its :class:`FactorBank` (a plain attribute, not in the state dict)."""


class FactorBank:
    """The HRA layers of one model and the pre-hook that refreshes their factors."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[HRALayer] = []
        self.identities: dict[tuple, torch.Tensor] = {}  # (r, dtype, device) -> I, kept
        self.handle = model.register_forward_pre_hook(self._pre_forward)
        self.collect(model)

    def collect(self, model: nn.Module) -> None:
        """Re-read which HRA layers ``model`` holds (after injection, loading or unloading)."""
        self.layers = [m for m in model.modules() if isinstance(m, HRALayer)]
        for layer in self.layers:
            layer.factors = None

    def remove(self) -> None:
        """Take the pre-hook off and drop every cached slice."""
        self.handle.remove()
        for layer in self.layers:
            layer.factors = None
        self.layers = []

    def _pre_forward(self, model: nn.Module, args: tuple) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Compute V and −V C of every unmerged layer, one batched call per group."""
        groups: dict[tuple, list[HRALayer]] = defaultdict(list)
        for layer in self.layers:
            if not layer.merged:
                groups[group_key(layer)].append(layer)
        grad = torch.is_grad_enabled()
        compiling = torch.compiler.is_compiling()
        for (_, _, apply_gs, _, dtype, _), members in groups.items():
            u = torch.stack([layer.hra_u for layer in members])  # (G, d, r)
            eye = None if compiling else self.identity(u)  # (r, r); a graph constant compiled
            v, minus_vc = batched_reflection_factors(u, apply_gs, eye)  # (G, d, r), (G, d, r)
            v, minus_vc = v.to(dtype), minus_vc.to(dtype)
            for layer, v_i, minus_vc_i in zip(
                members, v.unbind(0), minus_vc.unbind(0), strict=True
            ):
                version = None if compiling else layer.hra_u._version
                layer.factors = (v_i, minus_vc_i, version, grad, dtype)

    def identity(self, u: torch.Tensor) -> torch.Tensor:
        """The (r, r) identity for factors of ``u``, made once per dtype and device."""
        dtype = torch.promote_types(u.dtype, torch.float32)
        key = (u.shape[-1], dtype, u.device)
        if key not in self.identities:
            self.identities[key] = torch.eye(u.shape[-1], dtype=dtype, device=u.device)
        return self.identities[key]


def group_key(layer: HRALayer) -> tuple:
    """Layers with equal keys share one batched factor computation."""
    u, weight = layer.hra_u, layer.base_layer.weight
    return (*u.shape, layer.apply_gs, u.dtype, matmul_dtype(weight), u.device)


def sync_bank(model: nn.Module) -> None:
    """Give ``model`` a bank over its HRA layers, or drop the bank if it holds none."""
    bank = getattr(model, BANK_ATTRIBUTE, None)
    has_layers = any(isinstance(m, HRALayer) for m in model.modules())
    if bank is None and has_layers:
        setattr(model, BANK_ATTRIBUTE, FactorBank(model))
    elif bank is not None and has_layers:
        bank.collect(model)
    elif bank is not None:
        bank.remove()
        delattr(model, BANK_ATTRIBUTE)
