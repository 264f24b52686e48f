"""The evaluation drivers end to end on tiny folder trees, and their bad-input errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_tiny_models import TinyModels, blob_image, build_tiny_models, single_thread
from PIL import Image

from hra_diffusion import HRAConfig, hra_parameters, inject_hra, save_hra_weights
from hra_diffusion.eval import compare_runs, evaluate_control, evaluate_dreambooth
from hra_diffusion.eval.dreambooth_benchmark import subject_prompts, subjects
from hra_diffusion.eval.edge_metrics import canny_edges
from hra_diffusion.eval.report import split_passthrough
from hra_diffusion.inference import load_pipeline
from hra_diffusion.world.tiny_sd import build_tiny_pipeline

one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(autouse=True)
def torch_home(tiny, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tiny.torch_home))
    return tiny.torch_home


def make_dreambooth_tree(
    root: Path, names: list[str], samples: int = 2, identical: bool = False
) -> tuple[Path, Path]:
    """dataset/<subject>/*.jpg and gen/<subject>/<p>_<s>.png + prompts.json.

    With ``identical`` every subject has one real image and every generated image is a copy.
    """
    dataset, generated = root / "dataset", root / "gen"
    for k, name in enumerate(names):
        (dataset / name).mkdir(parents=True)
        (generated / name).mkdir(parents=True)
        references = [blob_image(100 * k + r) for r in range(1 if identical else 2)]
        for r, image in enumerate(references):
            image.save(dataset / name / f"{r:02d}.png")
        prompts = subject_prompts(subjects()[name], "qwe")
        (generated / name / "prompts.json").write_text(json.dumps(prompts))
        for p in range(25):
            for s in range(samples):
                image = references[0] if identical else blob_image(1000 * k + 10 * p + s)
                image.save(generated / name / f"{p:02d}_{s:02d}.png")
    return dataset, generated


def dreambooth_args(tiny: TinyModels, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset_dir", str(dataset),
        "--dino_model", str(tiny.dino),
        "--clip_model", str(tiny.clip),
        "--lpips_net", "alex",
        "--lpips_size", "32",
        "--batch_size", "8",
        "--device", "cpu",
        "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dreambooth_run(tiny, tmp_path_factory) -> Path:
    """One driver run on two subjects (an object and a live one); returns its output folder."""
    root = tmp_path_factory.mktemp("dreambooth")
    dataset, generated = make_dreambooth_tree(root, ["backpack", "dog"])
    out = root / "out"
    args = dreambooth_args(tiny, dataset, out, "--generated_dir", str(generated))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tiny.torch_home))
        assert evaluate_dreambooth.main([*args, "--subjects", "backpack", "dog"]) == 0
    return out


def test_dreambooth_end_to_end_writes_json_markdown_png(tiny, dreambooth_run):
    out = dreambooth_run
    result = json.loads((out / "results.json").read_text())
    assert result["task"] == "dreambooth" and result["config"]["clip_t_prompt"] == "class"
    assert result["models"]["clip"] == str(tiny.clip) and result["versions"]["torch"]
    (run,) = result["checkpoints"]
    assert run["subjects"]["backpack"]["prompt_list"] == "object"
    assert run["subjects"]["dog"]["prompt_list"] == "live"
    metrics = run["subjects"]["dog"]["metrics"]
    assert metrics["dino"]["n"] == 2 * 50  # every (real, generated) pair
    assert metrics["clip_t"]["n"] == 50
    assert metrics["lpips_diversity"]["n"] == 25  # one pair per prompt with 2 samples
    assert -1 <= metrics["clip_i"]["mean"] <= 1 and metrics["lpips_to_reference"]["mean"] > 0
    assert run["overall"]["dino"]["n"] == 2
    markdown = (out / "results.md").read_text()
    assert "| backpack | backpack | object | 50 |" in markdown and "identifier replaced" in markdown
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 6 * 150 and sheet.height > 2 * 150


def test_dreambooth_identical_images_score_one_and_zero(tiny, tmp_path):
    dataset, generated = make_dreambooth_tree(tmp_path, ["cat"], identical=True)
    out = tmp_path / "out"
    args = ["--generated_dir", str(generated), "--subjects", "cat", "--clip_t_prompt", "identifier"]
    evaluate_dreambooth.main(dreambooth_args(tiny, dataset, out, *args))
    result = json.loads((out / "results.json").read_text())
    overall = result["checkpoints"][0]["overall"]
    assert overall["dino"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert overall["clip_i"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert overall["lpips_to_reference"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert overall["lpips_diversity"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert overall["dino_feature_diversity"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert "with the identifier 'qwe'" in (out / "results.md").read_text()


def test_dreambooth_without_lpips_backbone_reports_the_other_metrics(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    dataset, generated = make_dreambooth_tree(tmp_path, ["cat"])
    out = tmp_path / "out"
    args = ["--generated_dir", str(generated), "--subjects", "cat"]
    assert evaluate_dreambooth.main(dreambooth_args(tiny, dataset, out, *args)) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["lpips"]["available"] is False
    assert "alexnet-owt-7be5be79.pth" in result["lpips"]["reason"]
    assert "TORCH_HOME" in result["lpips"]["reason"]
    metrics = result["checkpoints"][0]["subjects"]["cat"]["metrics"]
    assert metrics["lpips_diversity"]["n"] == 0 and metrics["lpips_to_reference"]["n"] == 0
    assert metrics["dino"]["n"] == 2 * 50 and metrics["clip_t"]["n"] == 50
    assert metrics["dino_feature_diversity"]["n"] == 25  # one pair per prompt, 2 samples each
    assert metrics["dino_feature_diversity"]["mean"] > 0
    markdown = (out / "results.md").read_text()
    assert "LPIPS unavailable" in markdown and "| unavailable |" in markdown


def test_checkpoint_sweep_reports_every_checkpoint_and_compare_runs(
    tiny, dreambooth_run, tmp_path, capsys
):
    dataset, generated = make_dreambooth_tree(tmp_path, ["vase"], samples=1)
    for label in ("500", "1000"):
        shutil.copytree(generated, tmp_path / "ckpt" / label)
    out = tmp_path / "sweep"
    args = ["--generated_dir", str(tmp_path / "ckpt" / "{checkpoint}"), "--subjects", "vase"]
    evaluate_dreambooth.main(
        dreambooth_args(tiny, dataset, out, *args, "--checkpoints", "500", "1000")
    )
    result = json.loads((out / "results.json").read_text())
    assert [r["checkpoint"] for r in result["checkpoints"]] == ["500", "1000"]
    assert result["checkpoints"][0]["overall"] == result["checkpoints"][1]["overall"]
    assert (out / "contact_sheet_500.png").exists() and (out / "checkpoints.png").exists()

    capsys.readouterr()
    chart = tmp_path / "compare.png"
    files = [str(dreambooth_run / "results.json"), str(out / "results.json")]
    compare_runs.main([*files, "--labels", "HRA", "LoRA", "--output", str(chart)])
    table = capsys.readouterr().out
    assert "| HRA | 0." in table and "| LoRA @ 500 |" in table and "| LoRA @ 1000 |" in table
    assert Image.open(chart).width > 300


def test_compare_runs_rejects_mixed_tasks(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps({"task": "canny", "metrics": {}}))
    (tmp_path / "b.json").write_text(json.dumps({"task": "segmentation", "metrics": {}}))
    files = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    with pytest.raises(SystemExit):
        compare_runs.main([*files, "--output", str(tmp_path / "c.png")])
    assert "cannot compare different tasks" in capsys.readouterr().err


def _dreambooth_error(tiny: TinyModels, tmp_path: Path, capsys, *extra: str) -> str:
    dataset = tmp_path / "dataset"
    args = dreambooth_args(
        tiny, dataset, tmp_path / "out", "--generated_dir", str(tmp_path / "gen")
    )
    with pytest.raises(SystemExit) as exit_info:
        evaluate_dreambooth.main([*args, *extra])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_dreambooth_empty_generated_folder(tiny, tmp_path, capsys):
    make_dreambooth_tree(tmp_path, ["can"])
    for path in (tmp_path / "gen" / "can").glob("*.png"):
        path.unlink()
    err = _dreambooth_error(tiny, tmp_path, capsys, "--subjects", "can")
    assert "gen/can is empty" in err


def test_dreambooth_lists_every_undecodable_image(tiny, tmp_path, capsys):
    make_dreambooth_tree(tmp_path, ["can"])
    for name in ("03_00.png", "07_01.png"):
        (tmp_path / "gen" / "can" / name).write_bytes(b"not a png")
    err = _dreambooth_error(tiny, tmp_path, capsys, "--subjects", "can")
    assert "2 image(s) could not be decoded" in err and "03_00.png" in err and "07_01.png" in err


def test_dreambooth_rejects_live_prompts_for_an_object(tiny, tmp_path, capsys):
    make_dreambooth_tree(tmp_path, ["clock"])
    live = subject_prompts(subjects()["dog"], "qwe")
    wrong = [p.replace("dog", "clock") for p in live]
    (tmp_path / "gen" / "clock" / "prompts.json").write_text(json.dumps(wrong))
    err = _dreambooth_error(tiny, tmp_path, capsys, "--subjects", "clock")
    assert "index 10" in err and "live subjects the live list" in err


def test_dreambooth_missing_prompt_and_unknown_subject(tiny, tmp_path, capsys):
    make_dreambooth_tree(tmp_path, ["can"])
    for path in (tmp_path / "gen" / "can").glob("24_*.png"):
        path.unlink()
    assert "no images for prompt index(es) 24" in _dreambooth_error(
        tiny, tmp_path, capsys, "--subjects", "can"
    )
    assert "unknown subject(s) ['pizza']" in _dreambooth_error(
        tiny, tmp_path, capsys, "--subjects", "pizza"
    )


def test_dreambooth_unknown_model_path(tiny, tmp_path, capsys):
    make_dreambooth_tree(tmp_path, ["can"])
    missing = str(tmp_path / "nowhere" / "dino")
    err = _dreambooth_error(tiny, tmp_path, capsys, "--subjects", "can", "--dino_model", missing)
    assert "--dino_model: " in err and "does not exist" in err


def make_ade_tree(root: Path, count: int = 3) -> tuple[Path, Path]:
    """images/<stem>.png (generated) and labels/<stem>.png (ADE20K-style, 0..150)."""
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        stem = f"ADE_val_{i:08d}"
        blob_image(i, size=(64, 48)).save(images / f"{stem}.png")
        label = rng.integers(0, 151, size=(6, 8), dtype=np.uint8)
        Image.fromarray(label).resize((80, 60), Image.Resampling.NEAREST).save(
            labels / f"{stem}.png"
        )
    return images, labels


def seg_args(tiny: TinyModels, images: Path, labels: Path, out: Path) -> list[str]:
    return [
        "segmentation", "--images", str(images), "--labels", str(labels),
        "--segformer_model", str(tiny.segformer), "--batch_size", "2", "--device", "cpu",
        "--output_dir", str(out),
    ]  # fmt: skip


def test_segmentation_end_to_end(tiny, tmp_path):
    images, labels = make_ade_tree(tmp_path)
    out = tmp_path / "out"
    assert evaluate_control.main(seg_args(tiny, images, labels, out)) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["task"] == "segmentation" and result["num_images"] == 3
    confusion = np.array(result["confusion_matrix"])
    assert confusion.shape == (150, 150)
    assert confusion.sum() == sum(
        int((np.asarray(Image.open(p)) > 0).sum()) for p in labels.iterdir()
    )  # every non-ignored pixel of every map, accumulated over the set
    # Ground truth (rows): each map's pixels by class, value k being class k - 1 (0 ignored).
    labels_by_class = np.zeros(150, np.int64)
    for path in labels.iterdir():
        values = np.asarray(Image.open(path)).ravel()
        labels_by_class += np.bincount(values, minlength=151)[1:]
    np.testing.assert_array_equal(confusion.sum(axis=1), labels_by_class)
    # The scores, class by class from the matrix (a class counts where it occurs at all).
    ious, accs = [], []
    for k in range(150):
        hits, truth, predicted = confusion[k, k], confusion[k].sum(), confusion[:, k].sum()
        if truth + predicted > 0:
            ious.append(hits / (truth + predicted - hits))
        if truth > 0:
            accs.append(hits / truth)
    metrics = result["metrics"]
    assert metrics["mIoU"] == pytest.approx(sum(ious) / len(ious), abs=1e-12)
    assert metrics["mAcc"] == pytest.approx(sum(accs) / len(accs), abs=1e-12)
    assert metrics["aAcc"] == pytest.approx(np.trace(confusion) / confusion.sum(), abs=1e-12)
    assert metrics["classes_scored"] == len(ious)
    assert "mIoU (%)" in (out / "results.md").read_text()
    assert Image.open(out / "contact_sheet.png").height > 3 * 150


def test_segmentation_count_mismatch_and_colour_labels(tiny, tmp_path, capsys):
    images, labels = make_ade_tree(tmp_path)
    (labels / "ADE_val_00000000.png").unlink()
    with pytest.raises(SystemExit):
        evaluate_control.main(seg_args(tiny, images, labels, tmp_path / "out"))
    err = capsys.readouterr().err
    assert "3 generated images" in err and "2 label maps" in err and "ADE_val_00000000" in err

    blob_image(0, size=(80, 60)).save(labels / "ADE_val_00000000.png")  # RGB, not a label map
    with pytest.raises(SystemExit):
        evaluate_control.main(seg_args(tiny, images, labels, tmp_path / "out"))
    assert "has mode RGB" in capsys.readouterr().err


def test_segmentation_empty_images_folder(tiny, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(SystemExit):
        evaluate_control.main(seg_args(tiny, tmp_path / "images", tmp_path / "labels", tmp_path))
    assert "is empty" in capsys.readouterr().err


def canny_args(images: Path, control: Path, out: Path, *extra: str) -> list[str]:
    return ["canny", "--images", str(images), "--control", str(control), "--output_dir", str(out)]


@pytest.mark.parametrize("kind", ["edges", "image"])
def test_canny_end_to_end_perfect_match(tmp_path, kind):
    images, control = tmp_path / "images", tmp_path / "control"
    images.mkdir()
    control.mkdir()
    for i in range(3):
        image = blob_image(i, size=(64, 64))
        image.save(images / f"{i:03d}.png")
        edges = Image.fromarray((canny_edges(image) * 255).astype(np.uint8))
        (edges if kind == "edges" else image).save(control / f"{i:03d}.png")
    out = tmp_path / "out"
    evaluate_control.main([*canny_args(images, control, out), "--control_kind", kind])
    result = json.loads((out / "results.json").read_text())
    assert result["metrics"]["iou"]["mean"] == pytest.approx(1.0)
    assert result["metrics"]["f1"]["mean"] == pytest.approx(1.0)
    assert result["config"]["low_threshold"] == 100 and result["num_scored"] == 3
    assert "| 1.000 ± 0.000 | 1.000 ± 0.000 |" in (out / "results.md").read_text()
    assert (out / "contact_sheet.png").exists()


def test_canny_undecodable_and_mismatch(tmp_path, capsys):
    images, control = tmp_path / "images", tmp_path / "control"
    images.mkdir()
    control.mkdir()
    blob_image(0).save(images / "a.png")
    (control / "a.png").write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        evaluate_control.main(canny_args(images, control, tmp_path / "out"))
    err = capsys.readouterr().err
    assert "1 image(s) could not be decoded" in err and "control/a.png" in err
    blob_image(1).save(control / "b.png")
    with pytest.raises(SystemExit):
        evaluate_control.main(canny_args(images, control, tmp_path / "out"))
    assert "without an image: ['b']" in capsys.readouterr().err


def test_dreambooth_generates_from_hra_weights_then_scores(tiny, tmp_path):
    pipe = build_tiny_pipeline(width=16)
    pipe.save_pretrained(tmp_path / "base")
    inject_hra(pipe.unet, HRAConfig(r=2))
    with torch.no_grad():
        for u in hra_parameters(pipe.unet):
            u.normal_()  # a trained-looking adapter, not the identity
    save_hra_weights(tmp_path / "runs" / "dog", unet=pipe.unet)
    dataset, _ = make_dreambooth_tree(tmp_path, ["dog"], samples=1)
    out = tmp_path / "out"
    generation = [
        "--weights", str(tmp_path / "runs" / "{subject}"), "--base_model", str(tmp_path / "base"),
        "--num_images", "2", "--steps", "1", "--guidance_scale", "1", "--subjects", "dog",
    ]  # fmt: skip
    assert evaluate_dreambooth.main(dreambooth_args(tiny, dataset, out, *generation)) == 0
    generated = out / "generated" / "dog"
    assert len(list(generated.glob("*.png"))) == 50
    assert json.loads((generated / "prompts.json").read_text())[10] == "a qwe dog wearing a red hat"
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["generation"]["num_images_per_prompt"] == 2
    assert result["checkpoints"][0]["subjects"]["dog"]["metrics"]["lpips_diversity"]["n"] == 25

    # Drawn with the HRA weights: prompt 10's images are the adapted pipeline's, not the base's.
    def draw(weights: Path | None) -> list[np.ndarray]:
        pipe = load_pipeline(str(tmp_path / "base"), weights, "dpm")
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            "a qwe dog wearing a red hat", num_images_per_prompt=2, num_inference_steps=1,
            guidance_scale=1, generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        return [np.asarray(image, np.int16) for image in images]

    saved = [np.asarray(Image.open(generated / f"10_{s:02d}.png"), np.int16) for s in range(2)]
    adapted, base = draw(tmp_path / "runs" / "dog"), draw(None)
    for image, hra_image, base_image in zip(saved, adapted, base, strict=True):
        assert np.abs(image - hra_image).max() <= 1
        assert np.abs(image - base_image).max() >= 20


def test_dreambooth_missing_weights_file(tiny, tmp_path, capsys):
    dataset, _ = make_dreambooth_tree(tmp_path, ["dog"], samples=1)
    args = dreambooth_args(tiny, dataset, tmp_path / "out", "--subjects", "dog")
    weights = ["--weights", str(tmp_path / "{subject}.safetensors"), "--base_model", "x"]
    with pytest.raises(SystemExit):
        evaluate_dreambooth.main([*args, *weights])
    assert "HRA weights not found" in capsys.readouterr().err


def test_checkpoint_sweep_needs_the_placeholder(tmp_path, capsys):
    argv = ["--dataset_dir", str(tmp_path), "--generated_dir", str(tmp_path / "gen")]
    with pytest.raises(SystemExit):
        evaluate_dreambooth.main([*argv, "--checkpoints", "1000", "--output_dir", str(tmp_path)])
    assert "--generated_dir must contain '{checkpoint}'" in capsys.readouterr().err


def test_dreambooth_runs_on_the_bundled_evaluators_with_no_model_flag(tmp_path, monkeypatch):
    from hra_diffusion.world.evaluators import CLIP_FILE, VIT_DIR

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_backbones"))
    dataset, generated = make_dreambooth_tree(tmp_path, ["cat"], samples=1)
    out = tmp_path / "out"
    args = ["--dataset_dir", str(dataset), "--generated_dir", str(generated), "--subjects", "cat",
            "--device", "cpu", "--output_dir", str(out)]  # fmt: skip
    assert evaluate_dreambooth.main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["models"]["dino"] == str(VIT_DIR) and result["models"]["clip"] == str(CLIP_FILE)
    assert result["lpips"]["available"] is False
    assert -1 <= result["checkpoints"][0]["overall"]["clip_t"]["mean"] <= 1


def test_split_passthrough_hands_options_after_the_marker_to_training() -> None:
    assert split_passthrough(["--tasks", "canny", "--", "--hra_r", "4", "--"]) == (
        ["--tasks", "canny"],
        ["--hra_r", "4", "--"],
    )
    assert split_passthrough(["--tasks", "canny"]) == (["--tasks", "canny"], [])
    assert split_passthrough(["--"]) == ([], [])
