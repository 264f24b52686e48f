"""Save and load HRA adapters as one safetensors file, and read PEFT HRA adapters.

Our file, ``hra_weights.safetensors``, holds ``"unet.<module path>.hra_u"`` and
``"text_encoder.<module path>.hra_u"`` (SDXL: also ``"text_encoder_2."``; SD3 and FLUX.1:
``"transformer.<module path>.hra_u"``) tensors (d, r) with each component's
:class:`HRAConfig`, each layer's output size and the base family it was trained on
(``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``) in the metadata. Text-encoder
paths are written in transformers 4's form (``text_model.encoder.layers...``) under
either transformers major version.
Loading injects exactly the layers the file names (r from the shapes, apply_gs
from the metadata) after checking the base family, every key and every shape, so a
bad file never leaves a half-modified model. The config's ``init`` (how U started,
``"paper"`` or ``"scaled"``; absent in older files, which read as ``"paper"``) is a
record only: loading copies U in, so it needs nothing else. An adapter trained with a
magnitude (``HRAConfig.magnitude``) also holds ``"<component>.<module path>.hra_m"``
tensors (d_out,) and its config says ``magnitude: true``; a file without ``hra_m`` keys
loads as plain HRA, as before. Files are written
atomically, and only safetensors is ever read: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hra_diffusion.adapters import add_adapter, adopt_unnamed, registry, set_hra_adapters
from hra_diffusion.batched import sync_bank
from hra_diffusion.checks import safetensors_problem
from hra_diffusion.config import HRAConfig
from hra_diffusion.errors import InputError
from hra_diffusion.families import FAMILY_NAMES, model_family, unet_family
from hra_diffusion.injection import (
    ADAPTER_SUFFIX,
    MAGNITUDE_SUFFIX,
    PARAMETER_SUFFIXES,
    hra_layers,
)
from hra_diffusion.layer import HRALayer, wrap_layer

WEIGHTS_NAME = "hra_weights.safetensors"
"""File name used when a directory is given."""

FORMAT = "hra-diffusion"
"""Value of the ``format`` metadata field of our files."""

FORMAT_VERSION = "3"
"""Version 2 adds ``<component>.out_features``, version 3 ``base_family``; older files load
the same way."""

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
"""Pipeline components a file may hold, used as key prefixes (``text_encoder_2``: SDXL;
``transformer``: SD3 and FLUX.1)."""

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
"""PEFT adapter keys are ``base_model.model.<module path>.hra_u``."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

CONTROL_FORMAT = "hra-diffusion-control"
CONTROL_WEIGHTS_NAME = "hra_control_weights.safetensors"
"""Control files (HRA + condition encoder) are read by ``hra_diffusion.control``."""

CONTROL_HINT = (
    "it holds controllable-generation weights (HRA + condition encoder): load them with "
    "hra_diffusion.control.load_control_weights(unet, path) or "
    "StableDiffusionHRAControlPipeline.from_base(base_model, path)."
)


@dataclass
class AdapterWeights:
    """A parsed adapter file: ``{component: {module path: U (d, r)}}`` plus configs.

    The component is ``""`` for files whose keys carry no component prefix
    (PEFT adapters, or a bare model's ``hra_state_dict``).
    """

    source: Path
    groups: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, HRAConfig]
    out_features: dict[str, dict[str, int]] = field(default_factory=dict)
    """``{component: {module path: d_out}}`` where the file records it (files since v2)."""
    family: str | None = None
    """The base family the adapter was trained on (``"sd"``, ``"sdxl"``, ``"sd3"``,
    ``"flux"``; files since v3)."""
    magnitudes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """``{component: {module path: m (d_out,)}}`` for components trained with a magnitude."""

    def apply_gs(self, component: str) -> bool:
        config = self.configs.get(component)
        return config.apply_gs if config else False

    def has_magnitude(self) -> bool:
        """Whether any component holds magnitudes (``hra_m``)."""
        return any(self.magnitudes.values())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create ``path`` atomically: ``write`` fills a temporary file in the same folder,
    which is fsynced and renamed over ``path`` (``os.replace``). If ``write`` fails or
    the process dies, any previous file at ``path`` is left intact.

    Example:
        >>> atomic_write("out/config.json", lambda tmp: Path(tmp).write_text("{}"))
        ... # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if os.name == "posix":
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_save_file(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """``safetensors.torch.save_file`` made atomic with :func:`atomic_write`.

    Example:
        >>> atomic_save_file({"w": torch.zeros(2)}, "out/x.safetensors", {"k": "v"})
        ... # doctest: +SKIP
    """
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, refusing pickle formats.

    Example:
        >>> tensors, metadata = read_safetensors("out/hra_weights.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(
            f"{path} is a pickle-based checkpoint ({path.suffix}); hra-diffusion only reads "
            "safetensors because unpickling can run arbitrary code. Convert it with "
            "safetensors.torch.save_file in an environment you trust."
        )
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path} is not a .safetensors file; pass a .safetensors file or folder.")
    if not path.is_file():
        raise FileNotFoundError(f"No such weights file: {path}.")
    problem = safetensors_problem(path)
    if problem:
        raise InputError(f"{path} {problem}; save the weights again as safetensors.")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, metadata


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / WEIGHTS_NAME


