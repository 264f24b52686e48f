"""Checks of parsed training options that argparse alone cannot make.

Each failure stops with one line naming the problem and the fix, before anything heavy
loads: :func:`check_common_args` (optimiser, loss), :func:`resolve_model_path`,
:func:`check_base_family` (an SDXL base in an SD 1.x script and vice versa) and
:func:`check_output_dir`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from hra_diffusion.checks import check_model_path
from hra_diffusion.errors import fail
from hra_diffusion.families import FAMILY_NAMES, base_family
from hra_diffusion.single_file import check_single_file, is_checkpoint_file
from hra_diffusion.train.args import LORA_ONLY_OPTIONS, OPTIMIZER_PACKAGES, OPTIMIZERS, is_installed


def check_adapter_options(
    build_parser: Callable[[], argparse.ArgumentParser],
    args: argparse.Namespace,
    argv: list[str],
    hra_only: tuple[str, ...],
) -> None:
    """Refuse options that would do nothing with the chosen ``--adapter``: ``hra_only`` with
    lora, ``--lora_rank`` with hra. ``build_parser`` makes the script's parser, to tell the
    options ``argv`` (or an @file in it) sets from their defaults."""
    other, fix = (
        (hra_only, "LoRA's size is --lora_rank")
        if args.adapter == "lora"
        else (LORA_ONLY_OPTIONS, "pass --adapter lora to train LoRA")
    )
    parser = build_parser()
    parser.set_defaults(**dict.fromkeys(other))
    given_values = vars(parser.parse_args(argv))
    given = [dest for dest in other if given_values[dest] is not None]
    if given:
        names = ", ".join(f"--{dest}" for dest in given)
        verb, pronoun = ("has", "it") if len(given) == 1 else ("have", "them")
        fail(f"{names} {verb} no effect with --adapter {args.adapter}; drop {pronoun} ({fix}).")


def check_cache_args(args: argparse.Namespace) -> None:
    """:func:`fail` if a cache option cannot give the uncached run's losses."""
    if args.cache_latents and not args.center_crop:
        fail(
            "--cache_latents needs --center_crop: random crops change the pixels every epoch, "
            "so there is nothing to reuse. Add --center_crop or drop --cache_latents."
        )
    text = getattr(args, "pre_compute_text_embeddings", False)  # SD3/FLUX.1: always on
    if text and getattr(args, "train_text_encoder", False):
        fail(
            "--pre_compute_text_embeddings needs a frozen text encoder, but "
            "--train_text_encoder trains it; drop one of them."
        )


def check_common_args(args: argparse.Namespace) -> None:
    """Checks of the shared options that need no file access; :func:`fail` on the first problem.

    Ranges of single values are the parser's (:mod:`hra_diffusion.cli` types)."""
    check_optimizer_args(args)
    check_loss_args(args)
    if args.report_to in ("tensorboard", "wandb", "comet_ml") and not is_installed(args.report_to):
        fail(f"--report_to {args.report_to} needs it installed: pip install {args.report_to}.")


def check_optimizer_args(args: argparse.Namespace) -> None:
    """Resolve ``--optimizer`` (``--use_8bit_adam`` is its alias) and check its package."""
    if args.use_8bit_adam:
        if args.optimizer not in (None, "adamw_8bit"):
            fail(
                f"--use_8bit_adam means --optimizer adamw_8bit, but --optimizer {args.optimizer} "
                "was given; drop one of them."
            )
        args.optimizer = "adamw_8bit"
    args.optimizer = (args.optimizer or "adamw").lower()
    args.optimizer = {"adamw8bit": "adamw_8bit"}.get(args.optimizer, args.optimizer)  # kohya
    if args.optimizer not in OPTIMIZERS:
        fail(f"--optimizer {args.optimizer} is unknown; choose one of {', '.join(OPTIMIZERS)}.")
    package = OPTIMIZER_PACKAGES.get(args.optimizer)
    if package is not None and not is_installed(package):
        flag = "--use_8bit_adam" if args.use_8bit_adam else f"--optimizer {args.optimizer}"
        fail(f"{flag} needs {package}: pip install {package}, or choose another --optimizer.")


