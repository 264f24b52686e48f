"""Caches of frozen encoders' outputs (VAE latents, text embeddings), keyed by input bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import diffusers
import torch
from torch import nn


class InputCache:
    """A frozen encoder's outputs, keyed by the exact bytes of each input row.

    ``cache(inputs)`` (B, ...) encodes only the rows it has not seen (in one batch) and
    returns every row's output, stacked: a tensor (B, ...), or a tuple of them when the
    encoder returns a tuple (SDXL's hidden states and pooled embedding). Used for the VAE's
    latent distribution (``--cache_latents``) and the text encoders' embeddings
    (``--pre_compute_text_embeddings``); outputs stay on the encoder's device.

    Example:
        >>> text = InputCache(lambda ids: text_encoder(ids)[0])  # doctest: +SKIP
        >>> embeddings = text(batch["input_ids"])  # (B, 77, D); each prompt encoded once
    """

    def __init__(
        self, encode: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]
    ) -> None:
        self.encode = encode
        self.outputs: dict[bytes, tuple[torch.Tensor, ...]] = {}
        self.returns_tuple = False

    def __len__(self) -> int:
        return len(self.outputs)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        rows = inputs.detach().cpu().contiguous()
        keys = [_row_key(row) for row in rows]
        missing: dict[bytes, int] = {}  # first row of each input not seen yet
        for i, key in enumerate(keys):
            if key not in self.outputs and key not in missing:
                missing[key] = i
        if missing:
            encoded = self.encode(inputs[list(missing.values())])
            self.returns_tuple = isinstance(encoded, tuple)
            parts = encoded if self.returns_tuple else (encoded,)
            for j, key in enumerate(missing):
                self.outputs[key] = tuple(part[j] for part in parts)
        columns = zip(*(self.outputs[key] for key in keys), strict=True)  # one per output
        stacked = tuple(torch.stack(column) for column in columns)
        return stacked if self.returns_tuple else stacked[0]


def _row_key(row: torch.Tensor) -> bytes:
    header = f"{row.dtype}{tuple(row.shape)}".encode()
    return header + hashlib.sha256(row.numpy().tobytes()).digest()


def latent_cache(vae: diffusers.AutoencoderKL) -> InputCache:
    """:class:`InputCache` of the VAE's latent-distribution parameters (B, 2·4, h, w)."""
    return InputCache(lambda pixels: vae.encode(pixels.to(vae.dtype)).latent_dist.parameters)


def text_embedding_cache(text_encoder: nn.Module) -> InputCache:
    """:class:`InputCache` of the text encoder's last hidden states (B, 77, D)."""
    return InputCache(lambda ids: text_encoder(ids)[0])