def _config_of(model: nn.Module) -> HRAConfig:
    config = getattr(model, "hra_config", None)
    if config is not None:
        return config
    names, layers = zip(*hra_layers(model), strict=True)
    first = layers[0]
    magnitude = first.hra_m is not None
    return HRAConfig(first.r, names, first.apply_gs, magnitude=magnitude)


def saved_family(
    unet: nn.Module | None, text_encoder_2: nn.Module | None, transformer: nn.Module | None = None
) -> str | None:
    """The base family a file of these components records: the denoiser's (UNet or
    transformer), else ``"sdxl"`` when SDXL's second text encoder is saved, else unknown (a
    lone text encoder)."""
    for denoiser in (unet, transformer):
        if denoiser is not None:
            return unet_family(denoiser)
    return "sdxl" if text_encoder_2 is not None else None


def save_hra_weights(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
    transformer: nn.Module | None = None,
) -> Path:
    """Save the HRA tensors of a UNet or transformer and/or text encoders into one file.

    ``path`` is a folder (the file is ``<path>/hra_weights.safetensors``) or a
    ``.safetensors`` file. Keys are ``"<component>.<module path>.hra_u"`` with
    component ``unet``, ``text_encoder``, ``text_encoder_2`` (SDXL's second
    encoder) or ``transformer`` (SD3's and FLUX.1's denoiser), and
    ``"<component>.<module path>.hra_m"`` (d_out,) beside them for layers with a magnitude;
    CLIP text-encoder paths are written in their transformers-4 form
    (``text_model.encoder.layers...``) whatever transformers is installed (see
    :func:`file_module_path`). The metadata holds each component's
    :class:`HRAConfig` as JSON under ``"<component>.hra_config"`` (its ``init`` included,
    a record of how U started that loading does not need) and each adapted
    layer's output size under ``"<component>.out_features"`` (JSON
    ``{module path: d_out}``; what a base-free GLoRA export needs) and the base
    family under ``"base_family"`` (``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``, from the
    UNet or transformer, or ``"sdxl"`` for a second text encoder; absent for a lone
    ``text_encoder``), which loading checks. The write is atomic. Returns the file written.

    Example:
        >>> save_hra_weights("out/", unet=pipe.unet, text_encoder=pipe.text_encoder)
        ... # doctest: +SKIP
        PosixPath('out/hra_weights.safetensors')
    """
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION}
    models = {
        "unet": unet,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "transformer": transformer,
    }
    for component, model in models.items():
        if model is None:
            continue
        layers = list(hra_layers(model))
        if not layers:
            raise InputError(
                f"{component} has no HRA layers: call inject_hra on it, or pass {component}=None."
            )
        out_features = {}
        for name, layer in layers:
            path_in_file = file_module_path(model, name)
            tensors[f"{component}.{path_in_file}.{ADAPTER_SUFFIX}"] = (
                layer.hra_u.detach().cpu().contiguous()  # (d, r)
            )
            if layer.hra_m is not None:
                tensors[f"{component}.{path_in_file}.{MAGNITUDE_SUFFIX}"] = (
                    layer.hra_m.detach().cpu().contiguous()  # (d_out,)
                )
            out_features[path_in_file] = layer.base_layer.weight.shape[0]
        metadata[f"{component}.hra_config"] = _config_of(model).to_json()
        metadata[f"{component}.out_features"] = json.dumps(out_features, sort_keys=True)
    if not tensors:
        raise InputError(
            "Nothing to save: pass unet=, transformer=, text_encoder= and/or text_encoder_2= "
            "with HRA layers."
        )
    family = saved_family(unet, text_encoder_2, transformer)
    if family is not None:
        metadata["base_family"] = family
    return atomic_save_file(tensors, _weights_path(path), metadata)


