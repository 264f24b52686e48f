"""save_hra_weights / load_hra_weights: round trips, pipeline helpers and bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

import hra_diffusion.formats.hra as serialization
from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    HRAConfig,
    hra_layers,
    hra_parameters,
    hra_state_dict,
    inject_hra,
    load_hra_weights,
    merge_hra,
    save_hra_weights,
    unload_hra,
    unmerge_hra,
)
from hra_diffusion.world.tiny_sd import build_tiny_pipeline


def randomise(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hra_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator))


def adapt(pipe: StableDiffusionPipeline) -> StableDiffusionPipeline:
    inject_hra(pipe.unet, HRAConfig(r=4))
    inject_hra(pipe.text_encoder, HRAConfig(r=2, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    randomise(pipe.unet, 0)
    randomise(pipe.text_encoder, 1)
    return pipe


def sample(pipe: StableDiffusionPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe("a photo", num_inference_steps=2, height=64, width=64, generator=generator,
               output_type="np")  # fmt: skip
    return out.images


def forward(pipe: StableDiffusionPipeline) -> torch.Tensor:
    """The UNet's noise prediction conditioned on the text encoder, for fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, H, W)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)  # (B, tokens)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]  # (B, tokens, width)
        return pipe.unet(latents, 10, encoder_hidden_states=hidden).sample


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fresh(model_dir: Path, **kwargs: object) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def saved(tiny_pipeline: StableDiffusionPipeline, tmp_path: Path) -> tuple[object, Path]:
    pipe = adapt(tiny_pipeline)
    save_hra_weights(tmp_path, unet=pipe.unet, text_encoder=pipe.text_encoder)
    return pipe, tmp_path / "hra_weights.safetensors"


def test_round_trip_weights_and_images(saved, tiny_model_dir: Path) -> None:
    pipe, file = saved
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
    assert HRAConfig.from_json(metadata["unet.hra_config"]).r == 4
    assert json.loads(metadata["text_encoder.hra_config"])["r"] == 2
    assert all(k.startswith(("unet.", "text_encoder.")) and k.endswith(".hra_u") for k in keys)

    loaded = fresh(tiny_model_dir)
    names = load_hra_weights(loaded, file.parent)
    assert sorted(names) == sorted(keys)
    for component in ("unet", "text_encoder"):
        ours, theirs = (hra_state_dict(getattr(p, component)) for p in (pipe, loaded))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.unet.hra_config == pipe.unet.hra_config
    np.testing.assert_array_equal(sample(loaded), sample(pipe))


def test_single_model_and_component_choice(saved, tiny_model_dir: Path) -> None:
    pipe, file = saved
    loaded = fresh(tiny_model_dir)
    with pytest.raises(ValueError, match="component="):
        load_hra_weights(loaded.unet, file)
    load_hra_weights(loaded.text_encoder, file, component="text_encoder")
    assert not any(hra_layers(loaded.unet))
    load_hra_weights(loaded, file, component="unet")
    ours, theirs = hra_state_dict(pipe.unet), hra_state_dict(loaded.unet)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    unet_only = file.parent / "unet_only.safetensors"
    save_hra_weights(unet_only, unet=pipe.unet)
    other = fresh(tiny_model_dir)
    load_hra_weights(other, unet_only)  # the text encoder is absent from the file: left alone
    assert not any(hra_layers(other.text_encoder))
    assert len(list(hra_layers(other.unet))) == len(ours)


