"""``method=oracle``: the sparse baseline fed the unlabeled images' ground truth (the frame's ceiling).

Everything is sparse's (views, matrices, the student's ordinary RPN / R-CNN assignment, losses,
unlabeled weight, schedule) except where the target boxes come from: the unlabeled images' own
boxes (``data.full_json``), mapped from the original image into the strong view, instead of
the teacher's detections. The oracle is a target source: its :meth:`OracleMethod.teacher_targets`
never asks the teacher. Its gain over ``supervised`` is what the pseudo-label pipeline can
absorb at all; a method's share of it says how much its targets leave on the table.
"""

from __future__ import annotations

from typing import Any

import torch

from dtg.config import Config
from dtg.geometry import project_targets
from dtg.methods.base import BoxTargets, Method
from dtg.methods.sparse import box_target_losses
from dtg.models.detector import Detector


def ground_truth_targets(items: list[dict[str, Any]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Per unlabeled item: its ``gt_boxes`` (n, 4) xyxy in original pixels mapped by ``strong_matrix``
    into the strong view and clipped (boxes under 1 px dropped): ``boxes`` (m, 4), ``labels`` (m,)."""
    out = []
    for it in items:
        size = (int(it["strong"].shape[-2]), int(it["strong"].shape[-1]))
        boxes, labels = project_targets(it["gt_boxes"].float(), it["gt_labels"], it["strong_matrix"], size)
        out.append({"boxes": boxes.to(device), "labels": labels.to(device, torch.int64)})
    return out


class OracleMethod(Method):
    """The ground truth as box targets, sparse's student losses (the teacher is kept and EMA'd, never asked)."""

    name = "oracle"
    uses_unlabeled = True
    needs_unlabeled_boxes = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device, self.sparse = device, cfg.sparse

    def teacher_targets(self, teacher: Detector, items: list[dict[str, Any]]) -> BoxTargets:
        """The items' ground truth in their strong views (:func:`ground_truth_targets`); ``teacher`` is not read.

        Raises:
            ValueError: an item carries no ``gt_boxes`` (loaded without ``unlabeled_boxes=True``).
        """
        if any("gt_boxes" not in it for it in items):
            raise ValueError("method=oracle: unlabeled items carry no ground truth (load_sources(unlabeled_boxes=True))")
        return BoxTargets(ground_truth_targets(items, self.device))

    def student_losses(
        self, student: Detector, items: list[dict[str, Any]], targets: BoxTargets
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Sparse's :func:`~dtg.methods.sparse.box_target_losses`."""
        return box_target_losses(student, items, targets, self.sparse, self.device)
