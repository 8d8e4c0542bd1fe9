"""What every method shares: the batch layout, the method protocol and the labeled loss.

Methods differ only in their unlabeled loss (docs/method.md, "The frame"). The training
step (:mod:`dtg.engine.step`) computes the labeled losses itself, names them ``sup_*``, and
asks the method for ``unsup_*`` losses on the unlabeled items once the burn-in is over:
``L = sum(sup_*) + alpha(t) * sum(unsup_*)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from dtg.models.detector import Detector

Batch = dict[str, list[dict[str, Any]]]
"""A collated batch keyed by branch: ``{"sup": [labeled items], "unsup": [unlabeled items]}``.

A ``sup`` item holds ``image`` (3, H, W), ``boxes`` (n, 4) xyxy and ``labels`` (n,); an
``unsup`` item holds ``weak`` / ``strong`` images and their (3, 3) ``weak_matrix`` /
``strong_matrix`` (original image -> view)."""


class Method(Protocol):
    """A semi-supervised method: a name, whether it reads unlabeled data, and its unlabeled loss.

    Built by the registry (:func:`dtg.methods.build_method`) as ``cls(cfg, device)``.
    """

    name: str
    uses_unlabeled: bool
    needs_unlabeled_boxes: bool  # its unlabeled items must carry their ground truth (the oracle only)

    def unlabeled_losses(
        self, student: Detector, teacher: Detector, items: list[dict[str, Any]], iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Named ``unsup_*`` loss scalars and plain-number statistics for the unlabeled ``items``."""
        ...


def labeled_losses(student: Detector, items: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    """Ordinary Faster R-CNN losses on the labeled views, named ``sup_*``."""
    images = [it["image"].to(device, non_blocking=True) for it in items]
    targets = [{"boxes": it["boxes"].to(device), "labels": it["labels"].to(device)} for it in items]
    return {f"sup_{k}": v for k, v in student.supervised_losses(images, targets).items()}


def strong_images(items: list[dict[str, Any]], device: torch.device) -> list[torch.Tensor]:
    """The strong (student) views of unlabeled items on ``device``."""
    return [it["strong"].to(device, non_blocking=True) for it in items]


def weak_images(items: list[dict[str, Any]], device: torch.device) -> list[torch.Tensor]:
    """The weak (teacher) views of unlabeled items on ``device``."""
    return [it["weak"].to(device, non_blocking=True) for it in items]