def test_layers_rank_and_gs_come_from_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    inject_hra(source, HRAConfig(r=6, target_modules=("attn2.to_k",), apply_gs=True))
    randomise(source, 2)
    save_hra_weights(tmp_path, unet=source)

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    load_hra_weights(unet, tmp_path)
    assert [name for name, _ in hra_layers(unet)] == [name for name, _ in hra_layers(source)]
    assert unet.hra_config == source.hra_config
    assert all(layer.r == 6 and layer.apply_gs for _, layer in hra_layers(unet))
    context = torch.randn(1, 5, 32)  # (B, tokens, width)
    with torch.no_grad():
        expected = source(torch.ones(1, 4, 8, 8), 10, encoder_hidden_states=context).sample
        randomise(unet, 3)
        load_hra_weights(unet, tmp_path)  # layers that already hold HRA get the file's tensors
        actual = unet(torch.ones(1, 4, 8, 8), 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(actual, expected)


def test_init_is_recorded_and_old_files_read_as_paper(tiny_model_dir: Path, tmp_path: Path):
    source = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    inject_hra(source, HRAConfig(r=4, target_modules=("to_q",), init="scaled"))
    save_hra_weights(tmp_path, unet=source)
    file = tmp_path / "hra_weights.safetensors"
    with safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(metadata["unet.hra_config"])["init"] == "scaled"
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    load_hra_weights(unet, file)
    assert unet.hra_config.init == "scaled" and unet.hra_config == source.hra_config
    assert all(torch.equal(v, hra_state_dict(unet)[k]) for k, v in hra_state_dict(source).items())

    old = json.loads(metadata["unet.hra_config"])  # a file written before the field existed
    del old["init"]
    save_file(
        tensors, tmp_path / "old.safetensors", {**metadata, "unet.hra_config": json.dumps(old)}
    )
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    load_hra_weights(unet, tmp_path / "old.safetensors")
    assert unet.hra_config.init == "paper"
    assert HRAConfig.from_json(json.dumps(old)) == HRAConfig(r=4, target_modules=("to_q",))


def test_merge_unmerge_unload_accept_a_pipeline(saved, tiny_model_dir: Path) -> None:
    pipe, _ = saved
    adapted = forward(pipe)
    merge_hra(pipe)
    assert all(layer.merged for m in (pipe.unet, pipe.text_encoder) for _, layer in hra_layers(m))
    torch.testing.assert_close(forward(pipe), adapted, rtol=1e-4, atol=1e-5)
    unmerge_hra(pipe)
    torch.testing.assert_close(forward(pipe), adapted, rtol=1e-4, atol=1e-5)
    unload_hra(pipe)
    assert not any(hra_layers(pipe.unet)) and not any(hra_layers(pipe.text_encoder))
    torch.testing.assert_close(forward(pipe), forward(fresh(tiny_model_dir)), rtol=1e-4, atol=1e-5)


def assert_untouched(pipe: StableDiffusionPipeline) -> None:
    assert not any(hra_layers(pipe.unet)) and not any(hra_layers(pipe.text_encoder))
    assert not hasattr(pipe.unet, "hra_config")


def test_shape_mismatch_names_key_and_shapes(saved, tiny_model_dir: Path) -> None:
    _, file = saved
    before = digest(file)
    other = build_tiny_pipeline(width=16)
    with pytest.raises(ValueError, match=r"\.hra_u is \(32, \d\), not \(16, \d\)"):
        load_hra_weights(other, file)
    assert_untouched(other)
    assert digest(file) == before


def test_unknown_layer_and_missing_text_encoder(saved, tiny_model_dir: Path) -> None:
    pipe, file = saved
    bad = file.parent / "bad.safetensors"
    tensors = {f"unet.{k}": v for k, v in hra_state_dict(pipe.unet).items()}
    tensors["unet.up_blocks.9.attn.to_q.hra_u"] = torch.zeros(32, 4)
    save_file(tensors, bad)
    target = fresh(tiny_model_dir)
    with pytest.raises(ValueError, match=r"unet\.up_blocks\.9\.attn\.to_q\.hra_u names a layer"):
        load_hra_weights(target, bad)
    assert_untouched(target)

    without_text_encoder = fresh(tiny_model_dir, text_encoder=None)
    with pytest.raises(ValueError, match="pipeline has no text_encoder"):
        load_hra_weights(without_text_encoder, file)
    assert not any(hra_layers(without_text_encoder.unet))


def test_text_encoder_keys_are_written_in_transformers_4_form(saved) -> None:
    """Every file names CLIP layers ``text_encoder.text_model.encoder...`` (transformers 4)."""
    _, file = saved
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    text_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert text_keys
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)


def test_text_encoder_keys_of_either_form_load(saved, tiny_model_dir: Path) -> None:
    """Files without the ``text_model.`` level (written under transformers 5) load too."""
    pipe, file = saved
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    renamed = {
        k.replace("text_encoder.text_model.", "text_encoder.", 1): v for k, v in tensors.items()
    }
    without_level = file.parent / "transformers5.safetensors"
    save_file(renamed, without_level, metadata)
    for variant in (file, without_level):
        loaded = fresh(tiny_model_dir)
        load_hra_weights(loaded, variant)
        ours, theirs = hra_state_dict(pipe.text_encoder), hra_state_dict(loaded.text_encoder)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_metadata_records_each_layers_out_features(saved) -> None:
    pipe, file = saved
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["format_version"] == "3"
    for component in ("unet", "text_encoder"):
        out_features = json.loads(metadata[f"{component}.out_features"])
        model = getattr(pipe, component)
        assert {f"{component}.{path}.hra_u" for path in out_features} == {
            k for k in keys if k.startswith(component + ".")
        }
        for path, d_out in out_features.items():
            name = serialization.model_module_path(model, path)
            assert d_out == model.get_submodule(name).base_layer.weight.shape[0]


