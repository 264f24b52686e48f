"""Loaders and batched wrappers for the evaluation networks.

Every loader accepts a local path as well as a hub id / model name, and turns a missing or
unreadable model into an EvaluationError naming the flag to pass and what it must point to.
Encoders return float32 tensors on the CPU, so callers keep embeddings, never images.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import functional as tvf

from hra_diffusion.checks import looks_like_path
from hra_diffusion.eval.errors import EvaluationError

LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
HF_FOLDER_CONTENT = (
    "a local folder holding config.json, model.safetensors and preprocessor_config.json, "
    "as written by save_pretrained() (weights are read from safetensors only, never from "
    "pickled .bin files)"
)


def default_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_hf(loader, name_or_path: str, flag: str, what: str, **kwargs):
    """Call ``loader.from_pretrained`` and convert hub/OS errors into a clear EvaluationError."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and looks_like_path(name_or_path):
        raise EvaluationError(
            f"{what} path not found: {name_or_path}; pass {flag} {HF_FOLDER_CONTENT}"
        )
    try:
        source = str(path) if path.exists() else name_or_path
        return loader.from_pretrained(source, **kwargs)
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
        self.model = _load_hf(
            AutoModel, name_or_path, "--dino_model", "DINO model", use_safetensors=True, **extra
        )
        self.processor = _load_hf(AutoImageProcessor, name_or_path, "--dino_model", "DINO model")
        self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """CLS embeddings (B, D) of a batch of RGB images."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # (B, T, D)
        return hidden[:, 0].float().cpu()  # (B, D)

    @torch.no_grad()
    def token_features(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Patch-token features of every transformer layer, each (B, T - 1, D) (CLS left out):
        the feature stack of the LPIPS-style distance
        (:func:`hra_diffusion.eval.similarity.feature_distance`)."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        out = self.model(pixel_values=pixels.to(self.device), output_hidden_states=True)
        return [h[:, 1:].float().cpu() for h in out.hidden_states[1:]]  # L × (B, T - 1, D)


class AttributeReader:
    """Reads shape, object colour and background of world images with the attribute ViT:
    a ``ViTForImageClassification`` labelled
    :func:`hra_diffusion.world.evaluators.attribute_labels`.
    """

    def __init__(self, name_or_path: str, device: str) -> None:
        from transformers import AutoImageProcessor, ViTForImageClassification

        from hra_diffusion.world.evaluators import attribute_labels

        flag, what = "--vit_model", "attribute ViT"
        self.model = _load_hf(
            ViTForImageClassification, name_or_path, flag, what, use_safetensors=True
        )
        labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        if labels != attribute_labels():
            raise EvaluationError(
                f"{name_or_path} is not an attribute ViT: its labels are {labels[:4]}..., "
                f"expected {attribute_labels()[:4]}...; pass {flag} a folder written by "
                "train/train_world_evaluators.py"
            )
        self.processor = _load_hf(AutoImageProcessor, name_or_path, flag, what)
        self.model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[dict[str, str]]:
        """``{"shape", "color", "background"}`` read from each image of a batch."""
        from hra_diffusion.world.evaluators import read_vit_attributes

        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
        logits = self.model(pixel_values=pixels.to(self.device)).logits  # (B, 15)
        return read_vit_attributes(logits.float().cpu())


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_weights_path(name_or_path: str) -> Path:
    """The safetensors file for ``--clip_model``: a path, or a clip-anytorch model name.

    A name such as ``ViT-B/32`` resolves to ``~/.cache/clip/ViT-B-32.safetensors``.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix == ".safetensors":
        return path
    return Path("~/.cache/clip").expanduser() / (name_or_path.replace("/", "-") + ".safetensors")


class ClipEncoder:
    """OpenAI CLIP (clip-anytorch) image and text embeddings, from a safetensors state dict.

    OpenAI ships CLIP as pickled JIT archives; we never unpickle, so convert one once,
    in an environment you trust, e.g. for ViT-B/32::

        python -c "import clip, safetensors.torch as st; m, _ = clip.load('ViT-B/32', \\
            jit=False); st.save_file(m.float().state_dict(), 'ViT-B-32.safetensors')"
    """

    def __init__(self, name_or_path: str, device: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
            import clip

        path = clip_weights_path(name_or_path)
        if not path.is_file():
            raise EvaluationError(
                f"no CLIP weights for '{name_or_path}': {path} does not exist. Pass --clip_model "
                "with a .safetensors state dict of an OpenAI CLIP model; convert the official "
                'checkpoint once with: python -c "import clip, safetensors.torch as st; '
                "m, _ = clip.load('ViT-B/32', jit=False); "
                "st.save_file(m.float().state_dict(), 'ViT-B-32.safetensors')\""
            )
        try:
            state_dict = load_file(str(path))
            self.model = clip.model.build_model(state_dict).float().to(device).eval()
        except Exception as error:  # truncated file, missing or mismatched keys
            raise EvaluationError(
                f"could not build a CLIP model from {path} ({error.__class__.__name__}: "
                f"{error}); --clip_model must be an OpenAI CLIP state dict in safetensors"
            ) from error
        self.device = device
        self.resolution = self.model.visual.input_resolution
        self._tokenize = clip.tokenize

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """CLIP's preprocessing: bicubic resize, centre crop, normalise. (3, R, R)"""
        image = tvf.resize(image, self.resolution, tvf.InterpolationMode.BICUBIC)
        image = tvf.center_crop(image, self.resolution)
        pixels = tvf.to_tensor(image.convert("RGB"))  # (3, R, R)
        return tvf.normalize(pixels, CLIP_MEAN, CLIP_STD)

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


class LpipsUnavailable(EvaluationError):
    """LPIPS cannot be computed here (its torchvision backbone file is missing)."""


class LpipsScorer:
    """LPIPS distance (lpips package, linear heads calibrated on human judgements).

    d(x, y) = sum_l mean_hw || w_l ⊙ (f_l(x) - f_l(y)) ||², f_l unit-normalised features.
    """

    def __init__(self, net: str, device: str, size: int) -> None:
        import lpips

        backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
        if not backbone.is_file():
            raise LpipsUnavailable(
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
            AutoModelForSemanticSegmentation,
            name_or_path,
            flag,
            "segmentation model",
            use_safetensors=True,
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
