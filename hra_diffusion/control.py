"""Controllable generation with HRA: a condition encoder added after the UNet's input conv.

The paper's controllable setting keeps the Stable Diffusion UNet frozen apart from HRA
adapters and trains a small convolutional encoder E of the control image c. Its
features are added once, right after the UNet's input convolution:

    h_0 = conv_in(z_t) + E(c)        # (B, C_0, h, w), C_0 = block_out_channels[0]

E is diffusers' ``ControlNetConditioningEmbedding``: 3×3 convs 16 → 32 → 96 → 256 with a
stride-2 step between widths (8× down, the VAE's factor), SiLU, and a zero-initialised
3×3 output conv to C_0 channels. With E's output at zero and HRA at the identity
(even r), training starts exactly at the base model.

:func:`attach_condition_encoder` puts E inside the UNet (``unet.conv_in`` becomes a
:class:`ConditionedConvIn`), so the condition travels with the latents through the
UNet's own forward:

    unet(z_t, t, encoder_hidden_states=text, control_cond=c)   # c: (B, 3, 8h, 8w) in [0, 1]

or, for code that calls the UNet itself (a diffusers pipeline), inside
``with control_condition(unet, c): ...``. A condition batch smaller than the latent
batch by an integer factor is tiled, which covers classifier-free guidance
(``[uncond; cond]`` halves see the same condition).

Control weights live in ONE safetensors file: ``"unet.<module path>.hra_u"`` (d, r) (with
a magnitude also ``"unet.<module path>.hra_m"`` (d_out,)) and
``"condition_encoder.<name>"`` tensors, with the UNet's HRAConfig and the encoder's
configuration as JSON in the metadata. To compare the two methods the UNet's adapter may
instead be a PEFT LoRA (``unet.add_adapter(LoraConfig(...))``): its file holds
``"unet.<module path>.lora_A.weight"`` / ``lora_B.weight`` and the LoRA's rank, alpha and
targets as ``unet.lora_config``; the same loader reads both.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from hra_diffusion.config import HRAConfig
from hra_diffusion.errors import InputError
from hra_diffusion.formats.hra import (
    CONTROL_FORMAT,
    CONTROL_WEIGHTS_NAME,
    AdapterWeights,
    apply_load,
    atomic_save_file,
    plan_load,
    read_safetensors,
)
from hra_diffusion.injection import (
    ADAPTER_SUFFIX,
    MAGNITUDE_SUFFIX,
    hra_layers,
    hra_parameters,
    hra_state_dict,
    merge_hra,
)

if TYPE_CHECKING:
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
    from peft import LoraConfig

ENCODER_PREFIX = "condition_encoder."
UNET_PREFIX = "unet."
HRA_CONFIG_KEY = "unet.hra_config"
LORA_CONFIG_KEY = "unet.lora_config"
LORA_ADAPTER_NAME = "default"
"""PEFT's name of the one LoRA adapter a control UNet carries."""
CONDITION_KWARG = "control_cond"
"""Keyword the UNet's forward accepts once an encoder is attached."""

DEFAULT_ENCODER_CHANNELS: tuple[int, ...] = (16, 32, 96, 256)
"""Widths of the encoder's conv stages (the paper's and ControlNet's)."""


def default_encoder_channels(factor: int) -> tuple[int, ...]:
    """Encoder widths that downsample by ``factor`` (a power of 2, the VAE's): the first
    log2(factor) + 1 of :data:`DEFAULT_ENCODER_CHANNELS`, doubled past its end.

    Example:
        >>> default_encoder_channels(4)
        (16, 32, 96)
    """
    widths = list(DEFAULT_ENCODER_CHANNELS)
    while len(widths) < factor.bit_length():
        widths.append(widths[-1] * 2)
    return tuple(widths[: factor.bit_length()])


def build_condition_encoder(
    unet: nn.Module,
    block_out_channels: tuple[int, ...] = DEFAULT_ENCODER_CHANNELS,
    conditioning_channels: int = 3,
) -> ControlNetConditioningEmbedding:
    """A zero-initialised encoder whose output width is ``unet.conv_in``'s (C_0).

    It downsamples by 2^(len(block_out_channels) - 1): 8× for four stages, the VAE's
    factor, so a condition at image size lands at latent size.
    """
    if len(block_out_channels) < 1 or any(c < 1 for c in block_out_channels):
        raise ValueError(f"Encoder widths must be positive integers, got {block_out_channels}.")
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    return ControlNetConditioningEmbedding(
        conditioning_embedding_channels=_base_conv_in(unet).out_channels,
        conditioning_channels=conditioning_channels,
        block_out_channels=tuple(block_out_channels),
    )


