"""Evaluation networks: tiny random models of the real classes loaded through the real code."""

from pathlib import Path

import pytest
import torch
from eval_tiny_models import TinyModels, blob_image, build_tiny_models, single_thread

from hra_diffusion.eval.errors import EvaluationError
from hra_diffusion.eval.models import ClipEncoder, DinoEncoder, LpipsScorer, Segmenter
from hra_diffusion.eval.similarity import cosine_matrix, mean_pairwise_cosine

one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def torch_home(tiny, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tiny.torch_home))
    return tiny.torch_home


IMAGES = [blob_image(seed) for seed in range(4)]


def test_dino_identical_images_give_one(tiny):
    dino = DinoEncoder(str(tiny.dino), "cpu")
    emb = dino(IMAGES)  # (4, 32)
    assert emb.shape == (4, 32)
    assert mean_pairwise_cosine(emb[:1], dino(IMAGES[:1])) == pytest.approx(1.0, abs=1e-6)
    sims = cosine_matrix(emb, emb)
    assert torch.allclose(sims, sims.T) and sims.diagonal().allclose(torch.ones(4).double())
    assert sims[0, 1] < 0.9999  # different images differ


def test_clip_state_dict_file_loads_and_scores(tiny):
    clip_encoder = ClipEncoder(str(tiny.clip), "cpu")
    emb = clip_encoder.encode_images(IMAGES)  # (4, 32)
    assert emb.shape == (4, 32)
    assert mean_pairwise_cosine(emb[1:2], clip_encoder.encode_images([IMAGES[1]])) == (
        pytest.approx(1.0, abs=1e-6)
    )
    text = clip_encoder.encode_texts(["a dog in the jungle", "a qwe dog in the jungle"])
    assert text.shape == (2, 32) and not torch.allclose(text[0], text[1])


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_zero_for_identical_and_symmetric(torch_home, net):
    scorer = LpipsScorer(net, "cpu", size=32)
    x = torch.stack([scorer.to_tensor(im) for im in IMAGES])  # (4, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert scorer(x, x).abs().max() < 1e-6
    forward, backward = scorer(x[:2], x[2:]), scorer(x[2:], x[:2])
    assert (forward > 0).all() and torch.allclose(forward, backward, atol=1e-6)


def test_segmenter_predicts_at_ground_truth_size(tiny):
    segmenter = Segmenter(str(tiny.segformer), "cpu")
    assert segmenter.num_classes == 150
    maps = segmenter(IMAGES[:2], [(40, 30), (48, 48)])
    assert [m.shape for m in maps] == [(40, 30), (48, 48)]
    assert all(0 <= m.min() and m.max() < 150 for m in maps)


def test_lpips_missing_backbone_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(EvaluationError, match="vgg16-397923af.pth") as error:
        LpipsScorer("vgg", "cpu", size=32)
    assert "TORCH_HOME" in str(error.value) and "--lpips_net" in str(error.value)


@pytest.mark.parametrize(
    ("build", "flag"),
    [
        (lambda p: DinoEncoder(p, "cpu"), "--dino_model"),
        (lambda p: Segmenter(p, "cpu"), "--segformer_model"),
        (lambda p: ClipEncoder(p, "cpu"), "--clip_model"),
    ],
)
def test_unknown_model_path_is_a_clear_error(tmp_path, build, flag):
    with pytest.raises(EvaluationError, match=flag):
        build(str(tmp_path / "missing" / "model"))


def test_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EvaluationError, match="--dino_model"):
        DinoEncoder(str(tmp_path), "cpu")


def test_file_that_is_not_clip_is_a_clear_error(tmp_path):
    bad = tmp_path / "ViT-B-32.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EvaluationError, match="could not build a CLIP model"):
        ClipEncoder(str(bad), "cpu")


def test_pickled_clip_checkpoint_is_refused_with_the_conversion_command(tmp_path):
    pickled = tmp_path / "ViT-B-32.pt"
    pickled.write_bytes(b"a pickle we must never open")
    with pytest.raises(EvaluationError, match="safetensors.*st.save_file"):
        ClipEncoder(str(pickled), "cpu")
