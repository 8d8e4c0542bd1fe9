"""``method=dtg``: Dense Teacher Guidance in the R-CNN and RPN stages (docs/method.md).

Per unlabeled batch: :meth:`DTGMethod.teacher_targets` makes one teacher pass on the weak views
(:func:`~dtg.methods.dtg.teacher.teacher_pass`: dense RPN outputs, proposals, R-CNN outputs on its own
proposals) and lets each enabled stage (:mod:`dtg.methods.dtg.stages`) build its targets; the student's
side of the batch (its image sizes, its anchors) is known from the strong views' shapes
(:meth:`Detector.dense_layout`), so no student pass is needed for them. :meth:`DTGMethod.student_losses`
makes one student pass on the strong views, takes each stage's raw terms and weighs them with the one
weight dict (:func:`weight_dict`): per stage ``L_u = L_cls + L_reg + rm_weight * L_RM``. Every key of a
stage is read from its section of the config (``dtg.rcnn``, ``dtg.rpn``: :class:`dtg.config.RcnnStageConfig`,
:class:`dtg.config.RpnStageConfig`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtg.config import Config, DTGConfig
from dtg.geometry import teacher_to_student
from dtg.methods.base import Method, TargetFigure, strong_images, strong_sizes, weak_images
from dtg.methods.dtg.stages import Stage, build_stages
from dtg.methods.dtg.teacher import DTGTargets, teacher_pass
from dtg.models.detector import Detector


def weight_dict(stages: list[Stage], d: DTGConfig) -> dict[str, float]:
    """The weight of every unlabeled loss term, keyed by the name it is logged under, ``unsup_<stage>_<term>``.

    ``L_u = sum_k w_k L_k`` over these terms (the training step multiplies ``L_u`` by alpha(t)):
    INC's classification and regression weigh 1 and Rank Matching ``dtg.rm_weight`` (the paper's beta),
    in either stage; the hybrid's sparse RPN terms weigh 1.
    """
    weight = {"cls": 1.0, "reg": 1.0, "rm": d.rm_weight}
    return {f"unsup_{s.name}_{term}": weight[term] for s in stages for term in s.terms}


class DTGMethod(Method):
    """Dense-to-dense guidance; every switch is a ``dtg.*`` config key.

    Attributes:
        stages: the enabled stages, R-CNN first (:func:`~dtg.methods.dtg.stages.build_stages`).
        weight_dict: the weight of each ``unsup_*`` term :meth:`student_losses` returns (:func:`weight_dict`).
        canonical: the anchor size of FPN level 0 (``model.anchor_sizes[0]``), which the RPN correspondence reads.
    """

    name = "dtg"
    uses_unlabeled = True
    needs_unlabeled_boxes = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device, self.cfg, self.d = device, cfg, cfg.dtg
        self.canonical = float(cfg.model.anchor_sizes[0])
        self.stages = build_stages(cfg, device)
        self.weight_dict = weight_dict(self.stages, cfg.dtg)

    def target_figures(self) -> tuple[TargetFigure, ...]:
        """Each stage's figures: clusters and members per image of an INC stage (keys ``dtg.<stage>.tau``
        and ``dtg.<stage>.uncertain``), the hybrid RPN's pseudo boxes (``sparse.*``)."""
        return tuple(f for stage in self.stages for f in stage.figures())

    def loss_weights(self) -> dict[str, float]:
        """:attr:`weight_dict`."""
        return dict(self.weight_dict)

    @torch.no_grad()
    def teacher_targets(self, teacher: Detector, items: list[dict[str, Any]]) -> DTGTargets:
        """One teacher pass on the weak views and the targets of each enabled stage (with
        ``dtg.rcnn.subsample`` the background draw uses torch's global generator, as training does)."""
        t = teacher_pass(teacher, weak_images(items, self.device), max_proposals=self.cfg.dtg.rcnn.proposals)
        mats = [teacher_to_student(it["weak_matrix"], it["strong_matrix"]).to(self.device) for it in items]
        out = DTGTargets(t, mats, strong_sizes(items))
        for stage in self.stages:
            setattr(out, stage.slot, stage.targets(teacher, out, items))
        return out

    def student_losses(
        self, student: Detector, items: list[dict[str, Any]], targets: DTGTargets
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One student pass on the strong views; each stage's terms whose targets ``targets`` holds, in the
        order R-CNN, RPN, weighted by :attr:`weight_dict` and named as its keys; per-image statistics."""
        s = student.forward_dense(strong_images(items, self.device))
        losses: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        for stage in self.stages:
            st = getattr(targets, stage.slot)
            if st is None:
                continue
            terms, stage_stats = stage.losses(student, s, st)
            for term, value in terms.items():
                key = f"unsup_{stage.name}_{term}"
                losses[key] = self.weight_dict[key] * value
            stats.update(stage_stats)
        return losses, stats
