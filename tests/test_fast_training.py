"""The fast training step: torch.compile without graph breaks, and cached inputs that leave
every loss as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hra_diffusion import HRAConfig, inject_hra
from hra_diffusion.train import train_control_hra, train_dreambooth_hra_sdxl
from hra_diffusion.train.cache import InputCache
from hra_diffusion.train.train_dreambooth_hra import main as dreambooth_main
from hra_diffusion.world.tiny_sd import tiny_unet

SIZES = [(48, 24), (24, 48), (32, 32), (40, 36)]
DREAMBOOTH = {"sd": dreambooth_main, "sdxl": train_dreambooth_hra_sdxl.main}
"""The DreamBooth script of each base family."""


def write_pictures(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def unet_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
    }


def adapted_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    unet = tiny_unet(width=16)
    inject_hra(unet, HRAConfig(r=8))
    return unet


# --------------------------------------------------------------------------- torch.compile


def test_hra_unet_compiles_as_one_graph():
    """Explained through a call of the module, as ``unet.compile()`` traces it: the factor
    pre-hook and the forward in one graph."""
    torch._dynamo.reset()
    unet = adapted_unet()
    explanation = torch._dynamo.explain(lambda **inputs: unet(**inputs))(**unet_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_step_gives_the_eager_loss_and_gradients():
    """Traced with Dynamo and AOTAutograd (backend ``aot_eager``), which decide the graph and
    its backward; Inductor's code generation would take minutes on this test machine."""
    torch._dynamo.reset()
    eager, compiled = adapted_unet(), adapted_unet()
    compiled.compile(fullgraph=True, backend="aot_eager")
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for unet in (eager, compiled):
        optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(2):  # the second step sees the factors of updated weights
            loss = torch.nn.functional.mse_loss(unet(**unet_inputs()).sample, target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        results.append(losses)
    assert results[1] == pytest.approx(results[0], abs=1e-5)


# --------------------------------------------------------------------------- cached inputs


def test_input_cache_encodes_each_distinct_row_once():
    calls = []

    def encode(x):
        calls.append(len(x))
        return x * 2

    cache = InputCache(encode)
    a, b = torch.ones(3), torch.zeros(3)
    torch.testing.assert_close(cache(torch.stack([a, b, a])), torch.stack([a, b, a]) * 2)
    torch.testing.assert_close(cache(torch.stack([b, a])), torch.stack([b, a]) * 2)
    assert calls == [2] and len(cache) == 2


def test_input_cache_of_an_encoder_with_two_outputs():
    """As SDXL's text encoders: hidden states and a pooled embedding per row."""
    cache = InputCache(lambda x: (x * 2, x.sum(dim=1)))
    a, b = torch.ones(3), torch.arange(3.0)
    hidden, pooled = cache(torch.stack([b, a, b]))
    torch.testing.assert_close(hidden, torch.stack([b, a, b]) * 2)
    torch.testing.assert_close(pooled, torch.tensor([3.0, 3.0, 3.0]))
    hidden, pooled = cache(a[None])
    torch.testing.assert_close(hidden, a[None] * 2)
    torch.testing.assert_close(pooled, torch.tensor([3.0]))


def dreambooth(model_dir: Path, tmp_path: Path, name: str, *extra: str, family: str = "sd") -> dict:
    """A 4-step run of the ``family`` DreamBooth script at 32 px on four random pictures."""
    subject = tmp_path / "subject"
    if not subject.exists():
        write_pictures(subject)
    argv = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(subject), "--instance_prompt", "a photo of qwe toy",
        "--output_dir", str(tmp_path / name), "--resolution", "32", "--report_to", "none",
        "--center_crop", "--random_flip", "--train_batch_size", "2", "--max_train_steps", "4",
        "--learning_rate", "1e-2", "--checkpointing_steps", "100",
        *extra,
    ]  # fmt: skip
    return DREAMBOOTH[family](argv)


@pytest.mark.filterwarnings("ignore:--resolution 32 is not a multiple of 64")
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_dreambooth_cached_inputs_give_the_same_losses(
    family: str, model_dir: Path, sdxl_dir: Path, tmp_path: Path
):
    """SDXL caches both encoders' hidden states and the pooled embedding; the time ids stay
    per image (random crops and flips of the uncached pictures give the same ones)."""
    base = {"sd": model_dir, "sdxl": sdxl_dir}[family]
    plain = dreambooth(base, tmp_path, "plain", family=family)
    cached = dreambooth(
        base, tmp_path, "cached", "--cache_latents", "--pre_compute_text_embeddings",
        family=family,
    )  # fmt: skip
    assert cached["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert cached["losses"] == pytest.approx(plain["losses"], abs=1e-6)
    a = load_file(plain["files"]["HRA weights"])
    b = load_file(cached["files"]["HRA weights"])
    for key in a:  # AdamW's normalised steps (lr 1e-2) turn 1e-7 encoder noise into ~1e-5
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4)


def test_control_cached_inputs_give_the_same_losses(model_dir: Path, tmp_path: Path):
    root = tmp_path / "data"
    write_pictures(root / "images")
    lines = [json.dumps({"image": f"{i}.png", "text": f"picture {i % 2}"}) for i in range(4)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    run = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--train_data_dir", str(root), "--condition_type", "canny",
        "--resolution", "32", "--condition_encoder_channels", "4", "8", "8", "16",
        "--center_crop", "--random_flip", "--train_batch_size", "2", "--max_train_steps", "4",
        "--report_to", "none", "--checkpointing_steps", "100",
    ]  # fmt: skip

    def train(name: str, *extra: str) -> tuple[dict[str, torch.Tensor], list[float]]:
        out = tmp_path / name
        weights = load_file(train_control_hra.main([*run, "--output_dir", str(out), *extra]))
        log = (out / "training_log.jsonl").read_text().splitlines()
        return weights, [json.loads(line)["loss"] for line in log]

    plain, plain_losses = train("plain")
    cached, cached_losses = train("cached", "--cache_latents", "--pre_compute_text_embeddings")
    assert len(plain_losses) == 4
    assert cached_losses == pytest.approx(plain_losses, abs=1e-6)
    for key in plain:  # as above: AdamW turns 1e-7 differences of the encoders into ~1e-5
        torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--cache_latents"], "--cache_latents needs --center_crop"),
        (
            ["--pre_compute_text_embeddings", "--train_text_encoder"],
            "--pre_compute_text_embeddings needs a frozen text encoder",
        ),
    ],
)
def test_cache_options_that_would_change_the_losses_are_refused(
    family: str, model_dir: Path, sdxl_dir: Path, tmp_path: Path, extra: list[str], fragment: str
):
    subject = tmp_path / "subject"
    write_pictures(subject)
    base = {"sd": model_dir, "sdxl": sdxl_dir}[family]
    argv = [
        "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(subject),
        "--instance_prompt", "qwe", "--output_dir", str(tmp_path / "out"), *extra,
    ]  # fmt: skip
    with pytest.raises(SystemExit, match=fragment):
        DREAMBOOTH[family](argv)
    assert not (tmp_path / "out").exists()