def _split_component(key: str) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS else ("", key)


def _read_ours(path: Path) -> AdapterWeights:
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") == CONTROL_FORMAT:
        raise InputError(f"{path} is not a plain HRA adapter: {CONTROL_HINT}")
    if not tensors:
        raise InputError(f"{path} holds no HRA tensors.")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    magnitudes: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, module_key = _split_component(key)
        module, _, suffix = module_key.rpartition(".")
        if suffix not in PARAMETER_SUFFIXES:
            raise InputError(
                f"{path}: key {key!r} is not an HRA tensor (expected '*.hra_u' or '*.hra_m')."
            )
        target = groups if suffix == ADAPTER_SUFFIX else magnitudes
        target.setdefault(component, {})[module] = tensor
    for component, mags in magnitudes.items():
        bare = sorted(set(mags) - set(groups.get(component, {})))
        if bare:
            raise InputError(
                f"{path}: {component + '.' if component else ''}{bare[0]}.{MAGNITUDE_SUFFIX} has "
                f"no {ADAPTER_SUFFIX} beside it; a magnitude belongs to an HRA layer."
            )
        unscaled = sorted(set(groups[component]) - set(mags))
        if unscaled:
            raise InputError(
                f"{path}: {component + '.' if component else ''}{unscaled[0]} has no "
                f"{MAGNITUDE_SUFFIX} while other layers do; a model holds one HRA configuration."
            )
    if "" in groups and len(groups) > 1:
        raise InputError(
            f"{path} mixes keys with and without a component prefix {COMPONENTS}; "
            "every key must start with the same kind of name."
        )
    configs = {
        component: HRAConfig.from_json(metadata[f"{component}.hra_config"])
        for component in groups
        if f"{component}.hra_config" in metadata
    }
    out_features = {
        component: json.loads(metadata[f"{component}.out_features"])
        for component in groups
        if f"{component}.out_features" in metadata
    }
    family = metadata.get("base_family")
    return AdapterWeights(path, groups, configs, out_features, family, magnitudes)


def _read_peft(folder: Path) -> AdapterWeights:
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    if config.get("peft_type") != "HRA":
        raise InputError(
            f"{folder / PEFT_CONFIG_NAME} describes a {config.get('peft_type')!r} adapter; "
            "load_hra_weights reads HRA adapters only (peft_type 'HRA')."
        )
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"{folder} has {PEFT_CONFIG_NAME} but no {PEFT_WEIGHTS_NAME}; pickle adapters "
            "(adapter_model.bin) are not read. Save the adapter with safe_serialization=True."
        )
    tensors, _ = read_safetensors(weights)
    if not tensors:
        raise InputError(f"{weights} holds no HRA tensors.")
    group = {}
    for key, u in tensors.items():
        if not (key.startswith(PEFT_KEY_PREFIX) and key.endswith("." + ADAPTER_SUFFIX)):
            raise InputError(
                f"{weights}: key {key!r} is not a PEFT HRA key ('base_model.model.*.hra_u')."
            )
        group[key.removeprefix(PEFT_KEY_PREFIX).removesuffix("." + ADAPTER_SUFFIX)] = u
    targets = config.get("target_modules") or tuple(group)
    hra_config = HRAConfig(
        r=int(config["r"]),
        target_modules=[targets] if isinstance(targets, str) else targets,
        apply_gs=bool(config.get("apply_GS", False)),
    )
    return AdapterWeights(weights, {"": group}, {"": hra_config})


