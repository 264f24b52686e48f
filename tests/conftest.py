"""Shared fixtures: tiny Stable Diffusion pipelines of the real classes, built offline."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Under pytest-xdist each worker takes one core: one torch thread each (set before torch loads).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from hra_diffusion.world.tiny_sd import build_tiny_pipeline
from hra_diffusion.world.tiny_sdxl import save_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline saved once per session as a diffusers folder."""
    path = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_pipeline(width=32, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest tiny pipeline (width 16), saved once per session; the training tests'
    base model (read only)."""
    path = tmp_path_factory.mktemp("tiny16")
    build_tiny_pipeline(width=16, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL pipeline (width 16), saved once per session (read only)."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl16") / "sdxl", width=16)


@pytest.fixture
def tiny_pipeline(tiny_model_dir: Path) -> StableDiffusionPipeline:
    """A fresh copy of the tiny pipeline for each test."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe
