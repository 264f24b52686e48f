"""Evaluator models for the procedural world: a tiny CLIP, ViT and SegFormer of the real classes.

No CLIP, DINO or SegFormer weights can reach our machines, so the evaluation code
(``eval/``) ships its own, trained on :mod:`hra_diffusion.world` by
``train/train_world_evaluators.py`` and bundled under ``assets/world-evaluators/``:

- ``clip.safetensors``: clip-anytorch's ``CLIP`` (a ViT image tower and the real
  49,408-token text tower), trained contrastively on world images and their varied
  captions: CLIP-I, CLIP-T and zero-shot caption reading;
- ``vit/``: a transformers ``ViTForImageClassification`` trained **attribute-supervised**
  (shape, object colour, background colour from its CLS token): the DINO slot reads
  that CLS token, :func:`read_vit_attributes` its heads;
- ``segformer/``: a transformers ``SegformerForSemanticSegmentation`` trained on the
  world's label maps (classes ``background, circle, square, triangle``, ids 1..4 with 0
  ignored: ADE20K's convention, so ``eval/evaluate_control.py`` scores it as it is).

This module holds what training and evaluation share: where the files live, the model
configs, and how an attribute is read from a caption or from the models' outputs::

    from hra_diffusion.world.evaluators import caption_attributes
    caption_attributes("a photo of a red qwe circle on a blue background")
    # {'shape': 'circle', 'color': 'red', 'background': 'blue'}
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import SegformerConfig, ViTConfig

from hra_diffusion import world
from hra_diffusion.world.tiny_sd import default_model_path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "world-evaluators"
"""Folder of the bundled evaluator models."""

CLIP_FILE = ASSETS / "clip.safetensors"
"""The tiny CLIP's state dict (``--clip_model``'s default)."""

VIT_DIR = ASSETS / "vit"
"""The attribute-supervised ViT (``--dino_model``'s default)."""

SEGFORMER_DIR = ASSETS / "segformer"
"""The world SegFormer (``--segformer_model``'s default)."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES,
    "color": tuple(world.COLORS),
    "background": tuple(world.COLORS),
}
"""What a world caption names, and the values each can take."""

CLIP_CONTEXT_LENGTH = 32
"""Token context of the tiny CLIP's text tower (world captions need about 14)."""


@dataclass(frozen=True)
class ClipSize:
    """Widths and depths of a clip-anytorch ``CLIP`` with a ViT image tower.

    clip-anytorch gives every tower ``width // 64`` attention heads, so widths are
    multiples of 64. The vocabulary is the real one (49,408 tokens): ``clip.tokenize``
    emits its ids.
    """

    embed_dim: int = 64
    image_resolution: int = world.SIZE
    vision_layers: int = 2
    vision_width: int = 64
    vision_patch_size: int = 8
    context_length: int = CLIP_CONTEXT_LENGTH
    vocab_size: int = 49408
    transformer_width: int = 64
    transformer_layers: int = 2


def build_clip(size: ClipSize = ClipSize()) -> torch.nn.Module:
    """A randomly initialised clip-anytorch ``CLIP`` (fp32) of the given size."""
    from clip.model import CLIP

    return CLIP(
        size.embed_dim,
        size.image_resolution,
        size.vision_layers,
        size.vision_width,
        size.vision_patch_size,
        size.context_length,
        size.vocab_size,
        size.transformer_width,
        size.transformer_width // 64,
        size.transformer_layers,
    ).float()


def attribute_labels() -> list[str]:
    """Class names of the ViT's head, in order: ``shape:circle``, …, ``background:black``."""
    return [f"{name}:{value}" for name, values in ATTRIBUTES.items() for value in values]


def attribute_slices() -> dict[str, slice]:
    """Where each attribute's logits sit in the ViT head's output."""
    slices, start = {}, 0
    for name, values in ATTRIBUTES.items():
        slices[name] = slice(start, start + len(values))
        start += len(values)
    return slices


def vit_config(
    hidden_size: int = 64, layers: int = 3, heads: int = 2, patch_size: int = 8
) -> ViTConfig:
    """Config of the attribute-supervised ViT: 64 px input, one logit per attribute value."""
    labels = attribute_labels()
    return ViTConfig(
        image_size=world.SIZE,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def segformer_config(
    hidden_sizes: tuple[int, ...] = (16, 32, 64, 128), decoder_hidden_size: int = 64
) -> SegformerConfig:
    """Config of the world SegFormer: 4 stages, a class per :data:`hra_diffusion.world.LABELS`."""
    labels = list(world.LABELS)
    return SegformerConfig(
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        hidden_sizes=list(hidden_sizes),
        num_attention_heads=[1, 2, 4, 8],
        sr_ratios=[8, 4, 2, 1],
        decoder_hidden_size=decoder_hidden_size,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def caption_attributes(text: str) -> dict[str, str | None]:
    """The shape, object colour and background colour a world caption names (``None``: unnamed).

    Reads every form of :func:`hra_diffusion.world.sample_caption`: the background is the
    colour before "background", the object colour any other colour word.
    """
    words = text.lower().replace(",", " ").split()
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    for i, word in enumerate(words):
        if word in world.SHAPES and found["shape"] is None:
            found["shape"] = word
        elif word in world.COLORS:
            before_background = i + 1 < len(words) and words[i + 1] == "background"
            key = "background" if before_background else "color"
            if found[key] is None:
                found[key] = word
    return found


def consistent(named: dict[str, str | None], scene: world.Scene) -> bool:
    """Whether every attribute a caption names (:func:`caption_attributes`) holds for ``scene``."""
    return all(value is None or getattr(scene, key) == value for key, value in named.items())


def all_full_captions() -> list[tuple[world.Scene, str]]:
    """Every full caption of the world ("a red circle on a blue background"), 90 in all,
    each with a scene of its attributes (centred, mid-sized)."""
    out = []
    for shape, color, background in itertools.product(world.SHAPES, world.COLORS, world.COLORS):
        if color != background:
            scene = world.Scene(shape, color, background, world.SIZE / 2, world.SIZE / 2, 16.0)
            out.append((scene, world.caption(scene)))
    return out


def read_vit_attributes(logits: torch.Tensor) -> list[dict[str, str]]:
    """The attribute values a ViT head predicts, one dict per row of ``logits`` (B, 15)."""
    picks = {
        name: logits[:, where].argmax(dim=1).tolist()  # (B,)
        for name, where in attribute_slices().items()
    }
    return [
        {name: ATTRIBUTES[name][picks[name][b]] for name in ATTRIBUTES}
        for b in range(logits.shape[0])
    ]


@torch.no_grad()
def vae_round_trip(
    images: torch.Tensor, seed: int, noise: float = 0.15, batch: int = 64
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] encoded by the bundled VAE, perturbed, decoded.

    The latent perturbation (Gaussian, ``noise`` times the latents' std) mimics an imperfect
    denoiser, so that blurs and colour shifts of generated images are in the data.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(default_model_path() / "vae").eval()
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty_like(images)
    for start in range(0, len(images), batch):
        x = images[start : start + batch] * 2 - 1  # (b, 3, H, W)
        latents = vae.encode(x).latent_dist.mode()  # (b, 4, h, w)
        perturbation = torch.randn(latents.shape, generator=generator)
        latents = latents + noise * latents.std() * perturbation
        decoded = vae.decode(latents).sample  # (b, 3, H, W)
        out[start : start + batch] = ((decoded + 1) / 2).clamp(0, 1)
    return out
