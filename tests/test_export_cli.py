"""python -m hra_diffusion.pipelines.export: every format from a run folder, and bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    HRAConfig,
    export_glora,
    export_lora,
    hra_parameters,
    inject_hra,
    save_hra_weights,
)
from hra_diffusion.formats.glora import GLORA_PARTS
from hra_diffusion.pipelines.export import main
from hra_diffusion.world.tiny_sd import build_tiny_pipeline


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder: HRA weights (UNet + text encoder) and their diffusers LoRA export."""
    folder = tmp_path_factory.mktemp("run")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    inject_hra(pipe.unet, HRAConfig(r=4))
    inject_hra(pipe.text_encoder, HRAConfig(r=2, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hra_parameters(pipe.unet) + hra_parameters(pipe.text_encoder):
            p.copy_(torch.randn(p.shape, generator=generator))
    save_hra_weights(folder, unet=pipe.unet, text_encoder=pipe.text_encoder)
    export_lora(folder, StableDiffusionPipeline.from_pretrained(tiny_model_dir), folder)
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_glora_from_a_run_folder(run: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "hra_glora.safetensors"
    assert main(["--format", "glora", "--weights", str(run), "--output", str(output)]) == output
    assert json.loads(capsys.readouterr().out)["output"] == str(output)
    # One GLoRA module per HRA layer of the file, named as kohya names the layer.
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    modules = set()
    for key in load_file(run / "hra_weights.safetensors"):
        component, _, path = key.removesuffix(".hra_u").partition(".")
        modules.add(prefixes[component] + path.replace(".", "_"))
    assert len(modules) == 7 * 2 * 4 + 2 * 4  # UNet attention; text encoder: 2 layers x 4
    tensors = load_file(output)
    assert tensors.keys() == {f"{m}.{part}" for m in modules for part in GLORA_PARTS}
    direct = load_file(export_glora(run, tmp_path / "direct.safetensors"))
    assert all(torch.equal(tensors[k], direct[k]) for k in direct)  # the library's own export
    with safe_open(str(output), framework="pt") as f:
        assert f.metadata()["format"] == "lycoris-glora"


def test_glora_dtype(run: Path, tmp_path: Path) -> None:
    output = tmp_path / "half.safetensors"
    main(["--format", "glora", "--weights", str(run), "--output", str(output), "--dtype",
          "float16"])  # fmt: skip
    assert {t.dtype for t in load_file(output).values()} == {torch.float16}


def test_kohya_and_lora_from_hra_weights_need_the_base(
    run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    for export_format in ("kohya", "lora"):
        output = tmp_path / f"{export_format}.safetensors"
        argv = ["--format", export_format, "--weights", str(run / "hra_weights.safetensors"),
                "--output", str(output)]  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        assert not output.exists()
        main([*argv, "--model", str(tiny_model_dir)])
        keys = load_file(output).keys()
        if export_format == "kohya":
            assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
        else:
            assert all(k.startswith(("unet.", "text_encoder.text_model.")) for k in keys)


def test_kohya_from_an_existing_lora_export(run: Path, tiny_model_dir: Path, tmp_path: Path):
    """A run that already has pytorch_lora_weights.safetensors converts without the base."""
    lora_dir = tmp_path / "lora_run"
    lora_dir.mkdir()
    (lora_dir / "pytorch_lora_weights.safetensors").write_bytes(
        (run / "pytorch_lora_weights.safetensors").read_bytes()
    )
    renamed = tmp_path / "renamed.safetensors"
    main(["--format", "kohya", "--weights", str(lora_dir), "--output", str(renamed)])
    from_hra = export_lora(
        run, StableDiffusionPipeline.from_pretrained(tiny_model_dir), tmp_path, kohya=True
    )
    ours, theirs = load_file(renamed), load_file(from_hra)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    checked = tmp_path / "checked.safetensors"
    main(["--format", "kohya", "--weights", str(lora_dir), "--output", str(checked), "--model",
          str(tiny_model_dir)])  # fmt: skip
    assert checked.is_file()


def test_peft_folder(run: Path, tmp_path: Path) -> None:
    output = tmp_path / "peft"
    output.mkdir()
    with pytest.warns(UserWarning, match="text_encoder left out"):
        main(["--format", "peft", "--weights", str(run), "--output", str(output), "--dtype",
              "bfloat16"])  # fmt: skip
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "HRA" and config["r"] == 4
    tensors = load_file(output / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def fails(argv: list[str], capsys, *fragments: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # may start with diffusers' loading progress bars
    assert ": error: " in err.strip().splitlines()[-1] and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_input(run: Path, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "x.safetensors")
    fails(["--format", "glora", "--weights", str(tmp_path / "nothing"), "--output", out], capsys,
          "does not exist")  # fmt: skip
    lora = str(run / "pytorch_lora_weights.safetensors")
    fails(["--format", "glora", "--weights", lora, "--output", out], capsys,
          "is not an HRA tensor")  # fmt: skip
    pickle = tmp_path / "weights.ckpt"
    pickle.write_bytes(b"not read")
    fails(["--format", "glora", "--weights", str(pickle), "--output", out], capsys, "pickle")
    fails(["--format", "glora", "--weights", str(run), "--output",
           str(tmp_path / "missing" / "x.safetensors")], capsys, "does not exist")  # fmt: skip
    fails(["--format", "glora", "--weights", str(run), "--output", str(tmp_path / "x.bin")],
          capsys, ".safetensors")  # fmt: skip
    assert list(tmp_path.iterdir()) == [pickle]

    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    fails(["--format", "glora", "--weights", str(run), "--output", str(existing)], capsys,
          "--overwrite")  # fmt: skip
    assert existing.read_bytes() == b"keep me"
    main(["--format", "glora", "--weights", str(run), "--output", str(existing), "--overwrite"])
    assert load_file(existing)

    other_base = tmp_path / "other_base"
    build_tiny_pipeline(width=32, seed=1).save_pretrained(other_base)
    fails(["--format", "kohya", "--weights", lora, "--output", str(tmp_path / "k.safetensors"),
           "--model", str(other_base)], capsys, "fingerprints differ")  # fmt: skip
    assert not (tmp_path / "k.safetensors").exists()
    small = tmp_path / "small_base"
    build_tiny_pipeline(width=16).save_pretrained(small)
    fails(["--format", "glora", "--weights", str(run), "--output", str(tmp_path / "s.safetensors"),
           "--model", str(small)], capsys, "is (32, 2), not (16, 2)")  # fmt: skip
    assert not (tmp_path / "s.safetensors").exists()


def test_old_file_without_sizes(run: Path, tiny_model_dir: Path, tmp_path: Path, capsys):
    with safe_open(str(run / "hra_weights.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: v for k, v in f.metadata().items() if not k.endswith(".out_features")}
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata)
    output = tmp_path / "glora.safetensors"
    argv = ["--format", "glora", "--weights", str(old), "--output", str(output)]
    fails(argv, capsys, "--model BASE")
    main([*argv, "--model", str(tiny_model_dir)])
    assert output.is_file()


def test_runs_as_a_module(tmp_path: Path) -> None:
    """``python -m hra_diffusion.pipelines.export``: bad input gives exit status 2, no traceback."""
    missing = subprocess.run(
        [sys.executable, "-m", "hra_diffusion.pipelines.export", "--format", "glora", "--weights",
         str(tmp_path / "none"), "--output", str(tmp_path / "g.safetensors")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert missing.returncode == 2, missing.stderr
    assert ": error: " in missing.stderr and "Traceback" not in missing.stderr
