"""What every method shares: the batch layout, the method protocol, box targets and the labeled loss.

Methods differ only in their unlabeled loss (docs/method.md, "The frame"). The training
step (:mod:`dtg.engine.step`) computes the labeled losses itself, names them ``sup_*``, and,
once the burn-in is over, asks the method in two calls for ``unsup_*`` losses on the unlabeled
items: :meth:`Method.teacher_targets` (the teacher's pass on the weak views, no gradient, the
method's typed targets) then :meth:`Method.student_losses` (the student's pass on the strong
views against them); ``L = sum(sup_*) + alpha(t) * sum(unsup_*)``. Tools that need a method's
targets (``dtg bench targets``, ``dtg explain``, the benchmarks) call ``teacher_targets`` too,
so there is one teacher pass, the method's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dtg.models.detector import Detector

Batch = dict[str, list[dict[str, Any]]]
"""A collated batch keyed by branch: ``{"sup": [labeled items], "unsup": [unlabeled items]}``.

A ``sup`` item holds ``image`` (3, H, W), ``boxes`` (n, 4) xyxy and ``labels`` (n,); an
``unsup`` item holds ``weak`` / ``strong`` images and their (3, 3) ``weak_matrix`` /
``strong_matrix`` (original image -> view)."""


@dataclass
class BoxTargets:
    """Box targets of an unlabeled batch for the student's ordinary Faster R-CNN assignment
    (sparse's pseudo boxes, the oracle's ground truth, DTG's sparse RPN hybrid).

    Attributes:
        images: per unlabeled item, in :meth:`Detector.supervised_losses`' target format:
            ``boxes`` (m, 4) float32 xyxy in its strong view, ``labels`` (m,) int64 in 1..K and,
            with sparse's ignore band on, ``ignore`` (u, 4) uncertain boxes. ``m``, ``u`` may be 0.
        detections: per item the teacher's final detections on its weak view (``boxes`` (n, 4)
            xyxy in weak-view pixels, ``scores`` (n,), ``labels`` (n,) in 1..K), which the boxes
            were taken from; None when the boxes are ground truth (the oracle).
    """

    images: list[dict[str, torch.Tensor]]
    detections: list[dict[str, torch.Tensor]] | None = None

    def boxes_per_image(self) -> float:
        """Mean number of target boxes per image (the ``pseudo_boxes_per_image`` statistic)."""
        return sum(len(t["boxes"]) for t in self.images) / max(len(self.images), 1)


@dataclass(frozen=True)
class TargetFigure:
    """A per-image count of a method's teacher targets that training watches
    (:mod:`dtg.engine.target_watch`; docs/method.md, "Watching the targets").

    Attributes:
        stat: its key among :meth:`Method.student_losses`' statistics, e.g. ``rpn_clusters_per_image``.
        label: how a log line names it, e.g. ``RPN clusters``.
        keys: the config keys that set it (dotted, e.g. ``dtg.rpn.tau``), named with their values in a warning.
    """

    stat: str
    label: str
    keys: tuple[str, ...]


class Method(Protocol):
    """A semi-supervised method: a name, whether it reads unlabeled data, and its unlabeled loss
    as two calls, the teacher's targets and the student's losses against them.

    Built by the registry (:func:`dtg.methods.build_method`) as ``cls(cfg, device)``. The methods
    derive from it explicitly and so inherit :meth:`target_figures`' default.
    """

    name: str
    uses_unlabeled: bool
    needs_unlabeled_boxes: bool  # its unlabeled items must carry their ground truth (the oracle only)

    def teacher_targets(self, teacher: Detector, items: list[dict[str, Any]]) -> Any:
        """The method's typed targets for the unlabeled ``items`` (its own dataclass, e.g.
        :class:`BoxTargets`), from the teacher's pass on their weak views under ``torch.no_grad()``.
        Reads no student; consumes global random state only where training does (DTG's
        ``dtg.rcnn.subsample``)."""
        ...

    def student_losses(
        self, student: Detector, items: list[dict[str, Any]], targets: Any
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Named ``unsup_*`` loss scalars and plain-number statistics of the student's pass on the
        strong views of ``items`` against ``targets`` (what :meth:`teacher_targets` returned for them)."""
        ...

    def target_figures(self) -> tuple[TargetFigure, ...]:
        """The statistics of :meth:`student_losses` that count this run's teacher targets per image,
        with the config keys that set them: what training watches for a collapse or an explosion.
        None unless the method names some (supervised: no targets; oracle: the ground truth, which no key sets)."""
        return ()

    def loss_weights(self) -> dict[str, float]:
        """The weight :meth:`student_losses` gives each ``unsup_*`` term it returns, keyed by the term's logged
        name (DTG's weight dict): the logged values are the weighted terms, whose sum alpha(t) multiplies.
        Empty unless the method weighs its terms (sparse and the oracle return torchvision's losses as they
        are); training logs it once."""
        return {}


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


def strong_sizes(items: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(H, W)`` of each item's strong view: the student's image sizes (the detector never resizes)."""
    return [(int(it["strong"].shape[-2]), int(it["strong"].shape[-1])) for it in items]