def read_adapter(path: str | os.PathLike) -> AdapterWeights:
    """Parse our file (or a folder holding it) or a PEFT HRA adapter folder.

    Example:
        >>> read_adapter("out/").groups["unet"].keys()  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No HRA weights at {path}: the path does not exist.")
    if path.is_file():
        is_peft = path.name == PEFT_WEIGHTS_NAME and (path.parent / PEFT_CONFIG_NAME).is_file()
        return _read_peft(path.parent) if is_peft else _read_ours(path)
    if (path / WEIGHTS_NAME).is_file():
        return _read_ours(path / WEIGHTS_NAME)
    if (path / PEFT_CONFIG_NAME).is_file():
        return _read_peft(path)
    if (path / CONTROL_WEIGHTS_NAME).is_file():
        raise InputError(f"{path} holds {CONTROL_WEIGHTS_NAME}: {CONTROL_HINT}")
    raise FileNotFoundError(
        f"{path} holds neither {WEIGHTS_NAME} nor a PEFT adapter ({PEFT_CONFIG_NAME} + "
        f"{PEFT_WEIGHTS_NAME})."
    )


@dataclass
class LoadPlan:
    """One component's validated load: the model and (module path, layer, U) triples, and
    ``{module path: m}`` when the file holds magnitudes."""

    prefix: str
    model: nn.Module
    config: HRAConfig
    layers: list[tuple[str, HRALayer, torch.Tensor]]
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)


def match_components(
    target: object, adapter: AdapterWeights, component: str | None
) -> list[tuple[str, nn.Module, str]]:
    """Pair each model to load with the file group it receives: (key prefix, model, group).

    The ``component`` rules are those of :func:`load_hra_weights`. A file that records
    another base family than the target's is refused first (:func:`check_family`).
    """
    if component is not None and component not in COMPONENTS:
        raise InputError(f"component must be one of {COMPONENTS}, got {component!r}.")
    check_family(target, adapter)
    groups = adapter.groups
    if isinstance(target, nn.Module):
        if "" in groups:
            return [("", target, "")]
        if component is None and len(groups) > 1:
            raise InputError(
                f"{adapter.source} holds {sorted(groups)}; pass component= to choose which "
                "one to load into this model."
            )
        chosen = component or next(iter(groups))
        if chosen not in groups:
            raise InputError(
                f"{adapter.source} has no {chosen} weights; it holds {sorted(groups)}."
            )
        return [(f"{chosen}.", target, chosen)]
    if not isinstance(getattr(target, "components", None), dict):
        raise TypeError(
            f"Expected an nn.Module or a diffusers pipeline, got {type(target).__name__}."
        )
    if "" in groups:
        denoiser = "transformer" if hasattr(target, "transformer") else "unet"
        pairs = [(component or denoiser, "")]
    elif component is not None:
        if component not in groups:
            raise InputError(
                f"{adapter.source} has no {component} weights; it holds {sorted(groups)}."
            )
        pairs = [(component, component)]
    else:
        pairs = [(name, name) for name in groups]
    selected = []
    for name, group in pairs:
        model = getattr(target, name, None)
        if not isinstance(model, nn.Module) and name == "text_encoder_2":
            raise InputError(
                f"{adapter.source} holds text_encoder_2 weights, which only a "
                f"{family_name('sdxl')} base has, but this {family_name(model_family(target))} "
                f"pipeline has none; load them into a {family_name('sdxl')} pipeline."
            )
        if not isinstance(model, nn.Module):
            raise InputError(
                f"{adapter.source} holds {name} weights but the pipeline has no {name}. "
                f"Load a pipeline with a {name}, or save the adapter without it."
            )
        selected.append((f"{name}.", model, group))
    return selected


def family_name(family: str) -> str:
    """The readable name of a base family (``"sdxl"`` -> ``"Stable Diffusion XL"``)."""
    return FAMILY_NAMES.get(family, family)


def check_family(target: object, adapter: AdapterWeights) -> None:
    """Raise ``ValueError`` (one line naming both bases) if the file records a base family
    other than the target's (a pipeline or UNet; a lone text encoder is not checked)."""
    found = model_family(target)
    if adapter.family is None or found is None or adapter.family == found:
        return
    kind = denoiser_kind(target) if isinstance(target, nn.Module) else "pipeline"
    raise InputError(
        f"{adapter.source} holds HRA weights trained on a {family_name(adapter.family)} base, "
        f"but this is a {family_name(found)} {kind}; load them into a "
        f"{family_name(adapter.family)} pipeline (adapters do not move between base families)."
    )


def denoiser_kind_of_family(family: str | None) -> str:
    """``"transformer"`` for SD3 and FLUX.1, else ``"UNet"``."""
    return "transformer" if family in ("sd3", "flux") else "UNet"


def denoiser_kind(model: nn.Module) -> str:
    """``"transformer"`` for an SD3 or FLUX.1 transformer, else ``"UNet"``."""
    return denoiser_kind_of_family(unet_family(model))


