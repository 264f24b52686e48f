"""Semantic-segmentation scores from a confusion matrix accumulated over the whole set.

With C[t, p] = number of pixels of ground-truth class t predicted as p (ignored pixels left out):

    IoU_k = C[k, k] / (sum_p C[k, p] + sum_t C[t, k] - C[k, k])
    Acc_k = C[k, k] / sum_p C[k, p]                      (per-class recall)
    mIoU  = nan-mean_k IoU_k,   mAcc = nan-mean_k Acc_k,   aAcc = sum_k C[k, k] / sum C

A class absent from both ground truth and prediction over the whole set has IoU 0/0 = NaN and
is left out of the mean; a class absent from the ground truth but predicted has IoU 0 and
Acc NaN.  The matrix is summed over all images before any ratio (as mmsegmentation does), not
averaged per image.

ADE20K annotation maps store 0 for "other" (ignored) and k in 1..150 for class k - 1 of the
150 SegFormer outputs; :func:`ade20k_labels` does that shift.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def ade20k_labels(annotation: np.ndarray, num_classes: int = 150) -> np.ndarray:
    """Map an ADE20K annotation (H, W) with values 0..num_classes to labels 0..num_classes-1.

    Value 0 ("other") becomes :data:`IGNORE_INDEX`; value k >= 1 becomes k - 1.
    Raises ValueError when a value exceeds ``num_classes``.
    """
    annotation = annotation.astype(np.int64)
    if annotation.size and annotation.max() > num_classes:
        raise ValueError(
            f"annotation value {int(annotation.max())} exceeds the {num_classes} classes "
            "(ADE20K maps hold 0 for 'other' and 1..150 for the classes)"
        )
    return np.where(annotation == 0, IGNORE_INDEX, annotation - 1)


def confusion_matrix(
    target: np.ndarray, prediction: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Confusion matrix C (num_classes, num_classes), C[t, p] = #pixels with target t, pred p.

    ``target`` and ``prediction`` are integer label maps of the same shape; pixels whose target
    equals ``ignore_index`` are not counted.
    """
    if target.shape != prediction.shape:
        raise ValueError(f"target {target.shape} and prediction {prediction.shape} differ")
    keep = target != ignore_index
    t = target[keep].astype(np.int64)  # (P,)
    p = prediction[keep].astype(np.int64)  # (P,)
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target labels must lie in 0..{num_classes - 1} or be {ignore_index}")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in 0..{num_classes - 1}")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray) -> dict[str, object]:
    """mIoU, mAcc, aAcc (fractions in [0, 1]) and per-class IoU / Acc from a confusion matrix.

    Per-class values are NaN where undefined (see module docstring); the means skip NaNs.
    """
    c = confusion.astype(np.float64)
    true_positive = np.diag(c)  # (K,)
    gt_total = c.sum(axis=1)  # (K,)
    pred_total = c.sum(axis=0)  # (K,)
    union = gt_total + pred_total - true_positive  # (K,)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)  # (K,)
        acc = np.where(gt_total > 0, true_positive / gt_total, np.nan)  # (K,)
    total = c.sum()
    return {
        "mIoU": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
        "mAcc": float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else float("nan"),
        "aAcc": float(true_positive.sum() / total) if total > 0 else float("nan"),
        "per_class_iou": iou.tolist(),
        "per_class_acc": acc.tolist(),
        "classes_scored": int(np.sum(~np.isnan(iou))),
    }
