"""Seeding and checkpoints: exact resume.

Data comes through a :class:`SeededEpochSampler` and noise from :func:`step_generator`, so a
resumed run repeats exactly what an uninterrupted one does. :func:`save_checkpoint` writes
``<output_dir>/checkpoint-<step>`` (the trainable tensors as safetensors, accelerate's
optimizer, scheduler and RNG state beside them); :func:`find_resume_checkpoint` and
:func:`load_checkpoint` read it back. Only the main process writes files, except inside
``accelerator.save_state``, which writes one RNG file per process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from hra_diffusion.errors import fail

CHECKPOINT_PREFIX = "checkpoint-"
"""Checkpoints are folders ``<output_dir>/checkpoint-<global step>``."""


TRAINER_STATE_NAME = "trainer_state.json"
"""File in every checkpoint recording the global step and the seed."""


TRAINABLE_STATE_NAME = "trainable_model_{index}.safetensors"
"""Per prepared model: its trainable tensors only (frozen weights are never copied)."""


EMA_STATE_NAME = "ema_state.safetensors"
"""File in every checkpoint of a ``--use_ema`` run: the :class:`EMA` averages, by name."""


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that require grad, detached, contiguous, on CPU."""
    return {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def register_trainable_state_hooks(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` store only trainable tensors of each prepared model.

    Frozen weights (gigabytes for SD 1.5) are never copied into checkpoints.
    Loading checks that exactly the same tensor names come back.
    """

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                state = trainable_state_dict(accelerator.unwrap_model(model))
                save_file(state, str(Path(output_dir) / TRAINABLE_STATE_NAME.format(index=index)))
        weights.clear()  # keep accelerate from saving full model weights

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        for index in range(len(models)):
            model = accelerator.unwrap_model(models.pop(0))
            state = load_file(str(Path(input_dir) / TRAINABLE_STATE_NAME.format(index=index)))
            expected = {k: tuple(v.shape) for k, v in trainable_state_dict(model).items()}
            found = {k: tuple(v.shape) for k, v in state.items()}
            if found != expected:
                fail(
                    f"checkpoint {input_dir} does not match this model: it holds "
                    f"{len(state)} trainable tensors, the model has {len(expected)} (or their "
                    "shapes differ). Resume with the model and HRA options that wrote it."
                )
            model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, batch index, rank)."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2)[0])


def step_generator(*values: int) -> torch.Generator:
    """A CPU generator seeded by :func:`mix_seed` of ``values``.

    Draw noise and timesteps from ``step_generator(seed, epoch, batch, rank)`` so
    that a resumed run draws exactly what an uninterrupted one did.
    """
    return torch.Generator().manual_seed(mix_seed(*values))


class SeededEpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` in an order fixed by ``(seed, epoch)``.

    The dataset's ``__getitem__`` receives the pair and seeds its augmentation
    with ``sample_seed``, so every pixel of an epoch is a function of
    ``(seed, epoch)`` alone: with ``accelerate.skip_first_batches`` a resumed run
    sees exactly the batches an uninterrupted one would. Accelerate's prepared
    dataloader calls :meth:`set_epoch`; call ``dataloader.set_epoch(epoch)``
    before iterating each epoch.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True) -> None:
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and sample seeds are produced next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=step_generator(self.seed, self.epoch))
        else:
            order = torch.arange(self.num_items)
        for position, index in enumerate(order.tolist()):
            yield index, mix_seed(self.seed, self.epoch, position)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step encoded in a ``checkpoint-<step>`` folder name."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named {CHECKPOINT_PREFIX}<step>.")
    return int(match.group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoint folders in ``output_dir``, oldest (lowest step) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [
        p for p in out.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)
    ]
    return sorted(found, key=checkpoint_step)


def find_resume_checkpoint(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names, or ``None`` to start fresh.

    ``"latest"`` picks the newest checkpoint in ``output_dir`` (``None`` if there
    is none); anything else must be an existing checkpoint folder, else :func:`fail`.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file():
        fail(
            f"--resume_from_checkpoint {resume} is not a checkpoint folder (no "
            f"{TRAINER_STATE_NAME}). Pass a {CHECKPOINT_PREFIX}<step> folder from an "
            "--output_dir, or 'latest'."
        )
    return path


SHAPE_SETTINGS = (
    "adapter",
    "hra_r",
    "hra_init",
    "hra_magnitude",
    "lora_rank",
    "hra_apply_gs",
    "hra_target_modules",
    "train_text_encoder",
    "hra_text_encoder_target_modules",
    "condition_encoder_channels",
    "use_ema",
)
"""Options that decide which tensors a checkpoint holds, their shapes and how they started
(``hra_init``): a run resumes only with the values that wrote the checkpoint."""


def shape_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :data:`SHAPE_SETTINGS` a script has, as JSON values (lists, not tuples)."""
    present = {name: getattr(args, name) for name in SHAPE_SETTINGS if hasattr(args, name)}
    return json.loads(json.dumps(present))


def check_resume_settings(checkpoint: Path | None, args: argparse.Namespace) -> None:
    """:func:`fail` before anything loads when ``checkpoint`` was written with other
    :data:`SHAPE_SETTINGS` than ``args``, naming the first that differs."""
    if checkpoint is None:
        return
    recorded = json.loads((checkpoint / TRAINER_STATE_NAME).read_text()).get("settings", {})
    for name, value in shape_settings(args).items():
        if name in recorded and recorded[name] != value:
            was, now = as_option(recorded[name]), as_option(value)
            fail(
                f"{checkpoint.name} was written with --{name} {was}, this run has {now}; "
                f"resume with --{name} {was}, or choose another --output_dir."
            )


def as_option(value: Any) -> str:
    """A setting as it is written on the command line (lists space-separated)."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    global_step: int,
    seed: int,
    total_limit: int | None = None,
    write_extra: Callable[[Path], None] | None = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Save the full training state to ``<output_dir>/checkpoint-<global_step>``; all ranks.

    The state (trainable weights, optimiser, scheduler, every RNG) is written
    into a hidden temporary folder and renamed into place only when complete, so
    a kill never leaves a corrupt or half-written checkpoint. ``write_extra(folder)``
    runs on the main process before the rename (e.g. to add an adapter file that
    loads on its own). ``settings`` (:func:`shape_settings`) is recorded for
    :func:`check_resume_settings`. Afterwards the oldest checkpoints beyond ``total_limit``
    are deleted. Must be called by every process.
    """
    out = Path(output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{global_step}"
    tmp = out / f".{final.name}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": global_step, "seed": seed, "settings": settings or {}}
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        if final.exists():  # the same step saved before (e.g. a rerun): swap it out
            old = out / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        if total_limit is not None:
            for stale in list_checkpoints(out)[:-total_limit]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore the state saved by :func:`save_checkpoint`; returns its trainer state.

    The returned dict has ``global_step`` and ``seed``. The trainable weights are
    safetensors; the optimizer, scheduler and RNG states, which accelerate pickles with
    ``torch.save``, are read with ``weights_only=True`` (tensors, numbers and containers
    only: no code runs while loading).
    """
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    return json.loads((Path(path) / TRAINER_STATE_NAME).read_text())


def remove_stale_temp_dirs(output_dir: str | os.PathLike) -> None:
    """Delete temporary checkpoint folders left by a killed run (main process only)."""
    out = Path(output_dir)
    if out.is_dir():
        for stale in out.glob(f".{CHECKPOINT_PREFIX}*.tmp"):
            shutil.rmtree(stale)