def other_base_hint(model: nn.Module) -> str:
    """For a mismatch error on a denoiser: which base it is and which other base of the same
    kind (UNet: SD 1.x/2.x or SDXL; transformer: SD3 or FLUX.1) the file may come from
    (files without ``base_family`` cannot say); else the generic question."""
    family = unet_family(model)
    if family is None:
        return "weights of another model; use the base they were trained on."
    kind = denoiser_kind(model)
    others = " or ".join(
        family_name(f) for f in FAMILY_NAMES if f != family and denoiser_kind_of_family(f) == kind
    )
    return f"not trained on this {family_name(family)} {kind} ({others}?); use its base."


CLIP_TEXT_MODEL_PREFIX = "text_model."
"""transformers 4 nests ``CLIPTextModel``'s layers under ``text_model``; transformers 5 does not."""


def file_module_path(model: nn.Module, path: str) -> str:
    """The name every file we write uses for ``model``'s module ``path``.

    Module paths are kept as they are, except in a CLIP text encoder whose
    ``text_model.`` level transformers 5 dropped: there the transformers-4 name is
    written (``encoder.layers.0.self_attn.q_proj`` ->
    ``text_model.encoder.layers.0.self_attn.q_proj``), the form kohya, ComfyUI,
    A1111 and older diffusers files use. Reading accepts both forms.

    Example:
        >>> file_module_path(pipe.text_encoder, "encoder.layers.0.self_attn.q_proj")
        ... # doctest: +SKIP
        'text_model.encoder.layers.0.self_attn.q_proj'
    """
    if isinstance(model, transformers.CLIPTextModel) and not hasattr(model, "text_model"):
        return CLIP_TEXT_MODEL_PREFIX + path
    return path


def model_module_path(model: nn.Module, path: str) -> str | None:
    """The model's name for the module a file calls ``path``, or None if it has none.

    Files written under either transformers major version load into the other: the
    ``text_model.`` level of CLIP text encoders is added or dropped as needed.

    Example:
        >>> model_module_path(pipe.text_encoder, "text_model.encoder.layers.0.self_attn.q_proj")
        ... # doctest: +SKIP
        'encoder.layers.0.self_attn.q_proj'
    """
    candidates = [path, CLIP_TEXT_MODEL_PREFIX + path, path.removeprefix(CLIP_TEXT_MODEL_PREFIX)]
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def plan_load(prefix: str, model: nn.Module, adapter: AdapterWeights, group: str) -> LoadPlan:
    """Check one group against its model and build (unattached) HRA layers for it.

    Raises ``ValueError`` naming the first key whose layer is missing, merged, or of
    another shape. Nothing is modified.
    """
    tensors = adapter.groups[group]
    for path, u in tensors.items():
        if u.dim() != 2:
            raise InputError(
                f"{adapter.source}: {prefix}{path}.{ADAPTER_SUFFIX} has shape {tuple(u.shape)}; "
                "an hra_u tensor is 2-D, (d, r)."
            )
    ranks = {u.shape[1] for u in tensors.values()}
    if len(ranks) != 1:
        raise InputError(
            f"{adapter.source}: the {prefix.rstrip('.') or 'model'} tensors mix ranks "
            f"{sorted(ranks)}; a model holds one r."
        )
    r = ranks.pop()
    apply_gs = adapter.apply_gs(group)
    file_magnitudes = adapter.magnitudes.get(group, {})
    magnitude = bool(file_magnitudes)
    config = adapter.configs.get(group) or HRAConfig(r, tuple(tensors), apply_gs)
    config = replace(config, r=r, magnitude=magnitude)
    existing = getattr(model, "hra_config", None)
    if existing is not None and (existing.r, existing.apply_gs, existing.magnitude) != (
        r,
        apply_gs,
        magnitude,
    ):
        raise InputError(
            f"The {prefix.rstrip('.') or 'model'} already holds HRA layers with r={existing.r}, "
            f"apply_gs={existing.apply_gs}, magnitude={existing.magnitude}, but the file has "
            f"r={r}, apply_gs={apply_gs}, magnitude={magnitude}. Call unload_hra first."
        )
    layers = []
    magnitudes = {}
    for file_path, u in tensors.items():
        key = f"{prefix}{file_path}.{ADAPTER_SUFFIX}"
        path = model_module_path(model, file_path)
        if path is None:
            raise InputError(
                f"{adapter.source}: {key} names a layer the model lacks. {other_base_hint(model)}"
            )
        module = model.get_submodule(path)
        if isinstance(module, HRALayer):
            if module.merged:
                raise InputError(f"{key}: the layer is merged; call unmerge_hra first.")
            layer = module
        else:
            with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the RNG
                layer = wrap_layer(path, module, r, apply_gs, magnitude=magnitude)
        if tuple(u.shape) != tuple(layer.hra_u.shape):
            raise InputError(
                f"{adapter.source}: {key} is {tuple(u.shape)}, not "
                f"{tuple(layer.hra_u.shape)}: {other_base_hint(model)}"
            )
        if magnitude:
            m = file_magnitudes[file_path]
            check_magnitude(adapter, f"{prefix}{file_path}", m, layer.base_layer, model)
            magnitudes[path] = m
        layers.append((path, layer, u))
    return LoadPlan(prefix, model, existing or config, layers, magnitudes)


