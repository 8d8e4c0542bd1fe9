"""The sparse-to-dense baseline's pseudo labels: the teacher's confident final detections, in student space."""

from __future__ import annotations

import torch

from dtg.data.transforms import project_boxes, valid_boxes


def pseudo_targets(
    detections: dict[str, torch.Tensor],
    teacher_to_student: torch.Tensor,
    student_size: tuple[int, int],
    score_thresh: float = 0.9,
) -> dict[str, torch.Tensor]:
    """Targets for the student from the teacher's detections on the weak view.

    Args:
        detections: ``boxes`` (n, 4) xyxy in the weak view, ``scores`` (n,), ``labels`` (n,) in 1..K
            (the teacher's final detections, after NMS).
        teacher_to_student: (3, 3) matrix ``M = H_s @ inv(H_t)`` from weak to strong view.
        student_size: (H, W) of the strong view.
        score_thresh: keep detections with ``score >= score_thresh``.

    Returns:
        ``{"boxes": (m, 4) float32 xyxy in the strong view, "labels": (m,) int64}``; boxes that
        leave the student image (narrower or shorter than 1 px after clipping) are dropped. ``m`` may be 0.
    """
    keep = detections["scores"] >= score_thresh
    boxes = project_boxes(detections["boxes"][keep].float(), teacher_to_student, student_size)
    labels = detections["labels"][keep]
    inside = valid_boxes(boxes)
    return {"boxes": boxes[inside], "labels": labels[inside].to(torch.int64)}
