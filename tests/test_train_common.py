"""Unit tests of the shared training helpers (train/checkpoints.py, train/setup.py, data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hra_diffusion.train.arg_checks import check_output_dir
from hra_diffusion.train.checkpoints import (
    SeededEpochSampler,
    checkpoint_step,
    find_resume_checkpoint,
    list_checkpoints,
    step_generator,
)
from hra_diffusion.train.data import load_training_image, scan_image_folder
from hra_diffusion.train.reporting import format_duration, image_grid


def test_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = SeededEpochSampler(10, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10))
    assert list(SeededEpochSampler(10, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_step_generator_is_reproducible():
    a = torch.randn(4, generator=step_generator(0, 1, 2))
    assert torch.equal(a, torch.randn(4, generator=step_generator(0, 1, 2)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(0, 1, 3)))


def test_checkpoints_are_listed_by_step_and_temp_dirs_ignored(tmp_path: Path):
    for name in ["checkpoint-10", "checkpoint-9", ".checkpoint-11.tmp", "checkpoint-x"]:
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert find_resume_checkpoint(tmp_path / "empty", "latest") is None
    assert find_resume_checkpoint(tmp_path, None) is None
    assert checkpoint_step(tmp_path / "checkpoint-10") == 10
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))


def test_check_output_dir(tmp_path: Path):
    (tmp_path / "w.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit, match="already holds finished weights"):
        check_output_dir(tmp_path, "w.safetensors", overwrite=False, resuming=False)
    check_output_dir(tmp_path, "w.safetensors", overwrite=True, resuming=False)
    check_output_dir(tmp_path, "w.safetensors", overwrite=False, resuming=True)
    with pytest.raises(SystemExit, match="not a folder"):
        check_output_dir(tmp_path / "w.safetensors", "w.safetensors", False, False)


def test_image_grid_and_durations():
    images = [Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(images)
    assert grid.size == (24, 12)
    assert grid.getpixel((8, 0)) == (40, 0, 0)
    assert format_duration(4.24) == "4.2s"
    assert format_duration(123) == "2m 03s"
    assert format_duration(3723) == "1h 02m 03s"


def test_training_image_is_deterministic_per_seed(tmp_path: Path):
    """A textured picture, so that the random crop and flip show in the tensor: the same seed
    gives the same tensor, other seeds give others."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.txt").write_text("x")
    with pytest.warns(UserWarning, match="b.txt"):
        [path] = scan_image_folder(tmp_path, "--instance_data_dir")
    pixels = load_training_image(path, 16, center_crop=False, random_flip=True, seed=5)
    assert pixels.shape == (3, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1
    again = load_training_image(path, 16, center_crop=False, random_flip=True, seed=5)
    assert torch.equal(pixels, again)
    others = [
        load_training_image(path, 16, center_crop=False, random_flip=True, seed=seed)
        for seed in range(5)
    ]
    assert all(not torch.equal(pixels, other) for other in others)
