"""Target quality: a method's training labels on student samples, scored against the hidden ground truth.

Pure functions over tensors (no models, no files); :mod:`dtg.bench.targets` runs a checkpoint's
teacher and feeds them. One *stage* is a set of N student samples (R-CNN RoIs or RPN anchors,
student view) with the label a method gives each (``> 0`` class, ``0`` background, ``-1``
ignored) and, for some positives, the box it regresses toward.

A sample is **ground-truth positive** for class ``c`` when its box has IoU >= ``iou`` (0.5)
with a ground-truth box of class ``c`` (RPN: any class, all labels 1). A positive label is
**correct** when the sample is ground-truth positive for the labelled class. So

* precision = correct / positives;
* recall = correct among ground-truth-positive samples / ground-truth-positive samples;
* background share / ignored share = ground-truth-positive samples labelled 0 / -1;
* wrong-class share = positives that are ground-truth positive for another class only;
* target IoU = mean over positives with a regression target of the target box's best IoU
  with any ground-truth box.

:func:`stage_counts` returns sums (so images and batches add up), :func:`summarize` the ratios.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

COUNTS = ("samples", "positives", "correct", "wrong_class", "gt_positive", "recalled", "gt_pos_background",
          "gt_pos_ignored", "reg_targets", "reg_iou_sum")


def stage_counts(samples: Tensor, labels: Tensor, target_boxes: Tensor | None, reg_mask: Tensor | None,
                 gt_boxes: Tensor, gt_labels: Tensor, iou: float = 0.5) -> dict[str, float]:
    """Counts of one stage of one image (see the module docstring).

    Args:
        samples: (N, 4) xyxy the student samples' own boxes (student view).
        labels: (N,) int64 the method's labels: class > 0, 0 background, -1 ignored.
        target_boxes: (N, 4) xyxy the box each sample regresses toward (rows outside
            ``reg_mask`` are not read), or None for no regression targets.
        reg_mask: (N,) bool, samples with a regression target (None: none).
        gt_boxes: (G, 4) xyxy ground truth in the student view; gt_labels: (G,) int64 1..K.
        iou: IoU at which a sample counts as covering a ground-truth box.

    Returns:
        Sums keyed by :data:`COUNTS` (``reg_iou_sum`` a float, the others whole numbers).
    """
    n = samples.shape[0]
    pos = labels > 0
    if gt_boxes.numel() and n:
        overlap = box_iou(samples.float(), gt_boxes.float()) >= iou  # (N, G)
        same = gt_labels.view(1, -1) == labels.view(-1, 1)  # (N, G)
        correct = pos & (overlap & same).any(dim=1)
        gt_positive = overlap.any(dim=1)
    else:
        correct = gt_positive = torch.zeros(n, dtype=torch.bool, device=samples.device)
    out = {
        "samples": float(n),
        "positives": float(pos.sum()),
        "correct": float(correct.sum()),
        "wrong_class": float((pos & gt_positive & ~correct).sum()),
        "gt_positive": float(gt_positive.sum()),
        "recalled": float((gt_positive & correct).sum()),
        "gt_pos_background": float((gt_positive & (labels == 0)).sum()),
        "gt_pos_ignored": float((gt_positive & (labels < 0)).sum()),
        "reg_targets": 0.0,
        "reg_iou_sum": 0.0,
    }
    if target_boxes is not None and reg_mask is not None:
        rows = (reg_mask & pos).nonzero().squeeze(1)
        out["reg_targets"] = float(rows.numel())
        if rows.numel() and gt_boxes.numel():
            out["reg_iou_sum"] = float(box_iou(target_boxes[rows].float(), gt_boxes.float()).amax(dim=1).sum())
    return out


def add_counts(total: dict[str, float], part: Mapping[str, float]) -> dict[str, float]:
    """``total`` with ``part`` added key by key (in place; missing keys start at 0)."""
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + float(v)
    return total


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(counts: Mapping[str, float], images: int) -> dict[str, float | None]:
    """Ratios of summed :func:`stage_counts` over ``images`` images (None where undefined)."""
    return {
        "positives_per_image": _ratio(counts["positives"], images),
        "precision": _ratio(counts["correct"], counts["positives"]),
        "wrong_class": _ratio(counts["wrong_class"], counts["positives"]),
        "recall": _ratio(counts["recalled"], counts["gt_positive"]),
        "gt_pos_background": _ratio(counts["gt_pos_background"], counts["gt_positive"]),
        "gt_pos_ignored": _ratio(counts["gt_pos_ignored"], counts["gt_positive"]),
        "target_iou": _ratio(counts["reg_iou_sum"], counts["reg_targets"]),
        "gt_positive_per_image": _ratio(counts["gt_positive"], images),
    }


def pseudo_assignment(samples: Tensor, boxes: Tensor, labels: Tensor, matcher: Matcher,
                      ignore_boxes: Tensor | None = None, ignore_iou: float | None = None) -> tuple[Tensor, Tensor]:
    """The sparse baseline's labels on given samples: Faster R-CNN's matcher against pseudo boxes.

    Args:
        samples: (N, 4) xyxy student samples; boxes: (m, 4) xyxy pseudo boxes (student view);
        labels: (m,) int64 their classes (RPN: pass ones).
        matcher: the stage's ``Matcher`` (the detector's ``rpn.proposal_matcher`` or
            ``roi_heads.proposal_matcher``): below its low threshold background, between the
            thresholds ignored, above it the matched pseudo box's class.
        ignore_boxes: (u, 4) uncertain pseudo boxes; a background sample with IoU >=
            ``ignore_iou`` with one is ignored (as the sparse loss does).

    Returns:
        ``(labels (N,) int64 in -1..K, matched (N, 4) xyxy the pseudo box each positive regresses
        toward; rows of non-positives are the samples' own boxes)``.
    """
    n = samples.shape[0]
    out = torch.zeros(n, dtype=torch.int64, device=samples.device)
    target = samples.clone()
    if boxes.numel() and n:
        idx = matcher(box_iou(boxes.float(), samples.float()))  # (N,) index, -1 below, -2 between
        hit = idx >= 0
        out[hit] = labels[idx[hit]].to(torch.int64)
        out[idx == Matcher.BETWEEN_THRESHOLDS] = -1
        target[hit] = boxes[idx[hit]].to(target.dtype)
    if ignore_boxes is not None and ignore_boxes.numel() and n and ignore_iou is not None:
        near = box_iou(samples.float(), ignore_boxes.float()).amax(dim=1) >= ignore_iou
        out[(out == 0) & near] = -1
    return out, target


def positive_weights(labels: Tensor, cluster: Tensor, normalize: str, denominator: int | None = None) -> Tensor:
    """The weight each positive's classification term gets in one batch's DTG loss (before alpha).

    Mirrors :func:`dtg.methods.dtg.losses.inc_classification_loss`: ``"samples"`` divides every
    labelled sample by their number; ``"cluster"`` gives a member ``1 / (C N_j)`` (C clusters
    in the batch, N_j members in its cluster); ``"supervised"`` ``1 / denominator``.

    Args:
        labels: (N,) int64 labels of the batch (> 0 members, 0 background, -1 ignored).
        cluster: (N,) int64 cluster ids (>= 0 for members).

    Returns:
        (P,) float weights of the P positives, in sample order.
    """
    pos = labels > 0
    if normalize == "samples":
        return torch.full((int(pos.sum()),), 1.0 / max(int((labels >= 0).sum()), 1))
    if normalize == "supervised":
        return torch.full((int(pos.sum()),), 1.0 / max(int(denominator or 0), 1))
    if normalize != "cluster":
        raise ValueError(f"normalize must be 'samples', 'cluster' or 'supervised', got {normalize!r}")
    ids = cluster[pos]
    if ids.numel() == 0:
        return torch.zeros(0)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return 1.0 / (counts.numel() * counts[inverse].double()).float()


def paired_share(partner: Tensor, offsets: list[int], num_student: int) -> list[float]:
    """Per FPN level, the share of student anchors that some teacher anchor is paired with.

    Args:
        partner: (A_t,) int64 student anchor of each teacher anchor, -1 for none.
        offsets: index of each level's first student anchor; num_student: A_s.
    """
    hit = torch.zeros(num_student, dtype=torch.bool)
    p = partner[partner >= 0].cpu()
    hit[p] = True
    bounds = [*offsets, num_student]
    return [float(hit[a:b].float().mean()) if b > a else 0.0 for a, b in zip(bounds[:-1], bounds[1:])]