def check_magnitude(
    adapter: AdapterWeights, key: str, m: torch.Tensor, module: nn.Module, model: nn.Module
) -> None:
    """Raise ``InputError`` naming ``<key>.hra_m`` unless ``m`` is (d_out,) of ``module``."""
    needed = (module.weight.shape[0],)
    if tuple(m.shape) != needed:
        raise InputError(
            f"{adapter.source}: {key}.{MAGNITUDE_SUFFIX} is {tuple(m.shape)}, not {needed}: "
            f"{other_base_hint(model)}"
        )


@torch.no_grad()
def apply_load(load: LoadPlan) -> None:
    """Attach the layers of a checked :func:`plan_load` plan and copy their weights in."""
    for name, param in load.model.named_parameters():
        if name.rsplit(".", 1)[-1] not in PARAMETER_SUFFIXES:
            param.requires_grad_(False)
    for path, layer, u in load.layers:
        layer.hra_u.copy_(u)
        if path in load.magnitudes:
            layer.hra_m.copy_(load.magnitudes[path])
        parent_name, _, child = path.rpartition(".")
        parent = load.model.get_submodule(parent_name) if parent_name else load.model
        setattr(parent, child, layer)
    load.model.hra_config = load.config
    sync_bank(load.model)


def plan_named_load(
    prefix: str, model: nn.Module, adapter: AdapterWeights, group: str, adapter_name: str
) -> tuple[dict[str, torch.Tensor], HRAConfig, dict[str, torch.Tensor]]:
    """Check one group for loading as the named adapter ``adapter_name``.

    Returns ``{model's module path: U}``, the config and ``{model's module path: m}`` (empty
    without a magnitude). Raises ``ValueError`` naming the adapter and the layer: a taken
    name, a layer the model lacks or of another shape.
    """
    where = f"adapter {adapter_name!r} ({adapter.source})"
    reg = registry(model)
    if reg is not None and adapter_name in reg.adapters:
        raise InputError(
            f"An HRA adapter named {adapter_name!r} is already loaded in the "
            f"{prefix.rstrip('.') or 'model'}; pick another adapter_name or "
            f"delete_hra_adapters(target, {adapter_name!r}) first."
        )
    if any(layer.merged for _, layer in hra_layers(model)):
        raise InputError(f"{where}: the model holds merged HRA layers; call unmerge_hra first.")
    tensors = {}
    magnitudes = {}
    file_magnitudes = adapter.magnitudes.get(group, {})
    for file_path, u in adapter.groups[group].items():
        key = f"{prefix}{file_path}.{ADAPTER_SUFFIX}"
        path = model_module_path(model, file_path)
        if path is None:
            hint = other_base_hint(model)
            raise InputError(f"{where}: {key} names a layer the model lacks. {hint}")
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, HRALayer) else module
        with torch.random.fork_rng(devices=[]):
            wrap_layer(path, base, 1, False)  # raises TypeError for an unsupported layer
        needed = base.weight[0].numel()
        if u.dim() != 2 or u.shape[0] != needed:
            raise InputError(
                f"{where}: {key} is {tuple(u.shape)}, not ({needed}, r): {other_base_hint(model)}"
            )
        tensors[path] = u
        if file_path in file_magnitudes:
            m = file_magnitudes[file_path]
            check_magnitude(adapter, f"{prefix}{file_path}", m, base, model)
            magnitudes[path] = m
    r = max(u.shape[1] for u in tensors.values())
    config = adapter.configs.get(group) or HRAConfig(r, tuple(tensors), adapter.apply_gs(group))
    return tensors, replace(config, r=r, magnitude=bool(magnitudes)), magnitudes


