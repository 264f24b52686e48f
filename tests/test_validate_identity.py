"""Random training subjects and the identity validation of the world's DINO slot and CLIP-I."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_tiny_models import single_thread

from hra_diffusion import world
from hra_diffusion.eval import validate_identity as vi
from hra_diffusion.eval.models import ClipEncoder, DinoEncoder
from hra_diffusion.world import evaluators, random_subjects
from hra_diffusion.world.subjects import SUBJECTS, VIEW_BACKGROUNDS, ink_rgb

one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks/results/world_evaluators_identity"

SAMPLE = ["robot", "plus", "house"]  # robot and plus share their inks


# --------------------------------------------------------------------------- random subjects


def test_random_families_are_deterministic_per_seed():
    a = [random_subjects.random_family(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    assert random_subjects.random_family(np.random.default_rng(8)) != a[0]
    view = [
        np.asarray(random_subjects.random_view(np.random.default_rng(7), a[0][0])) for _ in "ab"
    ]
    assert view[0].shape == (world.SIZE, world.SIZE, 3) and (view[0] == view[1]).all()


def test_random_subjects_are_never_named_ones_and_families_share_colours_or_shapes():
    rng = np.random.default_rng(0)
    named = {s.parts for s in SUBJECTS.values()}
    for _ in range(200):
        base, reshaped, recoloured = random_subjects.random_family(rng)
        for subject in (base, reshaped, recoloured):
            assert subject.parts not in named and 2 <= len(subject.parts) <= 3
            inks = [ink_rgb(p.ink) for p in subject.parts]
            for first, second in zip(inks, inks[1:], strict=False):
                assert np.linalg.norm(np.subtract(first, second)) >= 60
        assert [p.ink for p in reshaped.parts] == [p.ink for p in base.parts]
        assert [p.points for p in recoloured.parts] == [p.points for p in base.parts]
        assert sum(p.ink != q.ink for p, q in zip(base.parts, recoloured.parts, strict=True)) == 1


def test_random_views_keep_the_background_away_from_every_ink():
    rng = np.random.default_rng(1)
    for _ in range(50):
        subject = random_subjects.random_subject(rng)
        background = random_subjects.random_background(rng, subject)
        for ink in subject.inks:
            assert np.linalg.norm(np.subtract(ink_rgb(ink), background)) >= 60


def test_ink_rgb_reads_names_and_hex_and_refuses_others():
    assert ink_rgb("orange") == (245, 135, 25) and ink_rgb("#0a10ff") == (10, 16, 255)
    with pytest.raises(ValueError, match="Unknown ink"):
        ink_rgb("mauve")


# --------------------------------------------------------------------------- the figures


def test_pair_auc_matches_a_naive_count():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(9, 4, generator=generator)
    subject = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    cos = (
        torch.nn.functional.normalize(features, dim=1)
        @ torch.nn.functional.normalize(features, dim=1).T
    )
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)]
    pos = [cos[i, j] for i, j in pairs if subject[i] == subject[j]]
    neg = [cos[i, j] for i, j in pairs if subject[i] != subject[j]]
    naive = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert vi.pair_auc(features, subject) == pytest.approx(naive)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(subject)).float()
    assert vi.pair_auc(one_hot, subject) == 1.0


@pytest.fixture(scope="module")
def sample():
    """3 subjects × 2 placements × 2 backgrounds, rendered and through the bundled VAE."""
    raw = vi.render_set(SAMPLE, placements=2, backgrounds=2)
    return raw, vi.round_trip(raw, str(evaluators.default_model_path() / "vae"), seed=0)


def background_colour(images):
    """A known-bad identity embedding: the mean colour of the picture's border."""
    out = []
    for image in images:
        a = np.asarray(image, dtype=np.float32)
        out.append(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).mean(0) / 255 - 0.5)
    return torch.from_numpy(np.stack(out))  # (B, 3)


def test_a_background_colour_embedding_fails_the_validation(sample):
    result = vi.evaluate_embedding(background_colour, *sample)
    assert result["raw"]["pair_auc"] < 0.6 and not result["meets_targets"]
    cosine = result["raw"]["cosine"]
    assert cosine["other_subject_same_background"] > cosine["same_subject_other_background"]


@pytest.mark.parametrize("name", ["dino", "clip_i"])
def test_bundled_evaluators_tell_the_sample_subjects_apart(sample, name):
    """The committed new-evaluator figures, in direction, on a small sample."""
    committed = json.loads((COMMITTED / "new.json").read_text())[name]
    if name == "dino":
        embed = DinoEncoder(str(evaluators.VIT_DIR), "cpu")
    else:
        embed = ClipEncoder(str(evaluators.CLIP_FILE), "cpu").encode_images
    result = vi.evaluate_embedding(embed, *sample)
    for version in ("raw", "vae"):
        assert committed[version]["pair_auc"] >= vi.AUC_TARGET
        assert result[version]["pair_auc"] > 0.85, version
        assert result[version]["every_subject_top1"], version
        cosine = result[version]["cosine"]
        assert cosine["same_subject_other_background"] > cosine["other_subject_same_background"]
    protocol = result["protocol"]
    assert protocol["ceiling"]["mean"] > protocol["floor"]["mean"] + 0.2


def test_validation_cli_writes_json_and_refuses_one_subject(tmp_path, capsys):
    out = tmp_path / "v.json"
    args = ["--subjects", "robot", "donut", "--placements", "2", "--backgrounds", "1"]
    assert vi.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_views"] == 4 and set(result["dino"]) >= {"raw", "vae", "protocol"}
    assert len(result["clip_i"]["raw"]["subject_top1"]) == 2
    with pytest.raises(SystemExit):
        vi.main(["--subjects", "robot", "--out", str(out)])
    assert "at least two subjects" in capsys.readouterr().err
    assert len(VIEW_BACKGROUNDS) == 5