def check_loss_args(args: argparse.Namespace) -> None:
    """``--min_timestep`` < ``--max_timestep`` (their signs are the parser's; the scheduler's
    bound is checked by :func:`timestep_upper_bound`); flow-matching scripts have neither."""
    if getattr(args, "max_timestep", None) is not None and args.max_timestep <= args.min_timestep:
        fail(
            f"--max_timestep {args.max_timestep} must be greater than --min_timestep "
            f"{args.min_timestep} (timesteps are drawn from min <= t < max)."
        )


def resolve_model_path(
    name_or_path: str | None, revision: str | None = None, base_config: str | None = None
) -> str:
    """The base pipeline to load: a local folder, a loadable hub id, or the bundled default.

    ``None`` builds (once) and returns the bundled tiny model. A local folder must
    hold ``model_index.json``. Anything else must be a hub id whose config can be
    fetched (or is cached); otherwise :func:`fail` says how to fix it. For a single-file
    checkpoint it is ``base_config``, the folder whose configs are used (the file and the
    folder are checked by :func:`~hra_diffusion.single_file.check_single_file`).
    """
    if check_single_file(name_or_path, base_config, "--pretrained_model_name_or_path"):
        return str(Path(base_config).expanduser())
    if name_or_path is None:
        from hra_diffusion.world.tiny_sd import default_model_path

        return str(default_model_path())
    try:
        check_model_path(name_or_path, "--pretrained_model_name_or_path")
    except ValueError as error:
        fail(str(error))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    from diffusers import DiffusionPipeline

    try:
        DiffusionPipeline.load_config(name_or_path, revision=revision)
    except Exception as exc:  # any hub or offline failure means "cannot load"
        fail(
            f"--pretrained_model_name_or_path {name_or_path} is neither a local pipeline folder "
            f"nor loadable from the hub ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Download the model once (huggingface-cli download <id> --local-dir DIR) and pass "
            "DIR, or check the id and your network."
        )
    return name_or_path


def single_file_of(args: argparse.Namespace) -> str | None:
    """The single-file checkpoint ``--pretrained_model_name_or_path`` names, or None."""
    model = args.pretrained_model_name_or_path
    return model if is_checkpoint_file(model) else None


DREAMBOOTH_SCRIPTS = {
    "sd": "train/train_dreambooth_hra.py",
    "sdxl": "train/train_dreambooth_hra_sdxl.py",
    "sd3": "train/train_dreambooth_hra_sd3.py",
    "flux": "train/train_dreambooth_hra_flux.py",
}
"""The DreamBooth script that trains each base family."""


def check_base_family(
    model_path: str,
    revision: str | None,
    family: str,
    scripts: Mapping[str, str] = DREAMBOOTH_SCRIPTS,
) -> None:
    """:func:`fail` unless the base is of ``family`` (``"sd"``, ``"sdxl"``, ``"sd3"``,
    ``"flux"``), naming the
    script of ``scripts`` that trains the base it is (or saying none does yet).

    Example:
        >>> check_base_family("./stable-diffusion-xl-base-1.0", None, "sd")  # doctest: +SKIP
        SystemExit: error: ./stable-diffusion-xl-base-1.0 is a Stable Diffusion XL pipeline ...
    """
    found = base_family(model_path, revision)
    if found == family:
        return
    use = scripts.get(found)
    fix = (
        f"train it with {use}"
        if use
        else f"this script does not support {FAMILY_NAMES[found]} yet; pass a "
        f"{FAMILY_NAMES[family]} base"
    )
    fail(
        f"{model_path} is a {FAMILY_NAMES[found]} pipeline but this script trains "
        f"{FAMILY_NAMES[family]}: {fix}."
    )


def check_output_dir(
    output_dir: str | os.PathLike, weights_name: str, overwrite: bool, resuming: bool
) -> None:
    """Refuse an output folder that already holds finished weights, unless told otherwise.

    Also refuses a path that exists but is not a folder. Nothing is written.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {out} exists and is not a folder; choose another path.")
    if (out / weights_name).exists() and not (overwrite or resuming):
        fail(
            f"--output_dir {out} already holds finished weights ({weights_name}): pass "
            "--overwrite_output_dir, --resume_from_checkpoint latest, or another --output_dir."
        )