def test_missing_pickle_and_truncated_files(saved, tiny_model_dir: Path, tmp_path: Path) -> None:
    _, file = saved
    target = fresh(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hra_weights(target, tmp_path / "nothing_here")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        load_hra_weights(target, tmp_path / "empty_dir")
    for suffix in (".bin", ".pt", ".ckpt"):
        pickled = tmp_path / f"weights{suffix}"
        torch.save({"unet.x.hra_u": torch.zeros(2, 2)}, pickled)
        before = digest(pickled)
        with pytest.raises(ValueError, match="pickle"):
            load_hra_weights(target, pickled)
        assert digest(pickled) == before
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_hra_weights(target, truncated)
    assert_untouched(target)


def test_interrupted_save_keeps_previous_file(saved, monkeypatch) -> None:
    pipe, file = saved
    before = digest(file)

    def write_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(serialization, "save_file", write_half_then_fail)
    randomise(pipe.unet, 7)
    with pytest.raises(KeyboardInterrupt):
        save_hra_weights(file.parent, unet=pipe.unet)
    assert digest(file) == before
    assert sorted(p.name for p in file.parent.iterdir()) == [file.name]


def test_magnitude_saves_loads_and_files_without_it_load_as_before(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    source = fresh(tiny_model_dir)
    inject_hra(source.unet, HRAConfig(r=4, target_modules=("to_q", "conv1"), magnitude=True))
    targets = TEXT_ENCODER_ATTENTION_TARGETS
    inject_hra(source.text_encoder, HRAConfig(r=2, target_modules=targets, magnitude=True))
    randomise(source.unet, 0)  # hra_u and hra_m alike
    randomise(source.text_encoder, 1)
    expected = forward(source)
    file = save_hra_weights(tmp_path, unet=source.unet, text_encoder=source.text_encoder)
    with safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "unet.down_blocks.0.resnets.0.conv1.hra_m"
    assert tensors[key].shape == (32,) and tensors[key].dtype == torch.float32  # (d_out,)
    mags = [k for k in tensors if k.endswith(".hra_m")]
    assert len(mags) == len(tensors) // 2
    assert json.loads(metadata["unet.hra_config"])["magnitude"] is True

    pipe = fresh(tiny_model_dir)
    load_hra_weights(pipe, file)
    assert pipe.unet.hra_config.magnitude and pipe.text_encoder.hra_config.magnitude
    torch.testing.assert_close(forward(pipe), expected)
    state = hra_state_dict(pipe.unet)
    assert all(torch.equal(v, state[k]) for k, v in hra_state_dict(source.unet).items())
    assert {n.rsplit(".", 1)[-1] for n, p in pipe.unet.named_parameters() if p.requires_grad} == {
        "hra_u",
        "hra_m",
    }

    plain = {k: v for k, v in tensors.items() if not k.endswith(".hra_m")}  # an older file
    configs = {
        k: json.dumps({**json.loads(v), "magnitude": False})
        for k, v in metadata.items()
        if k.endswith("hra_config")
    }
    save_file(plain, tmp_path / "plain.safetensors", {**metadata, **configs})
    pipe = fresh(tiny_model_dir)
    load_hra_weights(pipe, tmp_path / "plain.safetensors")
    assert not pipe.unet.hra_config.magnitude
    assert all(layer.hra_m is None for _, layer in hra_layers(pipe.unet))
    old = json.loads(configs["unet.hra_config"])
    del old["magnitude"]  # JSON written before the field existed
    assert HRAConfig.from_json(json.dumps(old)).magnitude is False


def test_bad_magnitude_tensors_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    inject_hra(source, HRAConfig(r=2, target_modules=("attn1.to_q",), magnitude=True))
    file = save_hra_weights(tmp_path, unet=source)
    with safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".hra_m"))
    cases = {
        "wrong_shape": ({**tensors, key: torch.ones(3)}, r"hra_m is \(3,\), not \(32,\)"),
        "lone_m": (
            {**tensors, "unet.conv_in.hra_m": torch.ones(32)},
            "conv_in.hra_m has no hra_u beside it",
        ),
        "missing_m": (
            {k: v for k, v in tensors.items() if k != key},
            "has no hra_m while other layers do",
        ),
    }
    for name, (bad, message) in cases.items():
        save_file(bad, tmp_path / f"{name}.safetensors", metadata)
        unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
        with pytest.raises(ValueError, match=message):
            load_hra_weights(unet, tmp_path / f"{name}.safetensors")
        assert not any(hra_layers(unet)), name
