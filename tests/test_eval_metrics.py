"""Metric arithmetic on small inputs with answers worked out by hand, and the benchmark data."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hra_diffusion.eval.dreambooth_benchmark import (
    prompt_templates,
    strip_identifier,
    subject_prompts,
    subjects,
)
from hra_diffusion.eval.edge_metrics import binary_edges, canny_edges, edge_iou_f1
from hra_diffusion.eval.segmentation_metrics import (
    IGNORE_INDEX,
    ade20k_labels,
    confusion_matrix,
    segmentation_scores,
)
from hra_diffusion.eval.similarity import (
    cosine_matrix,
    distinct_pairs,
    mean_pairwise_cosine,
    mean_std,
    paired_cosine,
)

LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


def test_mean_pairwise_cosine_by_hand():
    a = torch.tensor([[3.0, 4.0]])
    b = torch.tensor([[4.0, 3.0], [0.0, 5.0]])
    # cos = 24/25 and 20/25  ->  mean 0.88
    assert cosine_matrix(a, b)[0].tolist() == pytest.approx([0.96, 0.8])
    assert mean_pairwise_cosine(a, b) == pytest.approx(0.88)
    assert mean_pairwise_cosine(b, a) == pytest.approx(0.88)  # symmetric
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert mean_pairwise_cosine(c, torch.tensor([[1.0, 1.0]])) == pytest.approx(1 / math.sqrt(2))


def test_identical_embeddings_give_one():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cosine_matrix(x, x).diagonal(), torch.ones(5, dtype=torch.float64))
    assert paired_cosine(x, 3 * x).tolist() == pytest.approx([1.0] * 5)
    assert mean_pairwise_cosine(x[:1], x[:1].repeat(4, 1)) == pytest.approx(1.0)


def test_distinct_pairs_and_mean_std():
    assert distinct_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    assert distinct_pairs(1) == []
    stat = mean_std([1.0, 2.0, 3.0, 4.0])
    assert stat["mean"] == 2.5 and stat["n"] == 4
    assert stat["std"] == pytest.approx(math.sqrt(1.25))
    assert math.isnan(mean_std([])["mean"])


def test_confusion_and_scores_with_ignored_and_absent_classes():
    target = np.array([[0, 1], [1, IGNORE_INDEX]])
    pred = np.array([[0, 1], [0, 2]])  # the ignored pixel's prediction does not count
    confusion = confusion_matrix(target, pred, num_classes=3)
    assert confusion.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    s = segmentation_scores(confusion)
    # IoU0 = 1/(1+2-1) = .5, IoU1 = 1/(2+1-1) = .5, class 2 absent everywhere -> excluded
    assert s["mIoU"] == pytest.approx(0.5)
    assert s["mAcc"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["aAcc"] == pytest.approx(2 / 3)
    assert s["classes_scored"] == 2 and math.isnan(s["per_class_iou"][2])


def test_predicted_but_absent_class_counts_as_zero_iou():
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 2, 1, 1]])
    s = segmentation_scores(confusion_matrix(target, pred, num_classes=3))
    # IoU = [1/2, 1, 0]; Acc = [1/2, 1, nan]
    assert s["mIoU"] == pytest.approx(0.5)
    assert s["mAcc"] == pytest.approx(0.75)
    assert s["aAcc"] == pytest.approx(0.75)


def test_confusion_is_accumulated_over_the_set_not_averaged_per_image():
    t1, p1 = np.array([[0, 0, 0, 1]]), np.array([[0, 0, 0, 0]])  # per image mIoU = .375
    t2, p2 = np.array([[1]]), np.array([[1]])  # per image mIoU = 1
    total = confusion_matrix(t1, p1, 2) + confusion_matrix(t2, p2, 2)
    s = segmentation_scores(total)
    # set: C = [[3,0],[1,1]] -> IoU0 = 3/4, IoU1 = 1/2 -> mIoU .625 (per-image mean would be .6875)
    assert s["mIoU"] == pytest.approx(0.625)
    assert s["aAcc"] == pytest.approx(4 / 5)


def test_ade20k_label_shift_and_range():
    out = ade20k_labels(np.array([[0, 1], [150, 2]], dtype=np.uint8))
    assert out.tolist() == [[IGNORE_INDEX, 0], [149, 1]]
    with pytest.raises(ValueError, match="exceeds the 150 classes"):
        ade20k_labels(np.array([[151]]))


def test_edge_iou_f1_known_overlap():
    generated = np.zeros((4, 4), dtype=bool)
    target = np.zeros((4, 4), dtype=bool)
    generated[0, :4] = True  # 4 edge pixels
    target[0, 2:4] = True
    target[1, 0:2] = True  # 4 edge pixels, 2 shared
    iou, f1 = edge_iou_f1(generated, target)
    assert iou == pytest.approx(2 / 6)
    assert f1 == pytest.approx(2 * 2 / 8)
    assert edge_iou_f1(target, generated) == (iou, f1)  # symmetric
    assert edge_iou_f1(target, target) == (1.0, 1.0)
    assert all(math.isnan(v) for v in edge_iou_f1(np.zeros((2, 2)), np.zeros((2, 2))))


def test_canny_of_a_square_matches_its_own_edges():
    image = Image.new("RGB", (32, 32), "black")
    ImageDraw.Draw(image).rectangle((8, 8, 23, 23), fill="white")
    edges = canny_edges(image)
    assert edges.any() and not edges[0].any()
    assert edge_iou_f1(edges, canny_edges(image.copy())) == (1.0, 1.0)
    as_map = Image.fromarray((edges * 255).astype(np.uint8))
    assert np.array_equal(binary_edges(as_map), edges)
    assert not canny_edges(image, low=1000, high=2000).any()  # thresholds are used


def test_benchmark_has_30_subjects_and_the_right_prompt_list_each():
    table = subjects()
    assert len(table) == 30
    assert {name for name, s in table.items() if s.live} == LIVE
    assert table["bear_plushie"].class_noun == "stuffed animal"
    objects, live = prompt_templates("object"), prompt_templates("live")
    assert len(objects) == len(live) == 25 and len(set(objects)) == 25
    assert objects[:10] == live[:10] and objects[20:] == live[20:]
    for name, subject in table.items():
        prompts = subject_prompts(subject, "qwe")
        assert len(prompts) == 25
        assert all(f"qwe {subject.class_noun}" in p for p in prompts)
        outfit = any("outfit" in p for p in prompts)
        assert outfit == (name in LIVE), name
    assert subject_prompts(table["dog"], "qwe")[14] == "a qwe dog in a chef outfit"
    assert (
        subject_prompts(table["teapot"], "qwe")[14] == "a qwe teapot floating in an ocean of milk"
    )


def test_strip_identifier():
    assert strip_identifier("a qwe dog in the jungle", "qwe") == "a dog in the jungle"
    assert strip_identifier("a cube shaped qwe teapot", "qwe") == "a cube shaped teapot"
    assert strip_identifier("a sks qwerty toy", "qwe") == "a sks qwerty toy"
