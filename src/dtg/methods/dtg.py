"""``method=dtg``: Dense Teacher Guidance in the R-CNN and RPN stages (docs/method.md).

Orchestration only: the math lives in :mod:`dtg.losses` (clustering, correspondence,
INC targets, Rank Matching). Per unlabeled batch: one teacher pass on the weak views
(dense RPN outputs, proposals, R-CNN outputs on its own proposals), one student pass on
the strong views, then for each enabled stage ``L_u = L_cls + L_reg + beta * L_RM``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtg.config import Config, DTGConfig
from dtg.geometry import teacher_to_student
from dtg.losses.correspondence import anchor_grid
from dtg.losses.dtg_loss import inc_classification_loss, inc_objectness_loss, inc_regression_loss, select_class_deltas
from dtg.losses.inc_image import (
    IncOptions, concat_targets, keep_members_and_sample_background, rcnn_image_targets, rpn_image_targets, take_samples,
)
from dtg.losses.rank_matching import rank_matching_loss
from dtg.methods.base import strong_images, weak_images
from dtg.methods.sparse import pseudo_labels
from dtg.models.detector import DenseOutputs, Detector


def stage_value(d: DTGConfig, stage: str, name: str) -> Any:
    """Key ``name`` (``inc_cls`` | ``inc_reg`` | ``rank_matching`` | ``reg_target``) of ``stage``
    (``rcnn`` | ``rpn``): the per-stage key ``dtg.<stage>_<name>`` when set, else ``dtg.<name>``."""
    own = getattr(d, f"{stage}_{name}")
    return getattr(d, name) if own is None else own


def stage_switch(d: DTGConfig, stage: str, name: str) -> bool:
    """:func:`stage_value` of a boolean switch."""
    return bool(stage_value(d, stage, name))


def inc_options(cfg: Config, stage: str | None = None) -> IncOptions:
    """The :class:`IncOptions` of a run's ``dtg.*`` keys (and the anchor size of FPN level 0).

    With ``stage`` (``rcnn`` | ``rpn``), the label switches are that stage's (:func:`stage_switch`).
    """
    d = cfg.dtg
    cls_labels = d.inc_cls if stage is None else stage_switch(d, stage, "inc_cls")
    reg_labels = d.inc_reg if stage is None else stage_switch(d, stage, "inc_reg")
    reg_target = d.reg_target if stage is None else stage_value(d, stage, "reg_target")
    return IncOptions(
        tau_rcnn=d.tau_rcnn, rcnn_nms=d.rcnn_nms, uncertain_rcnn=d.uncertain_rcnn,
        tau_rpn=d.tau_rpn, rpn_nms=d.rpn_nms, uncertain_rpn=d.uncertain_rpn, rpn_candidates=d.rpn_candidates,
        reg_target=reg_target, cls_labels=cls_labels, reg_labels=reg_labels,
        anchor_radius=d.anchor_radius, canonical=float(cfg.model.anchor_sizes[0]), anchor_level=d.anchor_level,
        anchor_ties=d.anchor_ties,
    )


class DTGMethod:
    """Dense-to-dense guidance; every switch is a ``dtg.*`` config key."""

    name = "dtg"
    uses_unlabeled = True
    needs_unlabeled_boxes = False

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device, self.cfg, self.d = device, cfg, cfg.dtg
        self.rcnn_opts, self.rpn_opts = inc_options(cfg, "rcnn"), inc_options(cfg, "rpn")

    def unlabeled_losses(
        self, student: Detector, teacher: Detector, items: list[dict[str, Any]], iteration: int
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        with torch.no_grad():
            t = teacher.forward_dense(weak_images(items, self.device), train_top_n=True)
            t_logits, t_deltas = teacher.roi_forward(t.features, t.proposals, t.images.image_sizes)
        s = student.forward_dense(strong_images(items, self.device))
        mats = [teacher_to_student(it["weak_matrix"], it["strong_matrix"]).to(self.device) for it in items]
        losses: dict[str, Tensor] = {}
        stats: dict[str, float] = {}
        if self.d.rcnn:
            losses.update(self._rcnn(student, teacher, t, t_logits, t_deltas, s, mats, stats))
        if self.d.rpn and self.d.rpn_targets == "sparse":  # the table 2(c) hybrid
            targets = pseudo_labels(teacher, items, self.cfg.semi, self.device)
            cls, reg = student.rpn_losses(s, targets)
            losses.update({"unsup_rpn_cls": cls, "unsup_rpn_reg": reg})
            stats["pseudo_boxes_per_image"] = sum(len(x["boxes"]) for x in targets) / max(len(items), 1)
        elif self.d.rpn:
            losses.update(self._rpn(student, t, s, mats, stats))
        return losses, stats

    # ------------------------------------------------------------------ R-CNN
    def _rcnn(
        self, student: Detector, teacher: Detector, t: DenseOutputs, t_logits: Tensor, t_deltas: Tensor,
        s: DenseOutputs, mats: list[Tensor], stats: dict[str, float],
    ) -> dict[str, Tensor]:
        d, counts = self.d, [len(p) for p in t.proposals]
        rois, parts, t_used = [], [], []
        for i, (logits, deltas) in enumerate(zip(t_logits.split(counts), t_deltas.split(counts))):
            built = rcnn_image_targets(logits, deltas, t.proposals[i], mats[i], s.images.image_sizes[i],
                                       t.images.image_sizes[i], teacher.rcnn_box_coder, self.rcnn_opts)
            rois_i, tg_i = built.rois, built.targets
            if d.rcnn_subsample:  # the cost switch: every member, background sampled to the RoI budget
                keep = keep_members_and_sample_background(tg_i, self.cfg.model.roi_batch_size_per_image)
                rois_i, tg_i, logits = rois_i[keep], take_samples(tg_i, keep), logits[keep]
            rois.append(rois_i)
            parts.append(tg_i)
            t_used.append(logits)
        tgt = concat_targets(parts)
        s_logits, s_deltas = student.roi_forward(s.features, rois, s.images.image_sizes)
        den = len(rois) * self.cfg.model.roi_batch_size_per_image  # the supervised R-CNN denominator
        out = {
            "unsup_rcnn_cls": inc_classification_loss(s_logits, tgt, d.normalize, self.cfg.model.focal_gamma,
                                                      denominator=den),
            "unsup_rcnn_reg": inc_regression_loss(select_class_deltas(s_deltas, tgt.classes), tgt, d.normalize,
                                                  denominator=den),
        }
        if stage_switch(d, "rcnn", "rank_matching"):
            member = tgt.cluster >= 0
            cls = tgt.classes[member].clamp(min=0)
            if d.rm_input == "prob":
                p_s = torch.softmax(s_logits[member], -1).gather(1, cls[:, None]).squeeze(1)
                p_t = tgt.teacher_scores[member]
            else:
                p_s = s_logits[member].gather(1, cls[:, None]).squeeze(1)
                p_t = torch.cat(t_used)[member].gather(1, cls[:, None]).squeeze(1)
            out["unsup_rcnn_rm"] = d.beta * rank_matching_loss(p_s, p_t, tgt.cluster[member], d.T)
        n = max(len(rois), 1)
        stats["rcnn_clusters_per_image"] = tgt.num_clusters / n
        stats["rcnn_members_per_image"] = float((tgt.cluster >= 0).sum()) / n
        return out

    # ------------------------------------------------------------------ RPN
    def _rpn(self, student: Detector, t: DenseOutputs, s: DenseOutputs, mats: list[Tensor],
             stats: dict[str, float]) -> dict[str, Tensor]:
        d = self.d
        grid = anchor_grid(
            s.rpn.anchors, s.rpn.num_anchors_per_level,
            [tuple(f.shape[-2:]) for f in s.features.values()], tuple(s.images.tensors.shape[-2:]),
        )
        parts = [
            rpn_image_targets(t.rpn.objectness[i], t.rpn.deltas[i], t.rpn.anchors, t.rpn.levels, grid, m,
                              s.images.image_sizes[i], t.images.image_sizes[i], student.rpn_box_coder, self.rpn_opts)
            for i, m in enumerate(mats)
        ]
        tgt = concat_targets(parts)
        obj = s.rpn.objectness.reshape(-1)  # (B, A_s) -> (B * A_s,), image-major like the targets
        den = len(mats) * self.cfg.model.rpn_batch_size_per_image  # the supervised RPN denominator
        out = {
            "unsup_rpn_cls": inc_objectness_loss(obj, tgt, d.normalize, denominator=den,
                                                 gamma=0.0 if d.rpn_cls_loss == "bce" else 2.0),
            "unsup_rpn_reg": inc_regression_loss(s.rpn.deltas.reshape(-1, 4), tgt, d.normalize, denominator=den),
        }
        if stage_switch(d, "rpn", "rank_matching"):
            member = tgt.cluster >= 0
            if d.rm_input == "prob":
                p_s, p_t = obj[member].sigmoid(), tgt.teacher_scores[member]
            else:
                p_s, p_t = obj[member], torch.logit(tgt.teacher_scores[member], eps=1e-6)
            out["unsup_rpn_rm"] = d.beta * rank_matching_loss(p_s, p_t, tgt.cluster[member], d.T)
        n = max(len(mats), 1)
        stats["rpn_clusters_per_image"] = tgt.num_clusters / n
        stats["rpn_members_per_image"] = float((tgt.cluster >= 0).sum()) / n
        return out
