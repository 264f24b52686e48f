"""One export CLI for every format an HRA adapter can be written in.

    python -m hra_diffusion.pipelines.export --format glora --weights out/ --output g.safetensors
    python -m hra_diffusion.pipelines.export --format kohya --weights out/ --model BASE \
        --output k.safetensors
    python -m hra_diffusion.pipelines.export --format lora --weights out/ --model BASE \
        --output l.safetensors
    python -m hra_diffusion.pipelines.export --format peft --weights out/ --output peft_adapter/

- ``glora``: LyCORIS GLoRA, HRA itself on any base (AUTOMATIC1111, ComfyUI, Forge);
  needs no base (``--model`` only for files that do not record output sizes).
- ``kohya``: the exact LoRA in kohya's keys (ComfyUI, AUTOMATIC1111, Forge, kohya
  sd-scripts); from HRA weights it needs ``--model``, the training base. Given an
  existing diffusers-format LoRA export (``pytorch_lora_weights.safetensors`` or its
  run folder) it only renames the keys; with ``--model`` it first checks that the
  file's base fingerprint matches that base.
- ``lora``: the exact LoRA in diffusers' keys (``pipe.load_lora_weights``); needs ``--model``.
- ``peft``: a PEFT HRA adapter folder of the UNet (``PeftModel.from_pretrained``).

SD3 and FLUX.1 adapters (``transformer.`` keys) export as ``lora``, FLUX.1 ones also as
``kohya`` (kohya's FLUX names after BFL's checkpoint, q, k, v fused; a diffusers-format FLUX.1
LoRA export converts too, its family read from the file or from ``--model``); the other
formats refuse them in one line (their names for these transformers are not written yet).

With every format, ``--model`` also checks that the adapter fits that base (every
layer present, every shape right) before anything is written.

``--weights`` is an ``hra_weights.safetensors`` file or its run folder (or a PEFT HRA
folder). An existing output is refused without ``--overwrite``; every write is atomic.
Bad input ends with one line on stderr naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import diffusers
import torch

from hra_diffusion import cli
from hra_diffusion.errors import InputError
from hra_diffusion.families import model_family
from hra_diffusion.formats.glora import export_glora
from hra_diffusion.formats.hra import (
    WEIGHTS_NAME,
    atomic_save_file,
    match_components,
    model_module_path,
    plan_load,
    read_adapter,
    read_safetensors,
)
from hra_diffusion.formats.kohya_flux import kohya_flux_metadata, to_kohya_flux
from hra_diffusion.formats.lora import (
    LORA_FORMAT,
    LORA_WEIGHTS_NAME,
    base_fingerprint,
    check_unet_only_format,
    export_lora,
    kohya_metadata,
    to_kohya,
)
from hra_diffusion.formats.peft import PEFT_CONFIG_NAME, write_peft_adapter
from hra_diffusion.single_file import check_single_file, is_checkpoint_file, load_single_file

FORMATS = ("lora", "kohya", "glora", "peft")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description="Export HRA weights as a diffusers LoRA, a kohya LoRA, a LyCORIS GLoRA "
        "file or a PEFT adapter folder.",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument(
        "--weights",
        type=cli.existing_path,
        required=True,
        help="hra_weights.safetensors or its run folder (kohya: also a diffusers-format LoRA "
        "export or its folder)",
    )
    parser.add_argument(
        "--output",
        type=cli.output_path,
        required=True,
        help="the .safetensors file to write (peft: the adapter folder); its folder must exist",
    )
    parser.add_argument(
        "--model",
        type=cli.model_or_checkpoint,
        help="base diffusers pipeline folder (or a single-file .safetensors checkpoint with "
        "--base_config): required for lora and kohya from HRA weights; "
        "with every format the adapter is checked to fit it; checks the fingerprint of a LoRA "
        "export; gives layer sizes to old files for glora",
    )
    parser.add_argument(
        "--base_config",
        type=cli.pipeline_dir,
        help="with a single-file --model: a local diffusers pipeline folder of the same family "
        "whose configs are used (the weights come from the file)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="storage dtype (float32)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


class ExportError(InputError):
    """Bad input: the message names the problem and the fix."""


def check_output(output: Path, export_format: str, overwrite: bool) -> None:
    if not output.parent.is_dir():
        raise ExportError(
            f"--output {output}: the folder {output.parent} does not exist; create it first."
        )
    if export_format == "peft":
        if output.is_file():
            raise ExportError(f"--output {output} is a file; peft writes an adapter folder.")
        taken = (output / PEFT_CONFIG_NAME).exists()
    else:
        if output.suffix != ".safetensors":
            raise ExportError(f"--output {output}: name a .safetensors file.")
        taken = output.exists()
    if taken and not overwrite:
        raise ExportError(f"--output {output} exists; pass --overwrite to replace it.")


def load_base(
    model: str | None, base_config: str | None = None
) -> diffusers.DiffusionPipeline | None:
    if model is None:
        return None
    if is_checkpoint_file(model):
        return load_single_file(model, base_config)
    try:
        return diffusers.DiffusionPipeline.from_pretrained(model)
    except OSError as error:
        first = str(error).splitlines()[0]
        raise ExportError(f"--model {model} is not a diffusers pipeline folder: {first}") from error


def lora_export_file(weights: Path) -> Path | None:
    """The diffusers-format LoRA export ``weights`` names, or None if it names none."""
    if weights.is_dir():
        if (weights / WEIGHTS_NAME).is_file() or not (weights / LORA_WEIGHTS_NAME).is_file():
            return None
        weights = weights / LORA_WEIGHTS_NAME
    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    _, metadata = read_safetensors(weights)
    return weights if metadata.get("format") == LORA_FORMAT else None


def convert_lora_export(
    lora_file: Path, output: Path, pipeline: diffusers.DiffusionPipeline | None, dtype: torch.dtype
) -> Path:
    """Rename an existing LoRA export's keys to kohya's; check its base against ``pipeline``."""
    tensors, metadata = read_safetensors(lora_file)
    transformer = any(key.startswith("transformer.") for key in tensors)
    family = metadata.get("base_family") or (model_family(pipeline) if pipeline else None)
    if transformer and family != "flux":
        raise ExportError(
            f"{lora_file} is a LoRA of a transformer that is not known to be FLUX.1 (kohya names "
            "are written for FLUX.1 only): pass its FLUX.1 base with --model, or load the file "
            "itself with load_lora_weights."
        )
    if pipeline is not None:
        weights = {}
        for key in tensors:
            if not key.endswith(".lora_A.weight"):
                continue
            component, path = key.removesuffix(".lora_A.weight").split(".", 1)
            model = getattr(pipeline, component, None)
            name = model_module_path(model, path) if model is not None else None
            if name is None:
                raise ExportError(
                    f"{lora_file}: {key} names a layer the --model base lacks; it was exported "
                    "for another model."
                )
            weights[f"{component}.{path}.weight"] = model.get_submodule(name).weight
        if base_fingerprint(weights) != metadata.get("base_fingerprint"):
            raise ExportError(
                f"{lora_file} was exported for another base than --model (base fingerprints "
                "differ); pass the base it was exported from, or omit --model."
            )
    if transformer:
        kohya = to_kohya_flux(tensors, dtype)
        rank = max(t.shape[0] for k, t in kohya.items() if k.endswith(".lora_down.weight"))
        return atomic_save_file(kohya, output, {**metadata, **kohya_flux_metadata(rank)})
    two = any(key.startswith("text_encoder_2.") for key in tensors) or (
        getattr(pipeline, "text_encoder_2", None) is not None
    )
    rank = max(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight"))
    kohya = {k: v.to(dtype) for k, v in to_kohya(tensors, two, dtype).items()}
    return atomic_save_file(kohya, output, {**metadata, **kohya_metadata(rank, two)})


def export(args: argparse.Namespace) -> Path:
    """Run one export; raises :class:`ExportError` (or ``ValueError``) on bad input."""
    weights, output, dtype = Path(args.weights), Path(args.output), DTYPES[args.dtype]
    check_output(output, args.format, args.overwrite)
    check_single_file(args.model, args.base_config, "--model")
    lora_file = lora_export_file(weights) if args.format == "kohya" else None
    adapter = None if lora_file else read_adapter(weights)  # refuses anything not HRA weights
    if adapter is not None and args.format != "lora":
        if not (args.format == "kohya" and adapter.family == "flux"):
            check_unet_only_format(adapter, f"--format {args.format}")
    if args.format in ("lora", "kohya") and adapter is not None and args.model is None:
        raise ExportError(
            f"--format {args.format} from HRA weights needs --model BASE, the base the adapter "
            "was trained on: a LoRA's B = -W V C depends on the base weights."
        )
    base = load_base(args.model, args.base_config)
    if lora_file is not None:
        return convert_lora_export(lora_file, output, base, dtype)
    if base is not None:  # every format: the adapter must fit the base named
        for prefix, model, group in match_components(base, adapter, None):
            plan_load(prefix, model, adapter, group)
    if args.format == "peft":
        return write_peft_adapter(adapter, output, dtype)
    if args.format == "glora":
        return export_glora(weights, output, base, dtype)
    return export_lora(weights, base, output, dtype, kohya=args.format == "kohya")


@cli.cli_main("--dtype")
def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``argv`` and export; bad input exits with status 2 and one line on stderr.

    Example:
        >>> main(["--format", "glora", "--weights", "out/", "--output", "hra.safetensors"])
        ... # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    path = export(args)
    print(json.dumps({"format": args.format, "output": str(path)}))
    return path


if __name__ == "__main__":
    main()
