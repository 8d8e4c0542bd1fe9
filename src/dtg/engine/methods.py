"""How each method computes its losses on a batch. The training loop is the same for all of them.

A method maps ``(student, teacher, batch, iteration)`` to named loss tensors and
plain-number statistics. Names start with ``sup_`` (labeled branch) or
``unsup_`` (unlabeled branch); the trainer sums them as
``L = sum(sup_*) + alpha(t) * sum(unsup_*)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from dtg.models.detector import Detector

Batch = dict[str, list[dict[str, Any]]]


class Method(Protocol):
    name: str
    uses_unlabeled: bool
    uses_teacher: bool

    def losses(
        self, student: Detector, teacher: Detector | None, batch: Batch, iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...


def labeled_losses(student: Detector, items: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    """Ordinary Faster R-CNN losses on the labeled views, named ``sup_*``."""
    images = [it["image"].to(device, non_blocking=True) for it in items]
    targets = [{"boxes": it["boxes"].to(device), "labels": it["labels"].to(device)} for it in items]
    return {f"sup_{k}": v for k, v in student.supervised_losses(images, targets).items()}


class SupervisedMethod:
    """Labeled data only."""

    name = "supervised"
    uses_unlabeled = False
    uses_teacher = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def losses(
        self, student: Detector, teacher: Detector | None, batch: Batch, iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return labeled_losses(student, batch["sup"], self.device), {}


def build_method(name: str, device: torch.device) -> Method:
    if name == "supervised":
        return SupervisedMethod(device)
    raise ValueError(f"unknown method '{name}'")
