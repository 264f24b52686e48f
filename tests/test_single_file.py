"""Single-file SD 1.x / SDXL checkpoints (the A1111/ComfyUI layout) with --base_config:
they load exactly as their diffusers folder, train, generate and export the same, and bad
input is refused in one line before anything loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from original_layout import save_original_checkpoint
from safetensors.torch import load_file, save_file

from hra_diffusion.pipelines import export, generate
from hra_diffusion.single_file import load_single_file
from hra_diffusion.train import train_dreambooth_hra, train_dreambooth_hra_sdxl
from hra_diffusion.world.tiny_sd import clip_text_config
from hra_diffusion.world.tiny_sdxl import build_tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "subject"
PROMPT = "a photo of qwe toy"
pytestmark = pytest.mark.filterwarnings("ignore:--resolution 32 is not a multiple of 64")


@pytest.fixture(scope="module")
def sd_file(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x (width 16) as one original-layout file."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir)
    return save_original_checkpoint(pipe, tmp_path_factory.mktemp("sd1") / "tiny.safetensors")


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SDXL folder and its single file. The second text encoder is wider than the
    first (as in SDXL, 1280 vs 768): diffusers tells the encoders of a file apart by width."""
    pipe = build_tiny_sdxl_pipeline(width=16)
    torch.manual_seed(1)
    pipe.text_encoder_2 = transformers.CLIPTextModelWithProjection(
        clip_text_config(24, pad_token_id=0, projection_dim=16)
    )
    pipe.unet = diffusers.UNet2DConditionModel.from_config(
        {**pipe.unet.config, "cross_attention_dim": 16 + 24}
    )
    root = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl", save_original_checkpoint(pipe, root / "tiny-xl.safetensors")


def assert_same_weights(a: diffusers.DiffusionPipeline, b: diffusers.DiffusionPipeline) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, name, None) is None:
            continue
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        assert all(torch.equal(left[k], right[k]) for k in left), name


def test_sd1_file_loads_exactly_as_its_folder(model_dir: Path, sd_file: Path) -> None:
    folder = diffusers.StableDiffusionPipeline.from_pretrained(model_dir)
    assert_same_weights(folder, load_single_file(sd_file, model_dir))


def test_sdxl_file_loads_exactly_as_its_folder(xl: tuple[Path, Path]) -> None:
    folder, file = xl
    pipe = load_single_file(file, folder)
    assert isinstance(pipe, diffusers.StableDiffusionXLPipeline)
    assert_same_weights(diffusers.StableDiffusionXLPipeline.from_pretrained(folder), pipe)


