"""The sparse-to-dense baseline's pseudo labels: the teacher's confident final detections, in student space."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from dtg.geometry import project_boxes, valid_boxes


def pseudo_targets(
    detections: dict[str, torch.Tensor],
    teacher_to_student: torch.Tensor,
    student_size: tuple[int, int],
    score_thresh: float | torch.Tensor = 0.9,
    uncertain_thresh: float | None = None,
) -> dict[str, torch.Tensor]:
    """Targets for the student from the teacher's detections on the weak view.

    Args:
        detections: ``boxes`` (n, 4) xyxy in the weak view, ``scores`` (n,), ``labels`` (n,) in 1..K
            (the teacher's final detections, after NMS).
        teacher_to_student: (3, 3) matrix ``M = H_s @ inv(H_t)`` from weak to strong view.
        student_size: (H, W) of the strong view.
        score_thresh: keep detections with ``score >= score_thresh``; a (K + 1,) tensor gives the
            threshold of each label (index = label, entry 0 unused): per-class thresholds.
        uncertain_thresh: when given (< ``score_thresh``), detections with
            ``uncertain_thresh <= score < score_thresh`` are returned as ``"ignore"`` boxes too:
            the student's background samples on them are left out of the loss
            (:func:`background_to_ignore`) instead of teaching "background" on a likely object.

    Returns:
        ``{"boxes": (m, 4) float32 xyxy in the strong view, "labels": (m,) int64}``, plus
        ``"ignore": (u, 4)`` with ``uncertain_thresh``; boxes that leave the student image
        (narrower or shorter than 1 px after clipping) are dropped. ``m`` and ``u`` may be 0.
    """
    scores = detections["scores"]
    if isinstance(score_thresh, torch.Tensor):
        score_thresh = score_thresh.to(scores.device, scores.dtype)[detections["labels"]]
    keep = scores >= score_thresh
    boxes = project_boxes(detections["boxes"][keep].float(), teacher_to_student, student_size)
    labels = detections["labels"][keep]
    inside = valid_boxes(boxes)
    out = {"boxes": boxes[inside], "labels": labels[inside].to(torch.int64)}
    if uncertain_thresh is not None:
        band = (scores >= uncertain_thresh) & ~keep
        unsure = project_boxes(detections["boxes"][band].float(), teacher_to_student, student_size)
        out["ignore"] = unsure[valid_boxes(unsure)]
    return out


def background_to_ignore(labels: torch.Tensor, boxes: torch.Tensor, ignore_boxes: torch.Tensor,
                         iou_threshold: float) -> torch.Tensor:
    """Background samples that overlap an uncertain teacher box, turned into "ignored".

    The sparse baseline's ignore band: the rule its methods pass to the detector's losses
    (``ignore_rule``, :data:`dtg.models.detector.IgnoreRule`), which know no band of their own.

    Args:
        labels: (N,) int64 sample labels after the ordinary assignment (0 = background,
            > 0 foreground, -1 already ignored).
        boxes: (N, 4) xyxy the samples' boxes (anchors or RoIs) in the student view.
        ignore_boxes: (U, 4) xyxy uncertain teacher boxes in the student view; U may be 0.
        iou_threshold: a background sample with IoU >= this with any uncertain box is ignored.

    Returns:
        (N,) bool mask of the background samples to leave out; foreground is never touched.
    """
    if ignore_boxes.numel() == 0 or labels.numel() == 0:
        return torch.zeros_like(labels, dtype=torch.bool)
    best = box_iou(boxes.float(), ignore_boxes.float()).amax(dim=1)
    return (labels == 0) & (best >= iou_threshold)