def load_hra_weights(
    target: object,
    path: str | os.PathLike,
    component: str | None = None,
    adapter_name: str | None = None,
) -> list[str]:
    """Inject and load HRA adapters from our file or a PEFT HRA adapter folder.

    ``target`` is a diffusers pipeline or a single model (UNet or text encoder).
    ``path`` is a ``.safetensors`` file, a folder holding ``hra_weights.safetensors``,
    or a PEFT adapter folder (``adapter_config.json`` with ``peft_type`` ``"HRA"``).

    Exactly the layers named in the file are adapted (r from the tensor shapes,
    apply_gs from the stored config); layers that already hold HRA get their
    tensors replaced. Everything is checked before the model is touched. As with
    :func:`inject_hra`, the model's other parameters are frozen.

    ``component`` (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"`` or
    ``"transformer"``, SD3's and FLUX.1's denoiser):

    - pipeline + our file: load only that component (default: every component in
      the file; components absent from the file are left alone);
    - pipeline + unprefixed file (PEFT folder): the component receiving it (default
      ``"unet"``, or ``"transformer"`` for a pipeline that has one);
    - single model + our file: which component's keys to load (may be omitted when
      the file holds one component). An unprefixed file loads into the model as is.

    ``adapter_name`` loads the file as a named adapter (see :mod:`hra_diffusion.adapters`):
    several can be loaded, and the one just loaded becomes the only active adapter
    (``set_hra_adapters`` chooses or stacks them). HRA layers already in the model
    without a name are kept as the adapter ``"default"``. Without ``adapter_name``
    the file's layers are loaded in place (replacing tensors of layers that already
    hold HRA), which a model holding named adapters refuses.

    A file holding magnitudes (``hra_m``, from ``HRAConfig.magnitude``) gives layers with a
    magnitude; one without loads plain HRA layers, as files always did.

    Returns:
        The loaded ``hra_u`` keys in the file's form (:func:`file_module_path`), one per
        layer, e.g. ``"unet.down_blocks.0...to_q.hra_u"``.

    Raises:
        FileNotFoundError: missing file or folder.
        ValueError: pickle file, unreadable/truncated file, weights trained on another
            base family (SD 1.x/2.x, SDXL, SD3, FLUX.1; naming both), a key naming a layer the
            model lacks, a shape mismatch (naming the key and both shapes), or
            weights for a component the pipeline does not have.

    Example:
        >>> pipe = StableDiffusionPipeline.from_pretrained(base_dir)  # doctest: +SKIP
        >>> load_hra_weights(pipe, "out/")  # doctest: +SKIP
        >>> load_hra_weights(pipe.unet, "out/", component="unet")  # doctest: +SKIP
    """
    adapter = read_adapter(path)
    matched = match_components(target, adapter, component)
    if adapter_name is not None:
        named = [
            (prefix, model, *plan_named_load(prefix, model, adapter, group, adapter_name))
            for prefix, model, group in matched
        ]
        adopt_unnamed(target)  # layers loaded without a name become "default"
        for _, model, tensors, config, magnitudes in named:
            add_adapter(model, adapter_name, tensors, config, magnitudes)
        set_hra_adapters(target, adapter_name)  # the adapter just loaded is the active one
        return [
            f"{prefix}{file_module_path(model, path)}.{ADAPTER_SUFFIX}"
            for prefix, model, tensors, _, _ in named
            for path in tensors
        ]
    for prefix, model, _ in matched:
        if registry(model) is not None:
            raise InputError(
                f"The {prefix.rstrip('.') or 'model'} holds named HRA adapters "
                f"{list(registry(model).adapters)}; pass adapter_name= to load another one."
            )
    loads = [plan_load(prefix, model, adapter, group) for prefix, model, group in matched]
    for load in loads:
        apply_load(load)
    return [
        f"{load.prefix}{file_module_path(load.model, path)}.{ADAPTER_SUFFIX}"
        for load in loads
        for path, _, _ in load.layers
    ]
