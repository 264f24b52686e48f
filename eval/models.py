"""Loaders and batched wrappers for the evaluation networks.

Every loader accepts a local path as well as a hub id / model name, and turns a missing or
unreadable model into an EvaluationError naming the flag to pass and what it must point to.
Encoders return float32 tensors on the CPU, so callers keep embeddings, never images.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from hra_diffusion.eval.errors import EvaluationError
from PIL import Image
from torchvision.transforms import functional as tvf

LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
HF_FOLDER_CONTENT = (
    "a local folder holding config.json, the weights (model.safetensors or "
    "pytorch_model.bin) and preprocessor_config.json, as written by save_pretrained()"
)


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be a hub id ("owner/name"): ./x, /x, ~/x, a/b/c."""
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    )


def _load_hf(loader, name_or_path: str, flag: str, what: str, **kwargs):
    """Call ``loader.from_pretrained`` and convert hub/OS errors into a clear EvaluationError."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and _looks_like_path(name_or_path):
        raise EvaluationError(
            f"{what} path not found: {name_or_path}; pass {flag} {HF_FOLDER_CONTENT}"
        )
    try:
        return loader.from_pretrained(str(path) if path.exists() else name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise EvaluationError(
            f"could not load the {what} '{name_or_path}' ({error.__class__.__name__}: {error}). "
            f"Without network access pass {flag} with {HF_FOLDER_CONTENT} (HF_HUB_OFFLINE=1 "
            "skips the network retries)."
        ) from error


class DinoEncoder:
    """DINO image embedding: the CLS token of the ViT's last hidden state (after its norm)."""

    def __init__(self, name_or_path: str, device: str) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        config = _load_hf(AutoConfig, name_or_path, "--dino_model", "DINO model")
        extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        self.model = _load_hf(AutoModel, name_or_path, "--dino_model", "DINO model", **extra)
        self.processor = _load_hf(AutoImageProcessor, name_or_path, "--dino_model", "DINO model")
        self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """CLS embeddings (B, D) of a batch of RGB images."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # (B, T, D)
        return hidden[:, 0].float().cpu()  # (B, D)


class ClipEncoder:
    """OpenAI CLIP (clip-anytorch) image and text embeddings."""

    def __init__(self, name_or_path: str, device: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
            import clip

        flag_help = (
            "pass --clip_model with a local OpenAI CLIP checkpoint file (the JIT archive "
            "downloaded by `clip`, e.g. ~/.cache/clip/ViT-B-32.pt, or a CLIP state dict)"
        )
        path = Path(name_or_path).expanduser()
        if name_or_path not in clip.available_models() and not path.is_file():
            raise EvaluationError(
                f"unknown CLIP model '{name_or_path}': neither a name in "
                f"{clip.available_models()} nor an existing file; {flag_help}"
            )
        target = name_or_path if name_or_path in clip.available_models() else str(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation
                self.model, self.preprocess = clip.load(target, device=device, jit=False)
        except Exception as error:  # network errors, unpickling errors, missing keys
            raise EvaluationError(
                f"could not load CLIP model '{name_or_path}' ({error.__class__.__name__}: "
                f"{error}); {flag_help}"
            ) from error
        self.model.eval()
        self.device = device
        self._tokenize = clip.tokenize

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Image embeddings (B, E) of a batch of RGB images."""
        pixels = torch.stack([self.preprocess(image) for image in images])  # (B, 3, R, R)
        dtype = self.model.visual.conv1.weight.dtype
        return self.model.encode_image(pixels.to(self.device, dtype)).float().cpu()  # (B, E)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings (B, E) of a batch of prompts (truncated to the context length)."""
        tokens = self._tokenize(texts, context_length=self.model.context_length, truncate=True)
        return self.model.encode_text(tokens.to(self.device)).float().cpu()  # (B, E)


class LpipsScorer:
    """LPIPS distance (lpips package, linear heads calibrated on human judgements).

    d(x, y) = sum_l mean_hw || w_l ⊙ (f_l(x) - f_l(y)) ||², f_l unit-normalised features.
    """

    def __init__(self, net: str, device: str, size: int) -> None:
        import lpips

        backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
        if not backbone.is_file():
            raise EvaluationError(
                f"LPIPS ({net}) needs torchvision's ImageNet backbone file {backbone}, which is "
                "fetched from download.pytorch.org and cannot be downloaded offline. Copy "
                f"{backbone.name} there, or set TORCH_HOME=DIR with DIR/hub/checkpoints/"
                f"{backbone.name} (choose the backbone with --lpips_net)."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
            self.model = lpips.LPIPS(net=net, pretrained=True, verbose=False)
        self.model.to(device).eval()
        self.device = device
        self.size = size

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) tensor in [-1, 1]: shorter side resized to S, then centre-cropped."""
        image = tvf.center_crop(tvf.resize(image, self.size), [self.size, self.size])
        return tvf.to_tensor(image) * 2.0 - 1.0  # (3, S, S)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distances (B,) between the paired batches x, y of shape (B, 3, S, S) in [-1, 1]."""
        out = self.model(x.to(self.device), y.to(self.device))  # (B, 1, 1, 1)
        return out.flatten().float().cpu()  # (B,)


class Segmenter:
    """Semantic segmentation (e.g. SegFormer) through transformers' semantic-segmentation API."""

    def __init__(self, name_or_path: str, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        flag = "--segformer_model"
        self.model = _load_hf(
            AutoModelForSemanticSegmentation, name_or_path, flag, "segmentation model"
        )
        self.processor = _load_hf(AutoImageProcessor, name_or_path, flag, "segmentation model")
        self.model.to(device).eval()
        self.device = device
        self.num_classes = int(self.model.config.num_labels)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Predicted label maps, one (H_i, W_i) int64 array per image at ``sizes[i]`` = (H, W).

        Logits are bilinearly upsampled to the ground-truth size before the arg-max.
        """
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]  # (B,3,h,w)
        logits = self.model(pixel_values=pixels.to(self.device)).logits  # (B, K, h/4, w/4)
        maps = []
        for logit, size in zip(logits, sizes, strict=True):
            up = torch.nn.functional.interpolate(
                logit[None].float(), size=size, mode="bilinear", align_corners=False
            )  # (1, K, H, W)
            maps.append(up[0].argmax(dim=0).cpu().numpy())  # (H, W)
        return maps
