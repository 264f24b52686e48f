"""An exponential moving average of the trainable weights, saved and resumed by name."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hra_diffusion.errors import fail


class EMA:
    """Exponential moving average of named parameters (fp32), updated after each step.

    ``s ← d·s + (1 − d)·p`` with constant decay ``d``, starting from ``s_0 = p_0``; after k
    updates ``s_k = d^k p_0 + (1 − d) Σ_{i=1..k} d^(k−i) p_i``. :meth:`applied` swaps the
    averages into the live parameters for validation or saving; :meth:`save` /
    :meth:`load` write and read them as safetensors, so a resumed run continues exactly.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float) -> None:
        self.params = dict(params)
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @classmethod
    def of(cls, models: Mapping[str, nn.Module], decay: float) -> EMA:
        """The average of every trainable parameter of ``models``, named ``<key>.<name>``."""
        return cls(
            {
                f"{key}.{name}": p
                for key, model in models.items()
                for name, p in model.named_parameters()
                if p.requires_grad
            },
            decay,
        )

    @torch.no_grad()
    def update(self) -> None:
        """Move every average towards its parameter's current value."""
        for name, p in self.params.items():
            self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averages; afterwards their own values."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def save(self, path: str | os.PathLike) -> None:
        """Write the averages to a safetensors file (keys: the parameter names)."""
        save_file({k: v.cpu().contiguous() for k, v in self.shadow.items()}, str(path))

    def load(self, path: str | os.PathLike) -> None:
        """Read averages written by :meth:`save`; :func:`fail` if the names differ."""
        path = Path(path)
        if not path.is_file():
            fail(
                f"{path.parent} holds no EMA state ({path.name}): it was written without "
                "--use_ema. Resume without --use_ema, or start a new run."
            )
        state = load_file(str(path))
        if set(state) != set(self.shadow):
            fail(f"{path} does not match this model's trainable tensors; resume the same model.")
        for name, value in state.items():
            self.shadow[name].copy_(value)


def ema_weights_name(weights_name: str) -> str:
    """The EMA file beside a weights file: ``hra_weights.safetensors`` -> ``hra_weights_ema...``."""
    stem, dot, suffix = weights_name.rpartition(".")
    return f"{stem}_ema{dot}{suffix}"
