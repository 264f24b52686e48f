"""The world's command-line tools: the dataset writer and the pretraining script."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from hra_diffusion import world
from hra_diffusion.train import make_world_dataset, pretrain_world
from hra_diffusion.train.control_data import FolderSource


def test_dataset_writer_writes_a_control_folder(tmp_path: Path) -> None:
    out = tmp_path / "world"
    make_world_dataset.main(["--output_dir", str(out), "--num_scenes", "4", "--seed", "3"])
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    scene = world.Scene(**rows[0]["scene"])
    assert rows[0]["text"] == world.caption(scene)
    image = np.asarray(Image.open(out / "images" / rows[0]["image"]))
    assert np.array_equal(image, np.asarray(world.render_scene(scene)))
    labels = Image.open(out / "conditions" / rows[0]["condition"])
    assert labels.mode == "L" and labels.size == (world.SIZE, world.SIZE)
    assert json.loads((out / "labels.json").read_text()) == list(world.LABELS)
    assert len(FolderSource(out, needs_condition=True).rows) == 4


def test_dataset_writer_is_deterministic_and_keeps_a_finished_dataset(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        make_world_dataset.main(["--output_dir", str(out), "--num_scenes", "3"])
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    before = (a / "metadata.jsonl").read_text()
    with pytest.raises(SystemExit, match="not empty.*--overwrite_output_dir"):
        make_world_dataset.main(["--output_dir", str(a), "--num_scenes", "5"])
    assert (a / "metadata.jsonl").read_text() == before
    make_world_dataset.main(["--output_dir", str(a), "--num_scenes", "5", "--overwrite_output_dir"])
    assert len((a / "metadata.jsonl").read_text().splitlines()) == 5


def test_dataset_writer_refuses_a_zero_count(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        make_world_dataset.main(["--output_dir", str(tmp_path / "x"), "--num_scenes", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_dataset_writer_max_offset_widens_layouts_and_refuses_out_of_range(
    tmp_path: Path,
) -> None:
    out = tmp_path / "wide"
    make_world_dataset.main(
        ["--output_dir", str(out), "--num_scenes", "60", "--max_offset", str(world.WIDE_OFFSET)]
    )
    scenes = [
        json.loads(line)["scene"] for line in (out / "metadata.jsonl").read_text().splitlines()
    ]
    shifts = [abs(s["cx"] - world.SIZE / 2) for s in scenes]
    assert world.MAX_OFFSET < max(shifts) <= world.WIDE_OFFSET
    with pytest.raises(SystemExit, match=r"--max_offset: must lie in \[0, 32\] pixels"):
        make_world_dataset.main(["--output_dir", str(tmp_path / "y"), "--max_offset", "-1"])
    assert not (tmp_path / "y").exists()


def test_pretraining_writes_a_loadable_pipeline_with_its_record(tmp_path: Path) -> None:
    out = tmp_path / "model"
    steps = ["--vae_steps", "2", "--unet_steps", "2", "--decoder_steps", "2"]
    pretrain_world.main(["--output_dir", str(out), "--vae_batch_size", "2",
                         "--unet_batch_size", "2", "--vae_eval_count", "8", *steps])  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype
    assert pipe.unet.config.block_out_channels == [64, 128, 128]
    recipe = json.loads((out / "pretraining" / "recipe.json").read_text())
    assert set(recipe["stages"]) == {"vae", "unet", "decoder"}
    assert recipe["stages"]["unet"]["steps"] == 2
    for name in ("vae_loss.png", "unet_loss.png", "decoder_loss.png"):
        assert Image.open(out / "pretraining" / name).size[0] > 0
    with pytest.raises(SystemExit, match="already holds a finished pipeline"):
        pretrain_world.main(["--output_dir", str(out), *steps])


def test_pretraining_unet_stage_needs_the_vae(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="run that first"):
        pretrain_world.main(["--output_dir", str(tmp_path / "m"), "--stage", "unet"])


def test_pretraining_unet_stage_resumes_exactly_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in step 3 after the checkpoint of step 2, then resumed == 4 steps in one go."""
    args = ["--stage", "unet", "--unet_batch_size", "2", "--unet_steps", "4",
            "--unet_checkpoint_steps", "2"]  # fmt: skip
    vae = ["--stage", "vae", "--vae_steps", "1", "--vae_batch_size", "1", "--vae_eval_count", "8"]
    pretrain_world.main(["--output_dir", str(tmp_path / "base"), *vae])
    for name in ("straight", "resumed"):
        shutil.copytree(tmp_path / "base.work", tmp_path / f"{name}.work")
    pretrain_world.main(["--output_dir", str(tmp_path / "straight"), *args])

    resumed = ["--output_dir", str(tmp_path / "resumed"), *args]
    ema_update, calls = pretrain_world.ema_update, []

    def killed_in_step_3(*update) -> None:
        calls.append(1)
        if len(calls) == 5:  # 2 calls per step (UNet, text encoder)
            raise KeyboardInterrupt
        ema_update(*update)

    monkeypatch.setattr(pretrain_world, "ema_update", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain_world.main(resumed)
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="was saved with --unet_batch_size 2, this run has 3"):
        pretrain_world.main([*resumed, "--unet_batch_size", "3"])
    pretrain_world.main(resumed)

    straight, again = (
        StableDiffusionPipeline.from_pretrained(tmp_path / name) for name in ("straight", "resumed")
    )
    for part in ("unet", "text_encoder"):
        a, b = getattr(straight, part).state_dict(), getattr(again, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part
