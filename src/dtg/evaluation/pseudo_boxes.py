"""Pseudo-box quality per class and score threshold, and per-class thresholds chosen from it.

Pure functions over tensors. The teacher's final detections (in the student view, as sparse's
pseudo boxes are) are scored against the ground truth: a detection of class ``c`` with score
``>= t`` is **correct** when its IoU with a ground-truth box of class ``c`` is >= ``iou``, and
**located** when its IoU with any ground-truth box is; a ground-truth box of class ``c`` is
**recalled** at ``t`` when a detection of class ``c`` with score ``>= t`` covers it.
:func:`detection_counts` returns sums (images add up), :func:`precision_recall` the ratios and
:func:`suggest_class_thresholds` the lowest threshold per class whose precision reaches a target.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
FIELDS = ("detections", "correct", "located", "gt_boxes", "recalled")


def detection_counts(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     num_classes: int, thresholds: Sequence[float] = THRESHOLDS, iou: float = 0.5) -> Tensor:
    """Counts of one image's detections per threshold and class.

    Args:
        boxes: (D, 4) xyxy detections; scores: (D,); labels: (D,) int64 in 1..K.
        gt_boxes: (G, 4) xyxy ground truth in the same view; gt_labels: (G,) int64 in 1..K.
        num_classes: K. thresholds: the T score thresholds. iou: the match threshold.

    Returns:
        (T, K, 5) float64 sums of :data:`FIELDS` (class ``c`` at index ``c - 1``).
    """
    scores = scores.cpu()
    t = torch.as_tensor(thresholds, dtype=scores.dtype).view(-1, 1)  # (T, 1), compared in the scores' precision
    out = torch.zeros(len(thresholds), num_classes, len(FIELDS), dtype=torch.float64)
    classes = torch.arange(1, num_classes + 1).view(1, -1)  # (1, K)
    kept = scores.view(1, -1) >= t  # (T, D)
    det_cls = labels.cpu().view(-1, 1) == classes  # (D, K)
    gt_cls = gt_labels.cpu().view(-1, 1) == classes  # (G, K)
    if boxes.numel() and gt_boxes.numel():
        overlap = box_iou(boxes.float().cpu(), gt_boxes.float().cpu()) >= iou  # (D, G)
        same = labels.cpu().view(-1, 1) == gt_labels.cpu().view(1, -1)  # (D, G)
        correct, located = (overlap & same).any(1), overlap.any(1)  # (D,)
        hits = (overlap & same).double()  # (D, G): detection d recalls ground truth g if kept
        recalled = (kept.double() @ hits) > 0  # (T, G)
    else:
        correct = located = torch.zeros(boxes.shape[0], dtype=torch.bool)
        recalled = torch.zeros(len(thresholds), gt_boxes.shape[0], dtype=torch.bool)
    k = kept.double()
    out[..., 0] = k @ det_cls.double()
    out[..., 1] = k @ (det_cls & correct.view(-1, 1)).double()
    out[..., 2] = k @ (det_cls & located.view(-1, 1)).double()
    out[..., 3] = gt_cls.double().sum(0).view(1, -1).expand(len(thresholds), -1)
    out[..., 4] = recalled.double() @ gt_cls.double()
    return out


def precision_recall(counts: Tensor) -> dict[str, Tensor]:
    """Ratios of summed counts: ``precision``, ``box_precision`` (any class) and ``recall``, each
    (T, K + 1) with the last column over all classes; NaN where nothing was counted."""
    full = torch.cat([counts, counts.sum(1, keepdim=True)], dim=1)  # (T, K + 1, 5)

    def ratio(a: int, b: int) -> Tensor:
        den = full[..., b]
        return torch.where(den > 0, full[..., a] / den.clamp(min=1), torch.full_like(den, float("nan")))

    return {"precision": ratio(1, 0), "box_precision": ratio(2, 0), "recall": ratio(4, 3)}


def suggest_class_thresholds(counts: Tensor, thresholds: Sequence[float] = THRESHOLDS, target: float = 0.7,
                             min_detections: int = 5) -> list[float | None]:
    """Per class, the lowest threshold whose precision is >= ``target`` over >= ``min_detections``
    detections (a threshold with fewer detections is passed over); None when none qualifies.

    Args:
        counts: (T, K, 5) summed :func:`detection_counts` for ``thresholds`` (ascending).
    """
    out: list[float | None] = []
    for c in range(counts.shape[1]):
        pick = None
        for i, t in enumerate(thresholds):
            n, ok = float(counts[i, c, 0]), float(counts[i, c, 1])
            if n >= min_detections and ok / n >= target:
                pick = float(t)
                break
        out.append(pick)
    return out


__all__ = ["FIELDS", "THRESHOLDS", "detection_counts", "precision_recall", "suggest_class_thresholds"]