def encoder_config(encoder: ControlNetConditioningEmbedding) -> dict[str, object]:
    """The arguments that rebuild ``encoder`` (stored in the weights file's metadata)."""
    widths = [encoder.conv_in.out_channels] + [block.out_channels for block in encoder.blocks[1::2]]
    return {
        "conditioning_channels": encoder.conv_in.in_channels,
        "block_out_channels": widths,
        "conditioning_embedding_channels": encoder.conv_out.out_channels,
    }


class ConditionedConvIn(nn.Module):
    """``conv_in`` plus the condition features: h = conv_in(x) + E(c).

    ``condition`` is set for the duration of a UNet forward (``control_cond=``) or a
    :func:`control_condition` block; a forward without one raises.
    """

    def __init__(self, base_layer: nn.Conv2d, condition_encoder: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.condition_encoder = condition_encoder
        self.condition: torch.Tensor | None = None
        self._saved: list[torch.Tensor | None] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def take_condition(self, unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """UNet pre-hook: pop ``control_cond=`` from the call and hold it for this forward."""
        cond = kwargs.pop(CONDITION_KWARG, None)
        self._saved.append(self.condition)
        if cond is not None:
            self.condition = cond
        return args, kwargs

    def restore_condition(self, unet: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        """UNet hook, also after an exception: put back the condition held before."""
        self.condition = self._saved.pop()

    @property
    def in_channels(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)  # (N, C_0, h, w)
        cond = self.condition
        if cond is None:
            raise RuntimeError(
                "This UNet has a condition encoder but no control condition was given. Call "
                f"unet(..., {CONDITION_KWARG}=cond) or run it inside "
                "`with control_condition(unet, cond):`."
            )
        if h.shape[0] % cond.shape[0] != 0:
            raise ValueError(
                f"Condition batch {cond.shape[0]} does not divide the latent batch {h.shape[0]}; "
                "pass one condition per sample (or one for all)."
            )
        enc_param = next(self.condition_encoder.parameters())
        feat = self.condition_encoder(cond.to(enc_param.device, enc_param.dtype))  # (B, C_0, h, w)
        if feat.shape[-2:] != h.shape[-2:]:
            raise ValueError(
                f"Condition of size {tuple(cond.shape[-2:])} gives features of size "
                f"{tuple(feat.shape[-2:])}, but the latents are {tuple(h.shape[-2:])}: the "
                "condition must have the image's size (the latent size times the VAE factor)."
            )
        feat = feat.repeat(h.shape[0] // feat.shape[0], 1, 1, 1)  # (N, C_0, h, w): CFG halves
        return h + feat.to(h.dtype)


def _base_conv_in(unet: nn.Module) -> nn.Conv2d:
    conv_in = getattr(unet, "conv_in", None)
    if isinstance(conv_in, ConditionedConvIn):
        return conv_in.base_layer
    if not isinstance(conv_in, nn.Conv2d):
        raise TypeError(
            f"Expected a UNet with an nn.Conv2d `conv_in` (diffusers UNet2DConditionModel), "
            f"got {type(unet).__name__} with conv_in={type(conv_in).__name__}."
        )
    return conv_in


def _conditioned_conv_in(unet: nn.Module) -> ConditionedConvIn:
    conv_in = getattr(unet, "conv_in", None)
    if not isinstance(conv_in, ConditionedConvIn):
        raise ValueError(
            "This UNet has no condition encoder; call attach_condition_encoder(unet, encoder) "
            "or load_control_weights(unet, path) first."
        )
    return conv_in


def condition_encoder_of(unet: nn.Module) -> nn.Module | None:
    """The encoder attached to ``unet``, or None."""
    conv_in = getattr(unet, "conv_in", None)
    return conv_in.condition_encoder if isinstance(conv_in, ConditionedConvIn) else None


def attach_condition_encoder(unet: nn.Module, encoder: nn.Module) -> None:
    """Wrap ``unet.conv_in`` so that it adds ``encoder``'s features of the current condition,
    and let ``unet(...)`` take the condition as ``control_cond=``.

    The encoder keeps its dtype, device and ``requires_grad``. Attach after
    :func:`inject_hra`, which freezes every parameter of the model it is given.
    """
    if condition_encoder_of(unet) is not None:
        raise ValueError("This UNet already has a condition encoder; call detach first.")
    wrapper = ConditionedConvIn(_base_conv_in(unet), encoder)
    wrapper._hooks = [
        unet.register_forward_pre_hook(wrapper.take_condition, with_kwargs=True),
        unet.register_forward_hook(wrapper.restore_condition, with_kwargs=True, always_call=True),
    ]
    unet.conv_in = wrapper


def detach_condition_encoder(unet: nn.Module) -> nn.Module:
    """Undo :func:`attach_condition_encoder`; returns the encoder."""
    wrapper = _conditioned_conv_in(unet)
    for handle in wrapper._hooks:
        handle.remove()
    unet.conv_in = wrapper.base_layer
    return wrapper.condition_encoder


@contextlib.contextmanager
def control_condition(unet: nn.Module, condition: torch.Tensor) -> Iterator[None]:
    """Every UNet forward inside the block sees ``condition`` (B, 3, H, W) in [0, 1]."""
    wrapper = _conditioned_conv_in(unet)
    previous, wrapper.condition = wrapper.condition, condition
    try:
        yield
    finally:
        wrapper.condition = previous


def lora_config_of(unet: nn.Module) -> LoraConfig | None:
    """The config of the PEFT LoRA adapter added to ``unet`` (``add_adapter``), or None."""
    return getattr(unet, "peft_config", {}).get(LORA_ADAPTER_NAME)


def control_parameter_groups(unet: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable tensors in two groups: the UNet's adapter (every ``hra_u``, or every LoRA
    ``lora_A`` / ``lora_B``), selected by name, and the condition encoder's parameters."""
    encoder = condition_encoder_of(unet)
    if encoder is None:
        raise ValueError("This UNet has no condition encoder; attach one first.")
    lora = [p for name, p in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    return hra_parameters(unet) + lora, list(encoder.parameters())


def control_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """Every trainable tensor of :func:`control_parameter_groups`, adapter first."""
    adapter, encoder = control_parameter_groups(unet)
    return adapter + encoder


def merge_control_adapter(unet: nn.Module) -> None:
    """Fold the UNet's adapter into its weights for fast sampling: ``merge_hra`` for HRA,
    PEFT's ``fuse_lora`` for a LoRA control UNet. The condition encoder stays as it is."""
    if lora_config_of(unet) is not None:
        unet.fuse_lora()
    else:
        merge_hra(unet)


def _adapter_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's adapter tensors by file name: ``<path>.hra_u`` (and ``<path>.hra_m``) or
    ``<path>.lora_A.weight``."""
    from peft import get_peft_model_state_dict

    hra = hra_state_dict(unet)
    lora = get_peft_model_state_dict(unet) if lora_config_of(unet) is not None else {}
    if hra and lora:
        raise ValueError("This UNet has HRA and LoRA layers; a control file holds one adapter.")
    if not hra and not lora:
        raise ValueError(
            "This UNet has no HRA or LoRA layers; call inject_hra (or add_adapter(LoraConfig)) "
            "first."
        )
    return hra or lora


def control_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors on the CPU: the adapter's (``"unet.<path>.hra_u"`` (d, r), or
    ``"unet.<path>.lora_A.weight"`` / ``lora_B.weight``) and ``"condition_encoder.<name>"``."""
    encoder = condition_encoder_of(unet)
    if encoder is None:
        raise ValueError("This UNet has no condition encoder; attach one first.")
    state = {UNET_PREFIX + k: v for k, v in _adapter_state(unet).items()}
    state.update({ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _adapter_metadata(unet: nn.Module) -> dict[str, str]:
    lora = lora_config_of(unet)
    if lora is not None:
        fields = {"r": lora.r, "lora_alpha": lora.lora_alpha}
        targets = sorted(lora.target_modules)
        return {LORA_CONFIG_KEY: json.dumps({**fields, "target_modules": targets})}
    hra_config = getattr(unet, "hra_config", None)
    if hra_config is None:
        raise ValueError("The UNet's HRA layers carry no hra_config; inject them with inject_hra.")
    return {HRA_CONFIG_KEY: hra_config.to_json()}


def _weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / CONTROL_WEIGHTS_NAME


def save_control_weights(path: str | os.PathLike, unet: nn.Module) -> Path:
    """Write HRA and encoder weights to one safetensors file, atomically.

    ``path`` is a folder (the file is ``<path>/hra_control_weights.safetensors``) or a
    ``.safetensors`` file. Metadata: ``format``, ``unet.hra_config`` (HRAConfig JSON; for a
    LoRA UNet ``unet.lora_config``: rank, alpha, targets) and ``condition_encoder.config``
    (JSON of :func:`encoder_config`); ``format_version`` 2 since a file may hold a LoRA.
    Returns the file.
    """
    tensors = control_state_dict(unet)
    metadata = {
        "format": CONTROL_FORMAT,
        "format_version": "2",
        **_adapter_metadata(unet),
        "condition_encoder.config": json.dumps(encoder_config(condition_encoder_of(unet))),
    }
    return atomic_save_file(tensors, _weights_file(path), metadata)


def _read_control_file(path: Path) -> tuple[HRAConfig | LoraConfig, dict, dict, dict]:
    """The adapter's config (HRA, or LoRA for a ``unet.lora_config`` file), the encoder's
    config, the adapter tensors (``unet.`` removed) and the encoder tensors."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != CONTROL_FORMAT:
        raise InputError(
            f"{path} is not a control weights file (format {metadata.get('format')!r}, expected "
            f"{CONTROL_FORMAT!r}). Plain HRA adapters load with load_hra_weights."
        )
    adapter = {k[len(UNET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    enc = {k[len(ENCODER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)}
    stray = [k for k in tensors if not k.startswith((UNET_PREFIX, ENCODER_PREFIX))]
    if stray:
        raise InputError(
            f"{path}: unexpected keys {stray[:3]} (expected unet.* and {ENCODER_PREFIX}*)."
        )
    if LORA_CONFIG_KEY in metadata:
        from peft import LoraConfig

        config = LoraConfig(**json.loads(metadata[LORA_CONFIG_KEY]))
    else:
        config = HRAConfig.from_json(metadata[HRA_CONFIG_KEY])
    return config, json.loads(metadata["condition_encoder.config"]), adapter, enc


def _check_same(path: Path, kind: str, expected: dict, found: dict) -> None:
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"{path}: {kind} keys do not match this model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}). Was it trained on a different base model?"
        )
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InputError(
                f"{path}: {kind} tensor {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(expected[key].shape)}. Was it trained on a different base model?"
            )


def _load_lora(unet: nn.Module, file: Path, config: LoraConfig, state: dict) -> None:
    """Add the file's LoRA to ``unet`` and load its tensors; on a mismatch remove it again."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    try:
        unet.add_adapter(config, adapter_name=LORA_ADAPTER_NAME)
    except ValueError as error:
        raise InputError(f"{file}: its LoRA does not fit this UNet ({error}).") from None
    try:
        _check_same(file, "LoRA", get_peft_model_state_dict(unet), state)
    except ValueError:
        unet.unload_lora()
        raise
    set_peft_model_state_dict(unet, state, adapter_name=LORA_ADAPTER_NAME)


def _hra_weights(file: Path, config: HRAConfig, adapter: dict) -> AdapterWeights:
    """The file's HRA tensors (``unet.`` removed) as a parsed adapter of component unet."""
    groups: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, tensor in adapter.items():
        path, _, suffix = key.rpartition(".")
        if suffix not in (ADAPTER_SUFFIX, MAGNITUDE_SUFFIX):
            raise InputError(f"{file}: unet.{key} is not an HRA tensor ('*.hra_u', '*.hra_m').")
        (groups if suffix == ADAPTER_SUFFIX else magnitudes)[path] = tensor
    if set(magnitudes) - set(groups) or (magnitudes and set(groups) - set(magnitudes)):
        raise InputError(f"{file}: every HRA layer needs an hra_m, or none does.")
    found = {"unet": magnitudes} if magnitudes else {}
    return AdapterWeights(file, {"unet": groups}, {"unet": config}, magnitudes=found)


def load_control_weights(target: object, path: str | os.PathLike) -> nn.Module:
    """Add HRA (or, for a LoRA control file, PEFT LoRA) layers and the condition encoder to a
    UNet (or a pipeline's ``unet``) and load both from a control weights file (or a folder
    holding one).

    Everything is checked first (the HRA layers as :func:`load_hra_weights` checks them);
    on any mismatch the UNet is left as it was. The encoder is placed on the UNet's device
    and dtype. Returns the encoder.
    """
    unet = target if isinstance(target, nn.Module) else getattr(target, "unet", None)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"Expected a UNet or a pipeline with a unet, got {type(target).__name__}.")
    file = _weights_file(path)
    if not file.exists():
        raise FileNotFoundError(
            f"{file.parent} holds no {CONTROL_WEIGHTS_NAME}: pass a control weights file or the "
            "run folder holding one."
        )
    config, enc_config, adapter, enc_state = _read_control_file(file)
    if any(hra_layers(unet)) or lora_config_of(unet) or condition_encoder_of(unet) is not None:
        raise ValueError(
            "This UNet already has HRA or LoRA layers or a condition encoder; load control "
            "weights into a fresh base UNet."
        )
    from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

    conv = _base_conv_in(unet)
    with torch.random.fork_rng(devices=[]):  # throwaway initialisations leave the RNG alone
        encoder = ControlNetConditioningEmbedding(
            conditioning_embedding_channels=enc_config["conditioning_embedding_channels"],
            conditioning_channels=enc_config["conditioning_channels"],
            block_out_channels=tuple(enc_config["block_out_channels"]),
        )
        _check_same(file, ENCODER_PREFIX.rstrip("."), encoder.state_dict(), enc_state)
        if not isinstance(config, HRAConfig):
            _load_lora(unet, file, config, adapter)
    if isinstance(config, HRAConfig):
        plan = plan_load(UNET_PREFIX, unet, _hra_weights(file, config, adapter), "unet")
        apply_load(plan)
    encoder.load_state_dict(enc_state)
    encoder.to(conv.weight.device, conv.weight.dtype)
    attach_condition_encoder(unet, encoder)
    return encoder
