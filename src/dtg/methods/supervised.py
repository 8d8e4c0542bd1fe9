"""``method=supervised``: labeled data only (docs/method.md, "Baselines")."""

from __future__ import annotations

from typing import Any

import torch

from dtg.config import Config
from dtg.methods.base import Method
from dtg.models.detector import Detector


class SupervisedMethod(Method):
    """No unlabeled loss. The step still keeps the EMA teacher, so that every method is
    compared teacher to teacher, as the paper reports."""

    name = "supervised"
    uses_unlabeled = False
    needs_unlabeled_boxes = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device = device

    def teacher_targets(self, teacher: Detector, items: list[dict[str, Any]]) -> None:
        """No targets: the teacher is never asked."""
        return None

    def student_losses(
        self, student: Detector, items: list[dict[str, Any]], targets: None
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """No unlabeled loss."""
        return {}, {}
