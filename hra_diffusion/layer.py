"""HRA layers: a frozen nn.Linear or nn.Conv2d whose weight W is used as W H.

The trainable tensor is ``hra_u`` (d, r), PEFT's name and layout, and with
``magnitude=True`` also ``hra_m`` (d_out,), the magnitude of diag(m) W H; the wrapped
module lives under ``base_layer``. The math is in :mod:`hra_diffusion.functional`.
Inside a model, the factors V and V C come precomputed for all layers at once
(:mod:`hra_diffusion.batched`); a layer used on its own computes its own.
"""

from __future__ import annotations

import torch
from torch import nn

from hra_diffusion.functional import (
    factored_conv2d,
    factored_linear,
    hra_conv2d,
    hra_linear,
    initial_u,
    matmul_dtype,
    merged_weight,
)


class HRALayer(nn.Module):
    """Common state of an adapted layer: the base layer, ``hra_u``, the optional magnitude
    ``hra_m`` (None without one) and the merge flag."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        apply_gs: bool,
        init: str = "paper",
        magnitude: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.apply_gs = apply_gs
        self.merged = False
        weight = base_layer.weight
        d = weight[0].numel()  # in_features, or in·kh·kw for a conv
        u = initial_u(d, r, apply_gs, init=init).to(weight.device)  # (d, r), fp32 always
        self.hra_u = nn.Parameter(u)
        self.register_parameter("hra_m", None)  # (d_out,) with a magnitude, else None
        if magnitude:  # ones: diag(m) W H = W H at step 0
            self.hra_m = nn.Parameter(torch.ones(weight.shape[0], device=weight.device))  # (d_out,)
        self.factors: tuple | None = None  # (V, −V C, hra_u version, grad mode, dtype)

    def current_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(V, −V C) from the model's batched pre-hook, if computed for the current state."""
        if self.factors is None:
            return None
        v, minus_vc, version, grad, dtype = self.factors
        if torch.compiler.is_compiling():  # traced together with the pre-hook that set them
            return v, minus_vc
        current = (self.hra_u._version, torch.is_grad_enabled(), matmul_dtype(self.weight))
        return (v, minus_vc) if (version, grad, dtype) == current else None

    def __getstate__(self) -> dict:
        """Copies and pickles leave the cached factors behind (they belong to one graph)."""
        state = self.__dict__.copy()
        state["factors"] = None
        return state

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads ``layer.weight`` keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold H (and the magnitude) into the base weight: W ← diag(m) W H (fp32 math)."""
        if self.merged:
            raise RuntimeError("This HRA layer is already merged; call unmerge() first.")
        w = self.base_layer.weight
        w.copy_(merged_weight(w, self.hra_u, self.apply_gs, magnitude=self.hra_m))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: W ← diag(1/m) W Hᵀ, since H is orthogonal (``ValueError`` if
        some m is 0, and the layer stays merged)."""
        if not self.merged:
            raise RuntimeError("This HRA layer is not merged; there is nothing to unmerge.")
        w = self.base_layer.weight
        w.copy_(merged_weight(w, self.hra_u, self.apply_gs, inverse=True, magnitude=self.hra_m))
        self.merged = False

    def extra_repr(self) -> str:
        magnitude = self.hra_m is not None
        return f"r={self.r}, apply_gs={self.apply_gs}, magnitude={magnitude}, merged={self.merged}"


class HRALinear(HRALayer):
    """``nn.Linear`` with weight W H."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        factors = self.current_factors()
        if factors is None:
            return hra_linear(x, base.weight, base.bias, self.hra_u, self.apply_gs, self.hra_m)
        return factored_linear(x, base.weight, base.bias, *factors, self.hra_m)


class HRAConv2d(HRALayer):
    """``nn.Conv2d`` (groups=1, zero padding) with its flattened weight W used as W H."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        base = self.base_layer
        geometry = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
        m = self.hra_m
        factors = self.current_factors()
        if factors is None:
            return hra_conv2d(
                x, base.weight, base.bias, self.hra_u, self.apply_gs, **geometry, magnitude=m
            )
        return factored_conv2d(x, base.weight, base.bias, *factors, **geometry, magnitude=m)


def wrap_layer(
    name: str,
    module: nn.Module,
    r: int,
    apply_gs: bool,
    init: str = "paper",
    magnitude: bool = False,
) -> HRALayer:
    """Wrap a supported module, or raise ``TypeError`` naming it. ``init`` chooses how
    ``hra_u`` starts (:func:`~hra_diffusion.functional.initial_u`); ``magnitude`` adds
    ``hra_m``, ones."""
    if isinstance(module, nn.Linear):
        return HRALinear(module, r, apply_gs, init, magnitude)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TypeError(
                f"HRA supports Conv2d with groups=1 only; {name} has groups={module.groups}."
            )
        if module.padding_mode != "zeros":
            raise TypeError(
                f"HRA supports Conv2d with padding_mode='zeros' only; {name} uses "
                f"{module.padding_mode!r}."
            )
        return HRAConv2d(module, r, apply_gs, init, magnitude)
    raise TypeError(
        f"HRA supports nn.Linear and nn.Conv2d, but target {name} is {type(module).__name__}. "
        "Narrow target_modules so that it does not match this module."
    )
