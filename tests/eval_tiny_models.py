"""Tiny random models of the real evaluation classes, saved the way real weights are stored.

Used by the tests/test_eval_*.py files: nothing is downloaded; each model goes through the
same loading code as the real checkpoint (save_pretrained folders, a CLIP state-dict file,
torchvision backbone files in a TORCH_HOME hub cache).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

from hra_diffusion.eval.models import LPIPS_BACKBONE_FILES


def save_tiny_dino(folder: Path) -> Path:
    """A 1-layer ViTModel (DINO architecture) and its image processor, 32 px input."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_clip(path: Path) -> Path:
    """A 1-layer ``clip.model.CLIP`` (ViT, 32 px) saved as a safetensors state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
        import clip

    torch.manual_seed(0)
    model = clip.model.CLIP(
        embed_dim=32,
        image_resolution=32,
        vision_layers=1,
        vision_width=64,
        vision_patch_size=16,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=1,
    )
    save_file(model.state_dict(), str(path))
    return path


def save_tiny_segformer(folder: Path, num_labels: int = 150) -> Path:
    """A small SegformerForSemanticSegmentation (150 ADE20K classes) and its processor."""
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    torch.manual_seed(0)
    config = SegformerConfig(
        num_labels=num_labels,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def write_lpips_backbone(torch_home: Path, net: str) -> Path:
    """Random ImageNet-backbone file for LPIPS in ``torch_home/hub/checkpoints``.

    Convolutions get random He-initialised weights; the classifier head, which LPIPS never
    uses, is stored as a broadcast zero so the file stays small while loading strictly.
    """
    build = {"vgg": torchvision.models.vgg16, "alex": torchvision.models.alexnet}[net]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.startswith("features.") and key.endswith("weight"):
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        else:
            state[key] = torch.zeros(1).expand(shape)
    path = torch_home / "hub" / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def blob_image(seed: int, size: tuple[int, int] = (48, 48)) -> Image.Image:
    """A deterministic RGB image of smooth random colour blobs (has edges and texture)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.NEAREST)


@dataclass(frozen=True)
class TinyModels:
    """Paths of one set of tiny evaluation models; ``torch_home`` holds the LPIPS backbones."""

    dino: Path
    clip: Path
    segformer: Path
    torch_home: Path


def build_tiny_models(root: Path) -> TinyModels:
    """Save every tiny model under ``root`` (a couple of seconds on two CPU cores)."""
    torch_home = root / "torch_home"
    for net in LPIPS_BACKBONE_FILES:
        write_lpips_backbone(torch_home, net)
    return TinyModels(
        dino=save_tiny_dino(root / "dino"),
        clip=save_tiny_clip(root / "clip.safetensors"),
        segformer=save_tiny_segformer(root / "segformer"),
        torch_home=torch_home,
    )


def single_thread() -> Iterator[None]:
    """Generator for a fixture: run torch on one thread, then restore the thread count.

    The tiny models' operations are so small that a second thread only adds synchronisation,
    which becomes very slow when other processes compete for the two cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