def train_args(model: Path, out: Path, subject: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(subject),
        "--instance_prompt", PROMPT,
        "--output_dir", str(out),
        "--resolution", "32",
        "--max_train_steps", "2",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_dreambooth_from_the_file_equals_the_folder_and_exports_and_generates_alike(
    model_dir: Path, sd_file: Path, tmp_path: Path
) -> None:
    subject = Path(shutil.copytree(SUBJECT, tmp_path / "subject"))
    train = train_dreambooth_hra.main
    train(train_args(model_dir, tmp_path / "folder", subject, "--train_text_encoder"))
    train(
        train_args(sd_file, tmp_path / "file", subject, "--train_text_encoder",
                   "--base_config", str(model_dir))
    )  # fmt: skip
    weights = {
        run: load_file(tmp_path / run / "hra_weights.safetensors") for run in ("folder", "file")
    }
    assert weights["file"].keys() == weights["folder"].keys()
    assert all(torch.equal(weights["file"][k], weights["folder"][k]) for k in weights["file"])
    card = (tmp_path / "file" / "README.md").read_text()
    assert f'from_single_file("{sd_file}", config="{model_dir}")' in card

    hra = str(tmp_path / "folder")
    outputs = {}
    for name, model in (
        ("folder", [str(model_dir)]),
        ("file", [str(sd_file), "--base_config", str(model_dir)]),
    ):
        out = tmp_path / f"lora-{name}.safetensors"
        export.main(["--format", "lora", "--weights", hra, "--output", str(out), "--model", *model])
        outputs[name] = load_file(out)
        generate.main(
            ["--model", *model, "--weights", hra, "--prompt", PROMPT, "--num_images", "1",
             "--steps", "2", "--height", "64", "--width", "64", "--out", str(tmp_path / name)]
        )  # fmt: skip
    assert outputs["file"].keys() == outputs["folder"].keys()
    assert all(torch.equal(outputs["file"][k], outputs["folder"][k]) for k in outputs["file"])
    image = "prompt00_seed0.png"
    assert (tmp_path / "file" / image).read_bytes() == (tmp_path / "folder" / image).read_bytes()


def test_sdxl_dreambooth_from_the_file_equals_the_folder(
    xl: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, file = xl
    subject = Path(shutil.copytree(SUBJECT, tmp_path / "subject"))
    train = train_dreambooth_hra_sdxl.main
    train(train_args(folder, tmp_path / "a", subject, "--train_text_encoder", "--hra_r", "4"))
    train(
        train_args(file, tmp_path / "b", subject, "--train_text_encoder", "--hra_r", "4",
                   "--base_config", str(folder))
    )  # fmt: skip
    a = load_file(tmp_path / "a" / "hra_weights.safetensors")
    b = load_file(tmp_path / "b" / "hra_weights.safetensors")
    assert {k.split(".")[0] for k in a} == {"unet", "text_encoder", "text_encoder_2"}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- refusals


def refused(main, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def bad_files(tmp_path: Path, sd_file: Path) -> dict[str, Path]:
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, lora)
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in load_file(sd_file).items() if "first_stage" not in k}, no_vae)
    return {"pickle": pickle, "lora": lora, "no_vae": no_vae}


def test_bad_single_files_are_refused_in_one_line(
    model_dir: Path,
    sd_file: Path,
    xl: tuple[Path, Path],
    bad_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    subject = Path(shutil.copytree(SUBJECT, tmp_path / "subject"))
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out"
    sd1, sdxl = train_dreambooth_hra.main, train_dreambooth_hra_sdxl.main
    config = ["--base_config", str(model_dir)]

    line = refused(sd1, train_args(sd_file, out, subject), capsys)
    assert "single-file checkpoint: pass --base_config" in line
    line = refused(sd1, train_args(bad_files["pickle"], out, subject, *config), capsys)
    assert "is a pickle" in line and ".safetensors only" in line
    line = refused(sd1, train_args(bad_files["lora"], out, subject, *config), capsys)
    assert "not a Stable Diffusion 1.x/2.x or XL checkpoint" in line
    line = refused(sd1, train_args(bad_files["no_vae"], out, subject, *config), capsys)
    assert "no VAE keys" in line
    line = refused(sd1, train_args(sd_file, out, subject, "--base_config", str(subject)), capsys)
    assert "--base_config" in line and "model_index.json" in line
    line = refused(sd1, train_args(model_dir, out, subject, *config), capsys)
    assert "--base_config is for a single-file checkpoint" in line
    # family mismatch: both ways, naming both families
    line = refused(sdxl, train_args(sd_file, out, subject, "--base_config", str(xl[0])), capsys)
    assert "Stable Diffusion 1.x/2.x checkpoint" in line and "Stable Diffusion XL pipeline" in line
    line = refused(sd1, train_args(xl[1], out, subject, *config), capsys)
    assert "Stable Diffusion XL checkpoint" in line and "1.x/2.x pipeline" in line

    gen = ["--prompt", PROMPT, "--out", str(out)]
    line = refused(generate.main, ["--model", str(sd_file), *gen], capsys)
    assert "pass --base_config" in line
    line = refused(generate.main, ["--model", str(xl[1]), *config, *gen], capsys)
    assert "Stable Diffusion XL checkpoint" in line
    exp = [
        "--format",
        "glora",
        "--weights",
        str(sd_file),
        "--output",
        str(tmp_path / "x.safetensors"),
    ]
    line = refused(export.main, [*exp, "--model", str(sd_file)], capsys)
    assert "pass --base_config" in line
    assert sorted(tmp_path.rglob("*")) == before
