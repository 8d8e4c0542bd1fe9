"""``method=sparse``: the sparse-to-dense pseudo-label baseline (docs/method.md, "Baselines").

The teacher's final detections on the weak view with score >= threshold, mapped into the
strong view, are ordinary targets for the student's RPN and R-CNN assignment; an image
without pseudo boxes still gives background samples.
"""

from __future__ import annotations

from typing import Any

import torch

from dtg.config import Config, SparseConfig
from dtg.geometry import teacher_to_student
from dtg.losses.pseudo_label import background_to_ignore, pseudo_targets
from dtg.methods.base import BoxTargets, Method, TargetFigure, strong_images, weak_images
from dtg.models.detector import DenseOutputs, Detector


def pseudo_threshold(sparse: SparseConfig) -> float | torch.Tensor:
    """``sparse.pseudo_score_thresh``, or the (K + 1,) per-label thresholds of ``sparse.class_thresholds``."""
    return torch.tensor([1.0, *sparse.class_thresholds]) if sparse.class_thresholds else sparse.pseudo_score_thresh


def pseudo_labels_from(detections: list[dict[str, torch.Tensor]], items: list[dict[str, Any]], sparse: SparseConfig,
                       device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Per unlabeled item: its teacher ``detections`` on the weak view (``boxes`` (n, 4), ``scores``,
    ``labels``) ``>= sparse.pseudo_score_thresh`` (or its class's ``sparse.class_thresholds`` entry)
    mapped into the strong view (``boxes`` (m, 4), ``labels`` (m,)), plus ``ignore`` boxes of the
    uncertain band when ``sparse.uncertain_score_thresh`` is below the threshold; on ``device``."""
    unsure = sparse.uncertain_score_thresh if sparse.uncertain_score_thresh < sparse.pseudo_score_thresh else None
    thresh = pseudo_threshold(sparse)  # the ignore band, when on, stays below the global threshold
    out = []
    for it, det in zip(items, detections):
        m = teacher_to_student(it["weak_matrix"], it["strong_matrix"])
        size = (int(it["strong"].shape[-2]), int(it["strong"].shape[-1]))
        t = pseudo_targets({k: v.cpu() for k, v in det.items()}, m, size, thresh, unsure)
        out.append({k: v.to(device) for k, v in t.items()})
    return out


@torch.no_grad()
def pseudo_box_targets(teacher: Detector, items: list[dict[str, Any]], sparse: SparseConfig,
                       device: torch.device, weak_pass: DenseOutputs | None = None) -> BoxTargets:
    """The teacher's detections on the weak views (:meth:`Detector.predict`) and the pseudo boxes
    :func:`pseudo_labels_from` takes from them.

    ``weak_pass``: the teacher's :meth:`Detector.forward_dense` on these weak views, made already
    (DTG's hybrid); its features and RPN outputs are reused, the proposals made again with the
    teacher's own top-N, so the detections equal :meth:`Detector.predict`'s."""
    if weak_pass is None:
        dets = teacher.predict(weak_images(items, device))
    else:
        with torch.no_grad():
            props, _ = teacher.propose(weak_pass.rpn, weak_pass.images.image_sizes)
        dets = teacher.detections(weak_pass, props)
    return BoxTargets(pseudo_labels_from(dets, items, sparse, device), dets)


def pseudo_box_figure(sparse: SparseConfig, label: str = "pseudo boxes") -> TargetFigure:
    """``pseudo_boxes_per_image`` and the keys that set it: the threshold in use (``sparse.class_thresholds``
    when given, else ``sparse.pseudo_score_thresh``) and the ignore band's ``sparse.uncertain_score_thresh``."""
    thresh = "sparse.class_thresholds" if sparse.class_thresholds else "sparse.pseudo_score_thresh"
    return TargetFigure("pseudo_boxes_per_image", label, (thresh, "sparse.uncertain_score_thresh"))


def box_target_losses(student: Detector, items: list[dict[str, Any]], targets: BoxTargets, sparse: SparseConfig,
                      device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The student's ordinary Faster R-CNN losses on the strong views against box ``targets``
    (``unsup_rpn_cls`` ... ``unsup_rcnn_reg``; ``sparse.unsup_reg=false`` drops the ``_reg`` ones)
    and ``pseudo_boxes_per_image``."""
    unsup = student.supervised_losses(strong_images(items, device), targets.images, cls_loss=sparse.unsup_cls_loss,
                                      ignore_rule=background_to_ignore)  # the ignore band (uncertain boxes)
    if not sparse.unsup_reg:  # classification only (Unbiased Teacher): pseudo boxes do not teach boxes
        unsup = {k: v for k, v in unsup.items() if not k.endswith("_reg")}
    return {f"unsup_{k}": v for k, v in unsup.items()}, {"pseudo_boxes_per_image": targets.boxes_per_image()}


class SparseMethod(Method):
    """Teacher detections >= ``sparse.pseudo_score_thresh`` as pseudo boxes; optional ignore band;
    ``sparse.unsup_reg=false`` keeps the classification losses only."""

    name = "sparse"
    uses_unlabeled = True
    needs_unlabeled_boxes = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device, self.sparse = device, cfg.sparse

    def target_figures(self) -> tuple[TargetFigure, ...]:
        """The pseudo boxes per image (:func:`pseudo_box_figure`)."""
        return (pseudo_box_figure(self.sparse),)

    def teacher_targets(self, teacher: Detector, items: list[dict[str, Any]]) -> BoxTargets:
        """Per unlabeled item: pseudo ``boxes`` (m, 4) in its strong view and ``labels`` (m,)
        (+ ``ignore``), and the teacher's detections they come from (:func:`pseudo_box_targets`)."""
        return pseudo_box_targets(teacher, items, self.sparse, self.device)

    def student_losses(
        self, student: Detector, items: list[dict[str, Any]], targets: BoxTargets
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """:func:`box_target_losses`."""
        return box_target_losses(student, items, targets, self.sparse, self.device)
