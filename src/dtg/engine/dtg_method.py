"""``method=dtg``: Dense Teacher Guidance in the R-CNN and RPN stages (METHOD.md sections 4-6).

Orchestration only: the math lives in :mod:`dtg.losses` (clustering, correspondence,
INC targets, Rank Matching). Per unlabeled batch: one teacher pass on the weak
views (dense RPN outputs, proposals, R-CNN outputs on its own proposals), one
student pass on the strong views, then for each enabled stage
``L_u = L_cls + L_reg + beta * L_RM``.
"""

from __future__ import annotations

from dataclasses import replace
import torch
from torch import Tensor

from dtg.config import Config
from dtg.data.transforms import teacher_to_student
from dtg.engine.methods import Batch, labeled_losses
from dtg.losses.correspondence import anchor_grid, map_anchors, map_proposals, match_anchors
from dtg.losses.dtg_loss import (
    inc_classification_loss,
    inc_objectness_loss,
    inc_regression_loss,
    select_class_deltas,
)
from dtg.losses.inc import IncTargets, rcnn_inc_targets, rpn_inc_targets
from dtg.losses.rank_matching import rank_matching_loss
from dtg.models.detector import DenseOutputs, Detector


def concat_targets(parts: list[IncTargets]) -> IncTargets:
    """Concatenate per-image targets; cluster ids are offset so that images never share a cluster."""
    offset, clusters = 0, []
    for p in parts:
        clusters.append(torch.where(p.cluster >= 0, p.cluster + offset, p.cluster))
        offset += int(p.cluster.max()) + 1 if p.cluster.numel() else 0  # max is -1 without members
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return IncTargets(
        labels=cat("labels"), reg_targets=cat("reg_targets"), reg_mask=cat("reg_mask"),
        cluster=torch.cat(clusters), teacher_scores=cat("teacher_scores"),
        num_clusters=sum(p.num_clusters for p in parts), classes=cat("classes"),
    )


def ignore_samples(t: IncTargets, ignore: Tensor) -> IncTargets:
    """Targets with the samples in the (N,) bool mask ``ignore`` removed from every loss."""
    neg = torch.full_like(t.labels, -1)
    cluster = torch.where(ignore, neg, t.cluster)
    return replace(
        t,
        labels=torch.where(ignore, neg, t.labels),
        classes=torch.where(ignore, neg, t.classes),
        reg_mask=t.reg_mask & ~ignore,
        cluster=cluster,
        num_clusters=int(cluster[cluster >= 0].unique().numel()),  # clusters with a member left
    )


