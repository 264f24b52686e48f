"""benchmarks/method_world.py end to end on a random tiny SD: sweep, runs, scores, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from PIL import Image

from hra_diffusion.eval.world_dreambooth import distances, recontext_rate
from hra_diffusion.world import scorer
from hra_diffusion.world.subjects import SUBJECTS, VIEW_BACKGROUNDS, render_views


def test_whole_pipeline_runs_small_and_resumes(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """One sweep rate: choosing among rates is best_rate's, tested below."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no LPIPS backbone file
    bench = load_benchmark("method_world")
    work, out = tmp_path / "work", tmp_path / "results"
    argv = [
        "--model", str(model_dir), "--methods", "hra", "lora",
        "--subjects", "donut", "--sweep_subject", "robot", "--seeds", "0", "1",
        "--learning_rates", "1e-3", "--max_train_steps", "2", "--curve_every", "1",
        "--num_images", "2", "--work_dir", str(work), "--output_dir", str(out),
        "--", "--resolution", "32",
    ]  # fmt: skip
    sweep = bench.main([*argv[:-3], "--sweep_only", *argv[-3:]])
    assert len(list(work.glob("runs/**/record.json"))) == 2  # 2 methods x 1 rate, no test run
    assert "methods" not in sweep and set(sweep["sweep"]["hra"]) == {"0.001"}
    assert "| HRA r=8 λ=0 | 0.001 |" in (out / "results.md").read_text()
    results = bench.main(argv)

    same = [json.dumps(r["sweep"], sort_keys=True) for r in (results, sweep)]  # NaN == NaN
    assert same[0] == same[1]  # the sweep's runs are reused
    assert results["learning_rates"] == {"hra": 0.001, "lora": 0.001}
    assert set(results["sweep"]["lora"]) == {"0.001"}
    match = results["parameter_match"]
    assert match["lora_rank"] >= 1 and 0.5 < match["lora"] / match["hra"] < 2
    for method in ("hra", "lora"):
        summary = results["methods"][method]
        assert summary["runs"] == 2  # 1 subject x 2 seeds
        assert set(summary["curve"]) == {"1", "2"}
        assert summary["step_seconds"]["mean"] > 0
        for name in ("dino", "clip_i", "clip_t", "dino_feature_diversity", "object_distance"):
            assert summary["scores"][name]["n"] == 2, name
        for step in ("1", "2"):  # both adapters moved the base (checkpoints 1 and 2)
            assert summary["curve"][step]["weight_change"]["mean"] > 0
    assert results["methods"]["lora"]["trainable_parameters"] == match["lora"]
    assert results["methods"]["hra"]["trainable_parameters"] == match["hra"]
    table = (out / "results.md").read_text()
    assert "LoRA (PEFT)" in table and "HRA r=8 λ=0" in table and "LPIPS-style diversity" in table
    assert "‖ΔW‖/‖W‖ step 1" in table and "Learning-rate sweep on `robot`" in table
    assert "LPIPS diversity ↑" not in table  # no backbone file here: no empty column
    assert set(results["paired_vs_lora"]) == {"hra"}
    assert results["paired_vs_lora"]["hra"]["dino"]["n"] == 2
    assert "LoRA minus each HRA method" in table
    bounds = results["references"]  # 1 test subject: each bound is one subject's scores
    assert {b["dino"]["n"] for b in bounds.values()} == {1}
    assert "| ceiling: the subject itself, decoded |" in table
    assert "| floor: another subject, decoded |" in table
    for chart in ("fidelity_curve.png", "weight_change.png"):
        assert Image.open(out / chart).size == (640, 360)
    saved = json.loads((out / "results.json").read_text())
    assert saved["learning_rates"] == results["learning_rates"]

    records = sorted(work.glob("runs/**/record.json"))
    assert len(records) == 6  # 2 methods x (1 sweep rate + 2 seeds)
    stamps = [p.stat().st_mtime_ns for p in records]
    again = bench.main(argv)  # every run is finished: nothing trains or scores again
    assert [p.stat().st_mtime_ns for p in sorted(work.glob("runs/**/record.json"))] == stamps
    assert json.dumps(again["methods"]) == json.dumps(results["methods"])  # NaN: no LPIPS

    fresh = tmp_path / "fresh"  # an empty work folder: everything comes from --reuse
    argv_reuse = [*argv[:-3], "--reuse", str(out / "results.json"), *argv[-3:]]
    argv_reuse[argv_reuse.index(str(work))] = str(fresh)
    reused = bench.main(argv_reuse)
    assert not list(fresh.glob("runs/**/record.json"))  # nothing trained
    assert json.dumps(reused["methods"]) == json.dumps(results["methods"])
    assert json.dumps(reused["sweep"], sort_keys=True) == same[0]

    argv_reuse[argv_reuse.index("--num_images") + 1] = "3"
    with pytest.raises(SystemExit, match="was made with num_images 2, this run has 3"):
        bench.main(argv_reuse)


