"""How each method computes its losses on a batch. The training loop is the same for all of them.

A method maps ``(student, teacher, batch, iteration)`` to named loss tensors and
plain-number statistics. Names start with ``sup_`` (labeled branch) or
``unsup_`` (unlabeled branch); the trainer sums them as
``L = sum(sup_*) + alpha(t) * sum(unsup_*)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from dtg.config import Config, SemiConfig
from dtg.data.transforms import teacher_to_student
from dtg.losses.pseudo_label import pseudo_targets
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
    """Labeled data only. It keeps the EMA teacher too (unused by its loss), so that every
    method is compared teacher to teacher, as the paper reports."""

    name = "supervised"
    uses_unlabeled = False
    uses_teacher = True

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def losses(
        self, student: Detector, teacher: Detector | None, batch: Batch, iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return labeled_losses(student, batch["sup"], self.device), {}


class SparseMethod:
    """The sparse-to-dense baseline (METHOD.md section 3).

    The teacher's final detections on the weak view with score >= threshold,
    mapped into the strong view, are ordinary targets for the student's RPN and
    R-CNN assignment; an image without pseudo boxes still gives background samples.
    """

    name = "sparse"
    uses_unlabeled = True
    uses_teacher = True

    def __init__(self, device: torch.device, semi: SemiConfig) -> None:
        self.device, self.semi = device, semi

    @torch.no_grad()
    def pseudo_labels(self, teacher: Detector, items: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Per unlabeled item: pseudo ``boxes`` (m, 4) in its strong view and ``labels`` (m,)."""
        dets = teacher.predict([it["weak"].to(self.device, non_blocking=True) for it in items])
        out = []
        for it, det in zip(items, dets):
            m = teacher_to_student(it["weak_matrix"], it["strong_matrix"])
            size = (int(it["strong"].shape[-2]), int(it["strong"].shape[-1]))
            semi = self.semi
            unsure = semi.uncertain_score_thresh if semi.uncertain_score_thresh < semi.pseudo_score_thresh else None
            t = pseudo_targets({k: v.cpu() for k, v in det.items()}, m, size, semi.pseudo_score_thresh, unsure)
            out.append({k: v.to(self.device) for k, v in t.items()})
        return out

    def losses(
        self, student: Detector, teacher: Detector | None, batch: Batch, iteration: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        assert teacher is not None, "the sparse method needs a teacher"
        losses = labeled_losses(student, batch["sup"], self.device)
        items = batch["unsup"]
        if not items:  # burn-in: labeled loss only
            return losses, {}
        targets = self.pseudo_labels(teacher, items)
        strong = [it["strong"].to(self.device, non_blocking=True) for it in items]
        unsup = student.supervised_losses(strong, targets, cls_loss=self.semi.unsup_cls_loss)
        losses.update({f"unsup_{k}": v for k, v in unsup.items()})
        n_boxes = sum(len(t["boxes"]) for t in targets)
        return losses, {"pseudo_boxes_per_image": n_boxes / max(len(items), 1)}


def build_method(cfg: Config, device: torch.device) -> Method:
    """The method named by ``cfg.method``."""
    if cfg.method == "supervised":
        return SupervisedMethod(device)
    if cfg.method == "sparse":
        return SparseMethod(device, cfg.semi)
    if cfg.method == "dtg":
        from dtg.engine.dtg_method import DTGMethod  # imports this module

        return DTGMethod(device, cfg)
    raise ValueError(f"unknown method '{cfg.method}'")