class DTGMethod:
    """Dense-to-dense guidance; every METHOD.md switch is a ``dtg.*`` config key."""

    name = "dtg"
    uses_unlabeled = True
    uses_teacher = True

    def __init__(self, device: torch.device, cfg: Config) -> None:
        self.device, self.cfg, self.d = device, cfg, cfg.dtg
        self.canonical = float(cfg.model.anchor_sizes[0])  # anchor size of level 0 (METHOD.md 5.2)

    def losses(
        self, student: Detector, teacher: Detector | None, batch: Batch, iteration: int
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert teacher is not None, "dtg needs a teacher"
        losses = labeled_losses(student, batch["sup"], self.device)
        items = batch["unsup"]
        if not items:  # burn-in
            return losses, {}
        with torch.no_grad():
            t = teacher.forward_dense([it["weak"].to(self.device, non_blocking=True) for it in items], train_top_n=True)
            t_logits, t_deltas = teacher.roi_forward(t.features, t.proposals, t.images.image_sizes)
        s = student.forward_dense([it["strong"].to(self.device, non_blocking=True) for it in items])
        mats = [teacher_to_student(it["weak_matrix"], it["strong_matrix"]).to(self.device) for it in items]
        stats: dict[str, float] = {}
        if self.d.rcnn:
            losses.update(self._rcnn(student, teacher, t, t_logits, t_deltas, s, mats, stats))
        if self.d.rpn:
            losses.update(self._rpn(student, t, s, mats, stats))
        return losses, stats

    # ------------------------------------------------------------------ R-CNN
    def _rcnn(
        self, student: Detector, teacher: Detector, t: DenseOutputs, t_logits: Tensor, t_deltas: Tensor,
        s: DenseOutputs, mats: list[Tensor], stats: dict[str, float],
    ) -> dict[str, Tensor]:
        d, counts = self.d, [len(p) for p in t.proposals]
        rois, parts = [], []
        for i, (logits, deltas) in enumerate(zip(t_logits.split(counts), t_deltas.split(counts))):
            size = s.images.image_sizes[i]
            roi = map_proposals(t.proposals[i], mats[i], size)  # one-to-one correspondence
            tg = rcnn_inc_targets(
                logits, deltas, t.proposals[i], roi, mats[i], size, teacher.net.roi_heads.box_coder,
                tau=d.tau_rcnn, iou_threshold=d.rcnn_nms, reg_target=d.reg_target,
                cls_labels=d.inc_cls, reg_labels=d.inc_reg, teacher_size=t.images.image_sizes[i],
                uncertain=d.uncertain_rcnn,
            )
            outside = ((roi[:, 2] - roi[:, 0]) < 1) | ((roi[:, 3] - roi[:, 1]) < 1)  # left the student view
            rois.append(roi)
            parts.append(ignore_samples(tg, outside))
        tgt = concat_targets(parts)
        s_logits, s_deltas = student.roi_forward(s.features, rois, s.images.image_sizes)
        out = {
            "unsup_rcnn_cls": inc_classification_loss(s_logits, tgt, d.normalize, self.cfg.model.focal_gamma),
            "unsup_rcnn_reg": inc_regression_loss(select_class_deltas(s_deltas, tgt.classes), tgt, d.normalize),
        }
        if d.rank_matching:
            member = tgt.cluster >= 0
            cls = tgt.classes[member].clamp(min=0)
            if d.rm_input == "prob":
                p_s = torch.softmax(s_logits[member], -1).gather(1, cls[:, None]).squeeze(1)
                p_t = tgt.teacher_scores[member]
            else:
                p_s = s_logits[member].gather(1, cls[:, None]).squeeze(1)
                p_t = t_logits[member].gather(1, cls[:, None]).squeeze(1)
            out["unsup_rcnn_rm"] = d.beta * rank_matching_loss(p_s, p_t, tgt.cluster[member], d.T)
        n = max(len(rois), 1)
        stats["rcnn_clusters_per_image"] = tgt.num_clusters / n
        stats["rcnn_members_per_image"] = float((tgt.cluster >= 0).sum()) / n
        return out

    # ------------------------------------------------------------------ RPN
    def _rpn(self, student: Detector, t: DenseOutputs, s: DenseOutputs, mats: list[Tensor], stats: dict[str, float]) -> dict[str, Tensor]:
        d = self.d
        grid = anchor_grid(
            s.rpn.anchors, s.rpn.num_anchors_per_level,
            [tuple(f.shape[-2:]) for f in s.features.values()], tuple(s.images.tensors.shape[-2:]),
        )
        parts = []
        for i, m in enumerate(mats):
            partner = match_anchors(map_anchors(t.rpn.anchors, m), grid, self.canonical, d.anchor_radius)
            parts.append(rpn_inc_targets(
                t.rpn.objectness[i], t.rpn.deltas[i], t.rpn.anchors, t.rpn.levels, partner, s.rpn.anchors, m,
                s.images.image_sizes[i], t.images.image_sizes[i], student.net.rpn.box_coder,
                tau=d.tau_rpn, iou_threshold=d.rpn_nms, candidates=d.rpn_candidates,
                cls_labels=d.inc_cls, reg_labels=d.inc_reg, reg_target=d.reg_target, uncertain=d.uncertain_rpn,
            ))
        tgt = concat_targets(parts)
        obj = s.rpn.objectness.reshape(-1)  # (B, A_s) -> (B * A_s,), image-major like the targets
        out = {
            "unsup_rpn_cls": inc_objectness_loss(obj, tgt, d.normalize),
            "unsup_rpn_reg": inc_regression_loss(s.rpn.deltas.reshape(-1, 4), tgt, d.normalize),
        }
        if d.rank_matching:
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