def test_best_rate_lowest_distance_highest_similarity():
    bench = load_benchmark("method_world")
    by_rate = {
        "0.001": {"object_distance": 0.7, "dino": 0.30},
        "0.003": {"object_distance": 0.5, "dino": 0.10},
        "0.01": {"object_distance": 0.6, "dino": 0.20},
    }
    assert bench.best_rate(by_rate, "object_distance") == 0.003
    assert bench.best_rate(by_rate, "dino") == 0.001


def test_reuse_refuses_a_file_that_is_not_results(tmp_path: Path):
    bench = load_benchmark("method_world")
    (tmp_path / "x.json").write_text("not json")
    argv = ["--reuse", str(tmp_path / "x.json"), "--work_dir", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match=r"error: --reuse .*x.json is not JSON"):
        bench.main(argv)


def test_relative_change_equals_the_naive_norms():
    bench = load_benchmark("method_world")
    base = {"a": torch.tensor([[3.0, 0.0], [0.0, 4.0]]), "b": torch.tensor([0.0, 0.0, 12.0])}
    tuned = {"a": torch.tensor([[3.0, 1.0], [0.0, 4.0]]), "b": torch.tensor([2.0, 0.0, 12.0])}
    # ||dW||^2 = 1 + 4 over both layers, ||W||^2 = 9 + 16 + 144
    assert bench.relative_change(base, tuned) == pytest.approx(math.sqrt(5 / 169), rel=1e-12)
    assert bench.relative_change(base, base) == 0.0


def test_paired_difference_matches_subjects_and_seeds():
    bench = load_benchmark("method_world")
    s = bench.Settings("m", Path("w"), 2, 1, 1, [], 1, None, [])

    def record(subject: str, seed: int, dino: float) -> dict:
        return {"run": {"subject": subject, "seed": seed}, "steps": {"2": {"dino": dino}}}

    a = [record("donut", 0, 0.5), record("donut", 1, 0.1), record("flag", 0, 0.9)]
    b = [record("flag", 0, 0.6), record("donut", 1, 0.3), record("donut", 0, 0.2)]  # shuffled
    diffs = [0.3, -0.2, 0.3]
    mean = sum(diffs) / 3
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (3 * 2))
    got = bench.paired_difference(a, b, "dino", s)
    assert got["mean"] == pytest.approx(mean) and got["stderr"] == pytest.approx(stderr)
    assert (got["n"], got["higher"]) == (3, 2)


def test_sweep_subject_must_not_be_a_test_subject(tmp_path: Path):
    bench = load_benchmark("method_world")
    argv = ["--subjects", "robot", "donut", "--work_dir", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match="error: --sweep_subject robot is also in --subjects"):
        bench.main(argv)
    assert not (tmp_path / "w").exists()


def test_perfect_samples_draw_the_subject_where_the_prompts_ask():
    bench = load_benchmark("method_world")
    robot = bench.perfect_samples("robot", 7)
    assert [len(images) for images in robot.values()] == [7, 7]
    views = render_views(SUBJECTS["robot"])
    assert [scorer.read_scene(im).background for im in robot["instance"]] == [
        *VIEW_BACKGROUNDS,
        *VIEW_BACKGROUNDS[:2],
    ]
    assert recontext_rate(robot["recontext"]) == 1.0
    own = distances(robot["instance"], views)["object"]
    other = distances(bench.perfect_samples("donut", 7)["instance"], views)["object"]
    assert own < 0.1 and other > 0.5, (own, other)  # measured 0.048 and 0.955
